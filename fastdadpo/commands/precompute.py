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
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from fastdadpo.base import collectives
from fastdadpo.base.cache import ContentCache
from fastdadpo.base.progress import StageProgress
from fastdadpo.core.losses import sequence_logps
from fastdadpo.core.sampler import shard_rounds
from fastdadpo.kernels import fused_linear_logprobs
from fastdadpo.models.fingerprint import model_fingerprint
from fastdadpo.models.loading import head_logit_options, load_tokenizer
from fastdadpo.models.served import ServedModel, in_flight, probe_matches


def cached(cache_dir: str, key: dict, compute: Callable[[], torch.Tensor], is_main: bool,
           broadcast: Callable, log: Optional[Callable[[str], None]] = None, probe: Optional[list] = None
           ) -> torch.Tensor:
    """Load the tensor for ``key`` from the cache, or compute it (collectively) and store it. Rank 0
    reads and checks the entry and sends its table (small: [rows, 2]) to every rank, so all ranks
    take the same branch; an entry that fails the check is said once (``log``, else stderr) and rebuilt.
    ``probe``: a served model's answer to the identity probe, stored with the entry; an entry whose
    model answered otherwise (other weights behind the same name) is computed again."""
    cache = ContentCache(os.path.join(cache_dir, "logps"), "cached log-probs", log)
    entry = cache.load(key, "computing them again") if is_main else None
    if entry is not None and probe is not None and not probe_matches((entry[1] or {}).get("probe"), probe):
        (log or print)(f"the served model {key['model'].get('id')!r} answers otherwise than when its cached log-probs "
                       f"were computed (other weights under the same name): computing them again")
        entry = None
    table = broadcast(entry[0]["table"] if entry is not None else None)
    if table is not None:
        return table
    table = compute()
    if is_main:
        cache.store(key, {"table": table}, document=None if probe is None else {"probe": probe})
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


def served_sequence_logps_table(served, examples: List, *, uses_rejected: bool, rank: int, world_size: int,
                                gather: Callable) -> torch.Tensor:
    """``sequence_logps_table`` from a server (``models.served``): each rank asks for its share of
    the examples, ``served.settings.concurrency`` requests in flight, one per sequence (prompt +
    response, the exact token ids trained on); a response's log-prob is the sum over its tokens."""
    def sums(example) -> tuple:
        values = []
        for response in (example.chosen_ids, example.rejected_ids if uses_rejected else None):
            if not response:
                values.append(0.0)
                continue
            token_logps = served.prompt_logprobs(list(example.prompt_ids) + list(response))
            values.append(math.fsum(token_logps[len(example.prompt_ids) - 1:]))
        return example.index, values

    share = examples[rank::world_size]
    rows = []
    with StageProgress(len(share), "log-probs", "examples", active=rank == 0) as progress:
        for row in in_flight(sums, share, served.settings.concurrency):
            rows.append(row)
            progress.update()
    table = torch.zeros(max((example.index for example in examples), default=-1) + 1, 2)
    for part in gather(rows):
        for index, (chosen, rejected) in part:
            table[index] = torch.tensor([chosen, rejected])
    return table


def training_tables(config, engine, student, splits: dict, collate: Callable, dist, dtype, log) -> dict:
    """{(name, split): [rows, 2] table} of the cached sequence log-probs ``config.objective`` needs:
    π_ref's ("reference": ``model.reference``, or the starting student before any update) and the
    teacher's ("teacher"), each from a server where ``model.{name}_url`` names one. Collective;
    loaded from the cache when there, else computed once."""
    needs = config.objective.needs()
    paths = {"reference": config.model.reference or config.model.student, "teacher": config.model.teacher}
    wanted = [(name, paths[name]) for name in needs.cached]
    tables = {}
    for name, path in wanted:
        frozen, served = None, _served(config.model, name, path, log)
        for split, examples in splits.items():
            if not examples:
                continue
            # A served model counts by what its server lists (wherever it is served now); its answer to
            # the probe, stored with the entry, tells other weights under the same name.
            model = model_fingerprint(path) if served is None else {
                key: value for key, value in served.identity.items() if key not in ("url", "probe")}
            key = {"kind": "sequence_logps", "model": model, "data": data_fingerprint(examples),
                   "dtype": str(dtype) if served is None else "served", "uses_rejected": needs.uses_rejected,
                   "version": 1}

            def compute():
                nonlocal frozen
                log.info(f"computing {name} log-probs of {split} ({len(examples)} examples), cached for later runs")
                if served is not None:
                    return served_sequence_logps_table(served.model, examples, uses_rejected=needs.uses_rejected,
                                                       rank=dist.rank, world_size=dist.world_size,
                                                       gather=collectives.all_gather_object)
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
                                           collectives.broadcast_object, log=log.info,
                                           probe=None if served is None else served.identity["probe"])
        if frozen is not None:
            frozen.release()  # no reference model stays in memory during training
    return tables


@dataclass(frozen=True)
class _Served:
    model: ServedModel
    identity: dict


def _served(model_config, name: str, path: str, log) -> Optional[_Served]:
    """``model.{name}_url``'s model, reached, its tokenizer checked against ``model.{name}``'s, and its
    identity (which keys the cache); None when ``name`` is loaded here."""
    url = getattr(model_config, f"{name}_url")
    if not url:
        return None
    served = ServedModel(url, flag=f"model.{name}_url", settings=model_config.server, role=name,
                         name=getattr(model_config, f"{name}_model_name"))
    tokenizer = load_tokenizer(path, f"model.{name}")
    note = served.check_tokenizer(tokenizer)
    if note:
        log.info(note)
    log.info(f"the {name} is served at {served.server.display} as {served.name!r}: its log-probs come from there")
    return _Served(served, served.identity(tokenizer, require_logprobs=True))


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
