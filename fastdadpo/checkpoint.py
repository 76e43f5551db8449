"""Checkpoints that are either complete or invisible, and resuming from them.

``checkpoints/step-N/`` holds the student engine's DeepSpeed state (weights, optimizer and scheduler
shards of every rank), every rank's RNG state, and ``complete.json`` (step, world size). It is
written as ``checkpoints/.step-N.partial/`` and renamed once every rank has finished writing: a
crash mid-save leaves only a ``.partial`` directory, which resuming ignores. The data position is
the step itself: the sampler is a pure function of (seed, step).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from .distributed import barrier
from .errors import ConfigError

COMPLETE = "complete.json"
TAG = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """``path`` holds either its old content or all of ``text``, never a part (a killed writer)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))


def save(engine, output_dir: str, step: int, rank: int, world_size: int, extra: Optional[dict] = None) -> str:
    """Collective: every rank calls it at the same step. Returns the checkpoint's final path."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{step}")
    partial = os.path.join(root, f".step-{step}.partial")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        if os.path.exists(final):  # the same step saved before (e.g. a rerun): replace it whole
            shutil.rmtree(final)
    barrier()
    engine.save_checkpoint(partial, tag=TAG, client_state={"step": step})
    torch.save(rng_state(), os.path.join(partial, f"rng-rank{rank}.pt"))
    barrier()
    if rank == 0:
        write_json_atomic(os.path.join(partial, COMPLETE), {"step": step, "world_size": world_size, **(extra or {})})
        os.replace(partial, final)
        _fsync_dir(root)
    barrier()
    return final


def latest(output_dir: str) -> Optional[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.exists(os.path.join(root, name, COMPLETE)):
            steps.append((int(match.group(1)), os.path.join(root, name)))
    return max(steps)[1] if steps else None


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


def load(engine, path: str, rank: int, world_size: int) -> int:
    """Collective. Restores the engine (weights, optimizer, scheduler) and this rank's RNG; returns the step."""
    with open(os.path.join(path, COMPLETE), encoding="utf-8") as handle:
        info = json.load(handle)
    if info["world_size"] != world_size:
        raise ConfigError(f"train.resume: {path} was written by {info['world_size']} ranks; resume it with "
                          f"the same number (this run has {world_size})")
    loaded, _ = engine.load_checkpoint(path, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise ConfigError(f"train.resume: DeepSpeed could not load the engine state from {path}")
    set_rng_state(torch.load(os.path.join(path, f"rng-rank{rank}.pt"), weights_only=False))
    return int(info["step"])
