"""Checkpoints that are either complete or invisible, and resuming from them, whatever the engine.

``checkpoints/step-N/`` holds the engine's state under ``state/`` (weights, optimizer and scheduler
shards of every rank, written by the engine through ``fastdadpo.engine.state``), every rank's RNG
state, and ``complete.json`` (step, world size). It is written as ``checkpoints/.step-N.partial/``,
every file fsynced, and renamed once every rank has finished writing (the directory fsynced after):
a crash mid-save leaves only a ``.partial`` directory, which resuming ignores. The data position is
the step itself: the sampler is a pure function of (seed, step).

A write that fails (a full disk) removes the partial checkpoint and ends the run with a UserError
naming the path and the last good checkpoint; ``rotate`` keeps the newest K complete ones.
``write_final`` writes ``final/`` the same way: whole, or not at all.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from typing import Callable, Optional, Sequence

import torch

from fastdadpo.base.collectives import all_agree, barrier
from fastdadpo.base.errors import ConfigError, UserError
from fastdadpo.base.files import fsync_path, seal_directory, write_json_atomic
from fastdadpo.engine.state import UnsafeState, load_rng_state, load_weights_only, save_rng_state
from fastdadpo.models.lora import merge_lora_state, save_lora_adapter

COMPLETE = "complete.json"


TAG = "state"


_STEP_DIR = re.compile(r"^step-(\d+)$")


_DEAD_DIR = re.compile(r"^\.step-(\d+)\.(partial|deleting)$")


class CheckpointWriteFailed(UserError):
    pass


def _rng_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rng-rank{rank}.safetensors")


def _write_failure(final: str, exc: Optional[OSError], output_dir: str) -> str:
    last = latest(output_dir)
    what = (f"{exc.strerror or exc} ({exc.filename})" if exc is not None and exc.filename else
            f"{exc}" if exc is not None else "another rank could not write its part")
    return (f"cannot write the checkpoint {final}: {what}. The partial checkpoint was removed and the earlier "
            f"ones are intact; the last good checkpoint is {last or 'none (none was written yet)'}. Free space "
            f"(train.keep_checkpoints keeps only the newest K) and continue with --set train.resume=true")


def save(write_state: Callable[[str], Optional[OSError]], output_dir: str, step: int, rank: int, world_size: int,
         device: torch.device, extra: Optional[dict] = None) -> str:
    """Collective: every rank calls it at the same step. ``write_state(directory)`` is the engine's
    (collective) write of its state into ``directory``, returning the OSError it met, if any. Returns
    the checkpoint's final path. An OSError on any rank (ENOSPC, EIO, a read-only filesystem)
    removes the partial checkpoint and raises CheckpointWriteFailed on every rank."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{step}")
    partial = os.path.join(root, f".step-{step}.partial")
    error: Optional[OSError] = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        except OSError as exc:
            error = exc
    barrier()
    error = error or write_state(os.path.join(partial, TAG))
    if error is None:
        try:
            save_rng_state(_rng_path(partial, rank))
        except OSError as exc:
            error = exc
    if all_agree(error is None, device) and rank == 0:
        try:
            write_json_atomic(os.path.join(partial, COMPLETE), {"step": step, "world_size": world_size,
                                                                **(extra or {})})
            for directory in (os.path.join(partial, TAG), partial):
                if os.path.isdir(directory):
                    fsync_path(directory)
            _replace_dir(partial, final)
            fsync_path(root)
        except OSError as exc:
            error = exc
    if not all_agree(error is None, device):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
        raise CheckpointWriteFailed(_write_failure(final, error, output_dir))
    return final


def _replace_dir(partial: str, final: str) -> None:
    """``final`` becomes ``partial``; an existing ``final`` (the same step saved by an earlier run)
    stays complete until the new one is in place."""
    if not os.path.exists(final):
        os.replace(partial, final)
        return
    old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.deleting")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def _complete_checkpoints(root: str) -> list:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    steps = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        match = _STEP_DIR.match(name)
        if match and os.path.exists(os.path.join(root, name, COMPLETE)):
            steps.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(steps)


