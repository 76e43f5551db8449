"""Sequence log-probs that never change during training, computed once and cached on disk.

π_ref (the starting student, by default) and, for daDPO, the teacher are frozen: Σ_t log π(y_t) of
every chosen and rejected response is computed in one pass before training and kept as a small
[examples, 2] table, so no reference model stays in memory during training. The cache key is a
fingerprint of the model's files and of the tokenized data, so a rerun (or a resumed run, or a
second objective on the same data) reuses it; the entries live in the content-addressed cache
(``fastdadpo.base.cache``), which rebuilds a truncated, corrupt or edited one, never trusting it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, List, Optional, Sequence

import torch

from fastdadpo.base import collectives
from fastdadpo.base.cache import ContentCache
from fastdadpo.base.progress import StageProgress
from fastdadpo.core.losses import sequence_logps
from fastdadpo.core.sampler import shard_rounds
from fastdadpo.kernels import fused_linear_logprobs
from fastdadpo.models.fingerprint import model_fingerprint
from fastdadpo.models.loading import head_logit_options


def cached(cache_dir: str, key: dict, compute: Callable[[], torch.Tensor], is_main: bool,
           broadcast: Callable, log: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """Load the tensor for ``key`` from the cache, or compute it (collectively) and store it. Rank 0
    reads and checks the entry and sends its table (small: [rows, 2]) to every rank, so all ranks
    take the same branch; an entry that fails the check is said once (``log``, else stderr) and rebuilt."""
    cache = ContentCache(os.path.join(cache_dir, "logps"), "cached log-probs", log)
    entry = cache.load(key, "computing them again") if is_main else None
    table = broadcast(entry[0]["table"] if entry is not None else None)
    if table is not None:
        return table
    table = compute()
    if is_main:
        cache.store(key, {"table": table})
    return table


def data_fingerprint(examples: Sequence) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt_ids, example.chosen_ids, example.rejected_ids]).encode())
    return digest.hexdigest()[:16]


def sequence_logps_table(token_logps_fn: Callable, examples: List, *, collate: Callable,
                         micro_batch_size: int, rank: int, world_size: int, gather: Callable,
                         device: torch.device, show_progress: bool = True) -> torch.Tensor:
    """[rows, 2] float32, indexed by each example's ``index`` (its row in the loaded data, which
    counts rows tokenization dropped): Σ log π of its chosen and rejected response (rejected
    column 0 for chosen-only data). ``token_logps_fn(batch)`` gives a batch's [R, T] token log-probs
    of its targets (0 off the responses). Collective: every rank runs the same number of micro-batches
    (``sampler.shard_rounds``; a rank out of examples runs example 0 and drops it), so ZeRO-3 ranks stay in step."""
    rows, values = [], []
    rounds = list(shard_rounds(len(examples), micro_batch_size, rank, world_size))
    progress = StageProgress(len(rounds), "log-probs", "batches", active=rank == 0 and show_progress)
    for indices in rounds:
        progress.update()
        batch = collate([examples[i] for i in indices or [0]]).to(device)
        with torch.no_grad():
            sums = sequence_logps(token_logps_fn(batch), batch.target_sequence, batch.num_sequences)
        chosen, rejected = batch.split_pairs(sums)
        rejected = rejected if batch.has_rejected else torch.zeros_like(chosen)
        for j, index in enumerate(indices):
            rows.append(examples[index].index)
            values.append((float(chosen[j]), float(rejected[j])))
    progress.close()
    table = torch.zeros(max((example.index for example in examples), default=-1) + 1, 2)
    for part_rows, part_values in gather((rows, values)):
        for index, pair in zip(part_rows, part_values):
            table[index] = torch.tensor(pair)
    return table


def training_tables(config, engine, student, splits: dict, collate: Callable, dist, dtype, log) -> dict:
    """{(name, split): [rows, 2] table} of the cached sequence log-probs ``config.objective`` needs:
    π_ref's ("reference": ``model.reference``, or the starting student before any update) and the
    teacher's ("teacher"). Collective; loaded from the cache when there, else computed once."""
    needs = config.objective.needs()
    paths = {"reference": config.model.reference or config.model.student, "teacher": config.model.teacher}
    wanted = [(name, paths[name]) for name in needs.cached]
    tables = {}
    for name, path in wanted:
        frozen = None
        for split, examples in splits.items():
            if not examples:
                continue
            key = {"kind": "sequence_logps", "model": model_fingerprint(path), "data": data_fingerprint(examples),
                   "dtype": str(dtype), "uses_rejected": needs.uses_rejected, "version": 1}

            def compute():
                nonlocal frozen
                log.info(f"computing {name} log-probs of {split} ({len(examples)} examples), cached for later runs")
                if name == "reference" and not config.model.reference:
                    token_logps = _student_token_logps(student, config.kernels.settings())  # π_ref = the starting student, before any update
                else:
                    if frozen is None:
                        frozen = engine.build_frozen(path, key=f"model.{name}", dtype=dtype, device=dist.device,
                                                     liger_kernels=config.model.liger_kernels)
                    token_logps = _frozen_token_logps(frozen, config.kernels.settings())
                return sequence_logps_table(
                    token_logps, examples, collate=collate, micro_batch_size=config.train.micro_batch_size,
                    rank=dist.rank, world_size=dist.world_size, gather=collectives.all_gather_object, device=dist.device)

            tables[(name, split)] = cached(config.data.resolved_cache_dir(), key, compute, dist.is_main,
                                           collectives.broadcast_object, log=log.info)
        if frozen is not None:
            frozen.release()  # no reference model stays in memory during training
    return tables


def _student_token_logps(student, kernels):
    logit_options = {**head_logit_options(student.model.config, "model.student"), **kernels.call_options()}

    def token_logps(batch):
        student.eval()
        return student(batch.input_ids, batch.attention_mask, batch.position_ids,
                      lambda hidden, head: fused_linear_logprobs(hidden, head, batch.targets, **logit_options))

    return token_logps


def _frozen_token_logps(frozen, kernels):
    def token_logps(batch):
        hidden = frozen.hidden(batch.input_ids, batch.attention_mask, batch.position_ids)
        return fused_linear_logprobs(hidden, frozen.head, batch.targets, softcap=frozen.softcap,
                                     logit_scale=frozen.logit_scale, **kernels.call_options())

    return token_logps
