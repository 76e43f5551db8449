"""Sequence log-probs that never change during training, computed once and cached on disk.

π_ref (the starting student, by default) and, for daDPO, the teacher are frozen: Σ_t log π(y_t) of
every chosen and rejected response is computed in one pass before training and kept as a small
[examples, 2] table, so no reference model stays in memory during training. The cache key is a
fingerprint of the model's files and of the tokenized data, so a rerun (or a resumed run, or a
second objective on the same data) reuses it. An entry is a safetensors file (loading it runs no
code) that records its key and a digest of its contents: a truncated, corrupt or edited entry is
said once and rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch

from . import distributed, models
from .checkpoint import write_file_atomic
from .engines import build_frozen
from .kernels import fused_linear_logprobs
from .objectives import sequence_logps
from .sampler import shard_rounds

_SAMPLED_BLOCK = 1 << 20
_FULL_HASH_LIMIT = 2 << 30


def model_fingerprint(path: str) -> str:
    """Hash of a model directory's config and weights: whole files up to 2 GiB, above that each
    file's size, its safetensors header and 64 blocks spread over it (any fine-tune changes them)."""
    digest = hashlib.sha256()
    if not os.path.isdir(path):  # a hub name: its identity is the name
        digest.update(path.encode())
        return digest.hexdigest()[:16]
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".json"))
                   and not f.startswith(("tokenizer", "special_tokens", "generation_config")))
    total = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    for name in files:
        full = os.path.join(path, name)
        size = os.path.getsize(full)
        digest.update(f"{name}:{size}".encode())
        with open(full, "rb") as handle:
            if total <= _FULL_HASH_LIMIT:
                for block in iter(lambda: handle.read(_SAMPLED_BLOCK), b""):
                    digest.update(block)
            else:
                for k in range(64):
                    handle.seek(k * max(0, size - _SAMPLED_BLOCK) // 63)
                    digest.update(handle.read(_SAMPLED_BLOCK))
    return digest.hexdigest()[:16]


def data_fingerprint(examples: Sequence) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt_ids, example.chosen_ids, example.rejected_ids]).encode())
    return digest.hexdigest()[:16]