def rotate(output_dir: str, keep: int, is_main: bool) -> list:
    """Keep the newest ``keep`` complete checkpoints (0 keeps all) and delete the older ones, and
    the leftovers of interrupted saves and deletions older than the newest complete one. Only
    complete checkpoints count, so a failed save never costs a good one. Rank 0 deletes (the
    others return at once); each doomed directory is renamed first, so a kill mid-delete never
    leaves a half-deleted ``step-N``. Returns the deleted paths."""
    if not is_main:
        return []
    root = os.path.join(output_dir, "checkpoints")
    complete = _complete_checkpoints(root)
    if not complete:
        return []
    doomed = [path for _, path in complete[:-keep]] if keep and keep > 0 else []
    newest = complete[-1][0]
    for name in os.listdir(root):
        match = _DEAD_DIR.match(name)
        if match and (match.group(2) == "deleting" or int(match.group(1)) <= newest):
            doomed.append(os.path.join(root, name))
    for path in doomed:
        name = os.path.basename(path)
        trash = path if name.startswith(".") else os.path.join(root, f".{name}.deleting")
        if trash != path:
            os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_path(root)
    return doomed


def latest(output_dir: str) -> Optional[str]:
    complete = _complete_checkpoints(os.path.join(output_dir, "checkpoints"))
    return complete[-1][1] if complete else None


def resolve_resume(resume, output_dir: str) -> Optional[str]:
    """``train.resume``: false → None; true → the latest complete checkpoint (None if there is none
    yet, so a first run with resume=true just starts); a path → that checkpoint, which must be complete."""
    if resume is False or resume is None:
        return None
    if resume is True:
        return latest(output_dir)
    path = str(resume)
    if not os.path.exists(os.path.join(path, COMPLETE)):
        raise ConfigError(f"train.resume: {path} is not a complete fastdadpo checkpoint (no {COMPLETE}); "
                          f"complete ones are under {os.path.join(output_dir, 'checkpoints')}/step-N")
    return path


def check_loadable(path: str, rank: int, safe_globals: Sequence[type] = ()) -> None:
    """Every state file of checkpoint ``path`` this rank may read: the structures load with
    weights_only=True (and the engine's allow-list), the safetensors files parse whole, this rank's
    RNG state is there. Raises UnsafeState naming the first file that fails (before the engine reads
    anything)."""
    from safetensors import SafetensorError, safe_open

    state_dir = os.path.join(path, TAG)
    names = sorted(os.listdir(state_dir)) if os.path.isdir(state_dir) else []
    if not any(name.endswith(".pt") for name in names):
        raise UnsafeState(f"{path}: holds no engine state under {TAG}/; it is not a complete fastdadpo checkpoint")
    legacy = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.exists(legacy) and not os.path.exists(_rng_path(path, rank)):
        raise UnsafeState(f"{legacy}: a checkpoint of an earlier fastdadpo, whose RNG state is pickled; loading it "
                          f"could run code, so it is refused. Start a new run (its weights: export them with that "
                          f"version)")
    for name in names:
        full = os.path.join(state_dir, name)
        if name.endswith(".pt"):
            load_weights_only(full, safe_globals)
        elif name.endswith(".safetensors"):
            try:
                with safe_open(full, framework="pt") as handle:
                    handle.keys()
            except (SafetensorError, OSError) as exc:
                raise UnsafeState(f"{full}: cannot be read as safetensors ({' '.join(str(exc).split())[:160]}); it "
                                  f"is truncated or corrupt. Delete the checkpoint and resume from an earlier one") \
                    from None
    if not os.path.exists(_rng_path(path, rank)):
        raise UnsafeState(f"{path}: has no RNG state for rank {rank} ({os.path.basename(_rng_path(path, rank))}); "
                          f"it is not a complete fastdadpo checkpoint")


