"""Which examples each rank trains on at each optimizer step, and the one-pass sweeps of
evaluation and precompute: pure functions of the data size, the seed, the step and the rank, so
every rank agrees without communicating and a resumed run continues where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np

from fastdadpo.base.errors import DataError
from fastdadpo.core.tokenized import TokenizedExample

def padded_example_count(num_examples: int, micro_batch_size: int, world_size: int) -> int:
    """Examples ``micro_batches`` repeats per epoch so every rank gets the same number of full micro-batches."""
    per_step = micro_batch_size * world_size
    return math.ceil(num_examples / per_step) * per_step - num_examples


def shard_rounds(num_examples: int, micro_batch_size: int, rank: int, world_size: int) -> List[List[int]]:
    """This rank's micro-batches (example indices) of a one-pass sweep that counts each example once:
    a stride shard, cut into micro-batches. Every rank gets the same number of rounds (ZeRO-3 ranks
    must make the same collective calls); a round with no examples left is ``[]`` (run a stand-in,
    drop its result)."""
    shard = list(range(rank, num_examples, world_size))
    rounds = -(-(-(-num_examples // world_size)) // micro_batch_size)  # ceil(ceil(n / ranks) / micro)
    return [shard[r * micro_batch_size:(r + 1) * micro_batch_size] for r in range(rounds)]


def micro_batches(tokenized: Sequence[TokenizedExample], micro_batch_size: int, *, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1, group_by_length: bool = True,
                  length_window: int = 64) -> list[list[TokenizedExample]]:
    """This rank's micro-batches for one epoch, the same on every call with the same arguments.

    The examples are shuffled (seeded by ``seed`` and ``epoch``); the order is extended by repeating
    its first examples up to a multiple of ``micro_batch_size * world_size`` (see
    ``padded_example_count``), so every rank gets the same number of full micro-batches and all
    ranks make the same collective calls. Step ``s`` gives rank ``r`` the ``r``-th micro-batch of
    that step's ``micro_batch_size * world_size`` examples. With ``group_by_length``, each window
    of ``length_window`` steps is sorted by length before it is cut (similar lengths share a step:
    less padding, balanced ranks) and the steps are then shuffled."""
    if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"micro_batches: bad micro_batch_size={micro_batch_size}, rank={rank}, "
                         f"world_size={world_size}")
    if not tokenized:
        raise DataError("no examples to batch")
    rng = np.random.default_rng([seed, epoch])
    per_step = micro_batch_size * world_size
    steps = math.ceil(len(tokenized) / per_step)
    order = np.resize(rng.permutation(len(tokenized)), steps * per_step)
    if group_by_length:
        lengths = np.array([example.length() for example in tokenized])
        window = per_step * length_window
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            order[start:start + window] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    step_order = rng.permutation(steps) if group_by_length else np.arange(steps)
    by_step = order.reshape(steps, world_size, micro_batch_size)
    return [[tokenized[i] for i in by_step[step, rank]] for step in step_order]


@dataclass
class StepPlan:
    """Optimizer step k of epoch e takes this rank's share of a seeded shuffle of the data, cut by
    ``micro_batches`` into steps of micro_batch_size x grad_accum x world_size examples (the global
    batch), and splits it into grad_accum micro-batches. The examples of a step depend only on the
    global batch size, so 2 ranks x 1, 1 rank x 2 and 1 x 1 x 2 accumulations train alike."""

    micro_batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    examples: int
    padded: int
    _epoch_cache: tuple = field(default=(None, None), repr=False, compare=False)

    @staticmethod
    def make(examples: int, *, micro_batch_size: int, grad_accum: int, world_size: int, epochs: float,
             max_steps) -> "StepPlan":
        per_rank_step = micro_batch_size * grad_accum
        steps_per_epoch = -(-examples // (per_rank_step * world_size))
        total = max_steps or max(1, int(epochs * steps_per_epoch))
        return StepPlan(micro_batch_size, grad_accum, steps_per_epoch, total, examples,
                        padded_example_count(examples, per_rank_step, world_size))

    def describe(self) -> str:
        return (f"{self.examples} examples, {self.micro_batch_size} per micro-batch, {self.grad_accum} micro-batches "
                f"per step: {self.steps_per_epoch} steps per epoch ({self.padded} examples repeated to fill the last "
                f"step), {self.total_steps} steps")

    def micro_batches(self, train_set, step: int, rank: int, world_size: int, seed: int) -> List[list]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, micro_batches(train_set, self.micro_batch_size * self.grad_accum, seed=seed,
                                                      epoch=epoch, rank=rank, world_size=world_size))
        examples = self._epoch_cache[1][position]
        return [examples[k * self.micro_batch_size:(k + 1) * self.micro_batch_size] for k in range(self.grad_accum)]