def _table_digest(key_text: str, table: torch.Tensor) -> str:
    digest = hashlib.sha256(key_text.encode())
    digest.update(f"{table.dtype}{tuple(table.shape)}".encode())
    digest.update(table.contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_cached_table(path: str, key_text: str):
    """(table, None) from a cache file, or (None, why it is not usable). A file is used only when its
    recorded key is ``key_text`` and its digest matches its contents (so a truncated, corrupt or
    edited file is rebuilt, never trusted); safetensors, so reading it runs no code."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        return None, None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            table = handle.get_tensor("table")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        return None, f"unreadable ({' '.join(str(exc).split())[:120]})"
    if metadata.get("key") != key_text:
        return None, "it was written for other inputs"
    if metadata.get("sha256") != _table_digest(key_text, table):
        return None, "its contents do not match their digest (truncated or edited)"
    return table, None


def write_cached_table(path: str, key_text: str, table: torch.Tensor) -> None:
    """Written whole or not at all (``checkpoint.write_file_atomic``): a kill leaves the old entry or none."""
    from safetensors.torch import save

    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = table.detach().cpu().contiguous()
    payload = save({"table": table}, metadata={"key": key_text, "sha256": _table_digest(key_text, table)})
    write_file_atomic(path, lambda handle: handle.write(payload), binary=True)


def cached(cache_dir: str, key: dict, compute: Callable[[], torch.Tensor], is_main: bool,
           broadcast: Callable, log: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """Load the tensor for ``key`` from the cache, or compute it (collectively) and store it. Rank 0
    reads and checks the entry and sends its table (small: [rows, 2]) to every rank, so all ranks
    take the same branch; an entry that fails the check is said once (``log``, else stderr) and rebuilt."""
    key_text = json.dumps(key, sort_keys=True)
    name = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, "logps", f"{name}.safetensors")
    table, problem = read_cached_table(path, key_text) if is_main else (None, None)
    if problem is not None:
        message = f"cached log-probs {path}: {problem}; computing them again"
        (log or (lambda text: print(f"fastdadpo: {text}", file=sys.stderr, flush=True)))(message)
    table = broadcast(table)
    if table is not None:
        return table
    table = compute()
    if is_main:
        write_cached_table(path, key_text, table)
    return table


def sequence_logps_table(token_logps_fn: Callable, examples: List, *, collate: Callable,
                         micro_batch_size: int, rank: int, world_size: int, gather: Callable,
                         device: torch.device) -> torch.Tensor:
    """[rows, 2] float32, indexed by each example's ``index`` (its row in the loaded data, which
    counts rows tokenization dropped): Σ log π of its chosen and rejected response (rejected
    column 0 for chosen-only data). ``token_logps_fn(batch)`` gives a batch's [R, T] token log-probs
    of its targets (0 off the responses). Collective: every rank runs the same number of micro-batches
    (``sampler.shard_rounds``; a rank out of examples runs example 0 and drops it), so ZeRO-3 ranks stay in step."""
    rows, values = [], []
    for indices in shard_rounds(len(examples), micro_batch_size, rank, world_size):
        batch = collate([examples[i] for i in indices or [0]]).to(device)
        with torch.no_grad():
            sums = sequence_logps(token_logps_fn(batch), batch.target_sequence, batch.num_sequences)
        chosen, rejected = batch.split_pairs(sums)
        rejected = rejected if batch.has_rejected else torch.zeros_like(chosen)
        for j, index in enumerate(indices):
            rows.append(examples[index].index)
            values.append((float(chosen[j]), float(rejected[j])))
    table = torch.zeros(max((example.index for example in examples), default=-1) + 1, 2)
    for part_rows, part_values in gather((rows, values)):
        for index, pair in zip(part_rows, part_values):
            table[index] = torch.tensor(pair)
    return table


# --- what a training run caches ------------------------------------------------------------------------------

def training_tables(config, engine, splits: dict, collate: Callable, dist, dtype, log) -> dict:
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
                    token_logps = _student_token_logps(engine, config.kernels.settings())  # π_ref = the starting student, before any update
                else:
                    if frozen is None:
                        frozen = build_frozen(path, key=f"model.{name}", dtype=dtype, device=dist.device,
                                              offload=config.deepspeed.teacher_offload, extra=config.deepspeed.extra,
                                              liger_kernels=config.model.liger_kernels)
                    token_logps = _frozen_token_logps(frozen, config.kernels.settings())
                return sequence_logps_table(
                    token_logps, examples, collate=collate, micro_batch_size=config.train.micro_batch_size,
                    rank=dist.rank, world_size=dist.world_size, gather=distributed.all_gather_object, device=dist.device)

            tables[(name, split)] = cached(config.data.resolved_cache_dir(), key, compute, dist.is_main,
                                           distributed.broadcast_object, log=log.info)
        if frozen is not None:
            frozen.release()  # no reference model stays in memory during training
    return tables


def _student_token_logps(engine, kernels):
    logit_options = {**models.head_logit_options(engine.module.model.config, "model.student"),
                     **kernels.call_options()}

    def token_logps(batch):
        engine.eval()
        return engine(batch.input_ids, batch.attention_mask, batch.position_ids,
                      lambda hidden, head: fused_linear_logprobs(hidden, head, batch.targets, **logit_options))

    return token_logps


def _frozen_token_logps(frozen, kernels):
    def token_logps(batch):
        hidden = frozen.hidden(batch.input_ids, batch.attention_mask, batch.position_ids)
        return fused_linear_logprobs(hidden, frozen.head, batch.targets, softcap=frozen.softcap,
                                     logit_scale=frozen.logit_scale, **kernels.call_options())

    return token_logps