def load(read_state: Callable[[str], None], path: str, rank: int, world_size: int, device: torch.device,
         safe_globals: Sequence[type] = (), reshards: bool = False) -> int:
    """Collective. Restores the engine (``read_state(directory)``: weights, optimizer, scheduler)
    and this rank's RNG; returns the step. Every rank checks the files first and all agree, so a
    refused file ends every rank with the same error instead of leaving some waiting in the
    engine's collectives. An engine that ``reshards`` reads a checkpoint written by another number
    of ranks (a rank the writer did not have takes rank 0's RNG state)."""
    try:
        with open(os.path.join(path, COMPLETE), encoding="utf-8") as handle:
            info = json.load(handle)
        step, ranks = int(info["step"]), int(info["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"train.resume: {os.path.join(path, COMPLETE)} is unreadable ({exc}); resume from "
                          f"another checkpoint") from None
    if ranks != world_size and not reshards:
        raise ConfigError(f"train.resume: {path} was written by {ranks} ranks; resume it with "
                          f"the same number (this run has {world_size})")
    rng_rank = rank if rank < ranks else 0
    problem = None
    try:
        check_loadable(path, rng_rank, safe_globals)
    except UnsafeState as exc:
        problem = str(exc)
    if not all_agree(problem is None, device):
        raise UnsafeState(problem or f"train.resume: another rank refused a file of {path} (its message names it)")
    read_state(os.path.join(path, TAG))
    load_rng_state(_rng_path(path, rng_rank))
    return step


class ExportFailed(UserError):
    pass


def run_identity(path: str) -> Optional[dict]:
    """What defines the run that wrote checkpoint ``path`` (recorded at save), or None for a
    checkpoint that recorded none."""
    try:
        with open(os.path.join(path, COMPLETE), encoding="utf-8") as handle:
            recorded = json.load(handle).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


def export_agreed(state: Optional[dict], student_model, tokenizer, output_dir: str, is_main: bool,
                  device: torch.device, lora=None, base_model: str = "", dtype: Optional[torch.dtype] = None) -> str:
    """Collective: rank 0 writes ``final/`` (``write_final``) from the wrapped student's full state
    dict (its keys under the wrapper's ``model.``; floating tensors cast to ``dtype`` when given);
    a failure (a full disk) ends every rank together as one paragraph; the checkpoint written at the
    last step stays, so the export can be run again by resuming."""
    final, error = os.path.join(output_dir, "final"), None
    if is_main:
        prefix = "model."  # fastdadpo.engine.modules.StudentWithObjective holds the model as ``model``
        state = {(k[len(prefix):] if k.startswith(prefix) else k):
                 (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
        try:
            final = write_final(state, student_model, tokenizer, output_dir, lora=lora, base_model=base_model)
        except Exception as exc:  # noqa: BLE001 (OSError, safetensors' and transformers' write errors alike)
            error = exc
            shutil.rmtree(os.path.join(output_dir, ".final.partial"), ignore_errors=True)
    if not all_agree(error is None, device):
        what = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}" if error is not None else \
            "rank 0 could not write it"
        raise ExportFailed(f"cannot write the final model to {final} ({what}); nothing partial was left there. The "
                           f"training itself is complete: its last checkpoint is {latest(output_dir) or 'none'}. "
                           f"Free space and run the same command with --set train.resume=true: it resumes at the "
                           f"last step and exports again")
    barrier()
    return final


def write_final(state: Optional[dict], student_model, tokenizer, output_dir: str, lora=None,
                base_model: str = "") -> str:
    """Rank 0, with the full state dict (``model.state_dict()`` keys) its engine gathered: ``final/``,
    a Hugging Face model directory written as ``.final.partial`` and renamed, so it is visible only
    when complete; with LoRA adapters, the merged model, and the adapter alone in
    ``final-adapter/``. Returns the path of ``final/``."""
    final, partial = os.path.join(output_dir, "final"), os.path.join(output_dir, ".final.partial")
    shutil.rmtree(partial, ignore_errors=True)
    # Made here, not by save_pretrained, which only logs a path it cannot use and writes nothing.
    os.makedirs(partial)
    if lora is not None:
        state, adapter = merge_lora_state(state, lora)
        adapter_dir = os.path.join(output_dir, "final-adapter")
        shutil.rmtree(adapter_dir, ignore_errors=True)
        save_lora_adapter(adapter_dir, adapter, lora, base_model)
    student_model.save_pretrained(partial, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if not any(name.endswith(".safetensors") for name in os.listdir(partial)):
        raise OSError(errno.EIO, "no weights were written", partial)
    seal_directory(partial)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_path(output_dir)
    return final
