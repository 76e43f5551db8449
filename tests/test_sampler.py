"""The sampler: every rank gets the same number of full micro-batches, epochs reshuffle, lengths
group, and the one-pass sweeps of evaluation and precompute count each example once."""
import random

import pytest

from fastdadpo.core import sampler
from fastdadpo.core.tokenized import TokenizedExample


def fake_tokenized(n):
    return [TokenizedExample([1] * (1 + i % 7), [2] * (1 + (3 * i) % 5), [3], i) for i in range(n)]


@pytest.mark.parametrize("n, micro_batch_size, world_size", [(1, 1, 1), (10, 3, 1), (10, 3, 2), (17, 2, 4),
                                                              (5, 4, 3), (24, 4, 2)])
@pytest.mark.parametrize("group_by_length", [True, False])
def test_micro_batches_give_every_rank_the_same_full_count(n, micro_batch_size, world_size, group_by_length):
    tokenized = fake_tokenized(n)
    kwargs = dict(seed=3, epoch=1, world_size=world_size, group_by_length=group_by_length, length_window=2)
    per_rank = [sampler.micro_batches(tokenized, micro_batch_size, rank=rank, **kwargs) for rank in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(batch) == micro_batch_size for batches in per_rank for batch in batches)
    seen = [example.index for batches in per_rank for batch in batches for example in batch]
    assert set(seen) == set(range(n))
    assert len(seen) - n == sampler.padded_example_count(n, micro_batch_size, world_size)
    assert per_rank[0] == sampler.micro_batches(tokenized, micro_batch_size, rank=0, **kwargs)  # deterministic


def test_micro_batches_shuffle_per_epoch_and_group_by_length():
    tokenized = fake_tokenized(64)
    epoch = [[[e.index for e in batch] for batch in sampler.micro_batches(tokenized, 4, seed=0, epoch=k)]
             for k in (0, 1)]
    assert epoch[0] != epoch[1]

    def padding(batches):
        return sum(max(e.length() for e in batch) * len(batch) - sum(e.length() for e in batch) for batch in batches)

    grouped = padding(sampler.micro_batches(tokenized, 8, seed=0, epoch=0, length_window=8))
    assert grouped < padding(sampler.micro_batches(tokenized, 8, seed=0, epoch=0, group_by_length=False)) / 3


def test_shard_rounds_cover_every_example_once_with_equal_rounds():
    """The one-pass sweep (eval, precompute): each example on exactly one rank, once; every rank the
    same number of micro-batches (ZeRO-3 collectives), empty rounds marking stand-ins."""
    rng = random.Random(0)
    for _ in range(300):
        n, micro, ranks = rng.randint(1, 40), rng.randint(1, 6), rng.randint(1, 5)
        per_rank = [sampler.shard_rounds(n, micro, rank, ranks) for rank in range(ranks)]
        assert sorted(i for rounds in per_rank for batch in rounds for i in batch) == list(range(n))
        assert len({len(rounds) for rounds in per_rank}) == 1
        assert all(len(batch) <= micro for rounds in per_rank for batch in rounds)
    assert sampler.shard_rounds(5, 1, 1, 2) == [[1], [3], []]
