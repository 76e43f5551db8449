"""Checkpoints that are either complete or invisible, hold no pickled code, and resuming from them.

``checkpoints/step-N/`` holds the student engine's DeepSpeed state (weights, optimizer and scheduler
shards of every rank), every rank's RNG state, and ``complete.json`` (step, world size). It is
written as ``checkpoints/.step-N.partial/``, every file fsynced, and renamed once every rank has
finished writing (the directory fsynced after): a crash mid-save leaves only a ``.partial``
directory, which resuming ignores. The data position is the step itself: the sampler is a pure
function of (seed, step).

Format. Nothing in a checkpoint is unpickled with code: DeepSpeed writes through
``SafeCheckpointEngine``, which stores every tensor of a state (the weights, the optimizer's
moments) in a ``.safetensors`` file and the rest (scheduler, step counters, DeepSpeed's bookkeeping)
as a ``.pt`` structure that loads with ``torch.load(weights_only=True)``: tensors, plain containers,
numbers, strings, and the few DeepSpeed classes of ``deepspeed_safe_globals()``. The RNG states are
safetensors too (numbers in its metadata). A file that needs anything else is refused, naming it.
A write that fails (a full disk) removes the partial checkpoint and ends the run with a UserError
naming the path and the last good checkpoint; ``rotate`` keeps the newest K complete ones.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from .distributed import all_reduce_sum, barrier
from .errors import ConfigError, UserError

COMPLETE = "complete.json"
TAG = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DEAD_DIR = re.compile(r"^\.step-(\d+)\.(partial|deleting)$")
_TENSOR_REF = "\x00fastdadpo-tensor:"  # stands for a tensor of the .safetensors file in a state's structure


class UnsafeState(UserError):
    """A state file that needs more than tensors and plain containers to load, or cannot be read."""


class CheckpointWriteFailed(UserError):
    pass


def _all_agree(ok: bool, device) -> bool:
    """True on every rank iff ``ok`` on every rank (a decision all ranks must share)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    return float(all_reduce_sum(flag)) == 0.0


# --- files written whole, then synced ----------------------------------------------------------------------

def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fsync_dir = _fsync_path


def write_file_atomic(path: str, write, binary: bool = False) -> None:
    """``path`` holds either its old content or all of what ``write(handle)`` wrote, never a part (a
    killed writer); synced to disk before the rename, and the directory after. Writers racing for
    one path (ranks) each write their own temporary file: whichever renames last is the file, whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path: str, text: str) -> None:
    write_file_atomic(path, lambda handle: handle.write(text))


def write_json_atomic(path: str, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))


# --- state files: tensors in safetensors, the rest loadable with weights_only=True -------------------------

def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed (0.19) puts in a ZeRO 0/1/2/3 checkpoint besides tensors and plain
    containers: its loss scalers (plain numbers inside), the fragment addresses of ZeRO-2 partitions
    (two ints) and the ZeRO stage enum. Each is rebuilt from its attributes, without running code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _save_tensors(tensors: dict, path: str, metadata: dict) -> None:
    """safetensors' ``save_file``, fsynced; its I/O errors (a full disk) raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None
    _fsync_path(path)


def _tensors_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".safetensors"


def save_state(state, path: str) -> None:
    """``path``: ``state`` with each tensor replaced by a reference; beside it, ``STEM.safetensors``:
    the tensors (CPU copies; a tensor met twice is stored once). Both fsynced."""
    tensors: dict = {}
    names: dict = {}  # id(tensor) -> its name in the file
    storages: set = set()

    def strip(value):
        if torch.is_tensor(value):
            name = names.get(id(value))
            if name is None:
                tensor = value.detach().to("cpu").contiguous()
                pointer = tensor.untyped_storage().data_ptr()
                if tensor.numel() == 0 or pointer in storages:  # safetensors refuses shared memory
                    tensor = tensor.clone()
                storages.add(tensor.untyped_storage().data_ptr())
                name = names[id(value)] = str(len(tensors))
                tensors[name] = tensor
            return _TENSOR_REF + name
        return _map_containers(value, strip)

    buffer = io.BytesIO()  # the structure is small; written with plain file I/O, whose errors are OSErrors
    torch.save(strip(state), buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    if tensors:
        _save_tensors(tensors, _tensors_path(path), {"format": "pt", "writer": "fastdadpo"})


def _refusal(path: str, exc: BaseException) -> str:
    detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
    found = re.search(r"GLOBAL ([\w.]+)", detail)
    return (f"{path}: refused to load: it holds more than tensors and plain containers"
            f"{f' (it names {found.group(1)})' if found else ''}, and unpickling that could run code. A fastdadpo "
            f"checkpoint or cache never does; this file was written by something else, or tampered with. "
            f"Delete it (or the checkpoint directory) and start from a checkpoint you trust")


def load_weights_only(path: str):
    """A ``torch.save`` file loaded with ``weights_only=True`` (and DeepSpeed's allow-list), or an
    UnsafeState naming the file."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeState(_refusal(path, exc)) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise UnsafeState(f"{path}: cannot be read ({' '.join(str(exc).split())[:200]}); it is truncated or "
                          f"corrupt. Delete the checkpoint it belongs to and resume from an earlier one") from None


def _load_tensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UnsafeState(f"{path}: cannot be read as safetensors ({' '.join(str(exc).split())[:200]}); it is "
                          f"missing, truncated or corrupt. Delete the checkpoint it belongs to and resume from an "
                          f"earlier one") from None


def load_state(path: str):
    """What ``save_state`` wrote (also a plain tensor file loadable with weights_only=True)."""
    structure = load_weights_only(path)
    tensors = None

    def restore(value):
        nonlocal tensors
        if isinstance(value, str) and value.startswith(_TENSOR_REF):
            if tensors is None:
                tensors = _load_tensors(_tensors_path(path))
            name = value[len(_TENSOR_REF):]
            if name not in tensors:
                raise UnsafeState(f"{_tensors_path(path)}: has no tensor {name!r}, which {path} refers to; the "
                                  f"two files do not belong together")
            return tensors[name]
        return _map_containers(value, restore)

    return restore(structure)


def _map_containers(value, leaf):
    """``value`` with ``leaf`` applied to the items of its dicts, lists and tuples (kept as those
    types, ordered dicts too); anything else as it is."""
    if isinstance(value, dict):
        out = OrderedDict() if isinstance(value, OrderedDict) else {}
        for key, item in value.items():
            out[key] = leaf(item)
        return out
    if isinstance(value, list):
        return [leaf(item) for item in value]
    if type(value) is tuple:
        return tuple(leaf(item) for item in value)
    return value


def _checkpoint_engine_class():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SafeCheckpointEngine(CheckpointEngine):
        """DeepSpeed's reads and writes of a checkpoint, through ``save_state``/``load_state``. A
        failed write is recorded, not raised: DeepSpeed's collectives around it go on on every rank,
        and ``save`` then ends the run on all of them together."""

        def __init__(self):
            super().__init__(None)
            self.name = "fastdadpo.SafeCheckpointEngine"
            self.error: Optional[OSError] = None

        def create(self, info):
            pass

        def makedirs(self, path, exist_ok=False):
            try:
                os.makedirs(path, exist_ok=exist_ok)
            except OSError as exc:
                self.error = self.error or exc

        def save(self, state_dict, path: str):
            if self.error is not None:
                return
            try:
                save_state(state_dict, path)
            except OSError as exc:
                self.error = exc

        def load(self, path: str, map_location=None):
            return load_state(path)

        def commit(self, info):
            return True

        def preserves_storage_sharing(self):
            return False  # save_state copies what safetensors needs copied; DeepSpeed need not clone everything

    return SafeCheckpointEngine


def _safe_writer(engine):
    """The engine's checkpoint engine, made a SafeCheckpointEngine (once)."""
    cls = getattr(_safe_writer, "cls", None) or _checkpoint_engine_class()
    _safe_writer.cls = cls
    if not isinstance(getattr(engine, "checkpoint_engine", None), cls):
        engine.checkpoint_engine = cls()
        # zero_to_fp32.py and friends cannot read this format: not copied into checkpoints.
        engine._copy_recovery_script = lambda save_path: None
    return engine.checkpoint_engine


# --- RNG states ---------------------------------------------------------------------------------------------

def _rng_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rng-rank{rank}.safetensors")


def save_rng_state(path: str) -> None:
    """Python's, numpy's and torch's (CPU, CUDA) generators: the states as tensors, the scalars as JSON."""
    version, python_state, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"python": torch.tensor(python_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(key, dtype=np.int64)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    scalars = {"python_version": version, "python_gauss_next": gauss_next, "numpy_kind": kind, "numpy_pos": int(pos),
               "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached_gaussian)}
    _save_tensors(tensors, path, {"scalars": json.dumps(scalars)})


def load_rng_state(path: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            scalars = json.loads((handle.metadata() or {})["scalars"])
        random.setstate((scalars["python_version"], tuple(tensors["python"].tolist()), scalars["python_gauss_next"]))
        np.random.set_state((scalars["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), scalars["numpy_pos"],
                             scalars["numpy_has_gauss"], scalars["numpy_cached_gaussian"]))
        torch.set_rng_state(tensors["torch"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UnsafeState(f"{path}: not a readable RNG state ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:160]}); it is missing, truncated or corrupt. Delete the "
                          f"checkpoint it belongs to and resume from an earlier one") from None
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# --- saving, rotating, resuming -----------------------------------------------------------------------------

def _write_failure(final: str, exc: Optional[OSError], output_dir: str) -> str:
    last = latest(output_dir)
    what = (f"{exc.strerror or exc} ({exc.filename})" if exc is not None and exc.filename else
            f"{exc}" if exc is not None else "another rank could not write its part")
    return (f"cannot write the checkpoint {final}: {what}. The partial checkpoint was removed and the earlier "
            f"ones are intact; the last good checkpoint is {last or 'none (none was written yet)'}. Free space "
            f"(train.keep_checkpoints keeps only the newest K) and continue with --set train.resume=true")


def save(engine, output_dir: str, step: int, rank: int, world_size: int, extra: Optional[dict] = None) -> str:
    """Collective: every rank calls it at the same step. Returns the checkpoint's final path. An
    OSError on any rank (ENOSPC, EIO, a read-only filesystem) removes the partial checkpoint and
    raises CheckpointWriteFailed on every rank."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{step}")
    partial = os.path.join(root, f".step-{step}.partial")
    device = getattr(engine, "device", torch.device("cpu"))
    error: Optional[OSError] = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        except OSError as exc:
            error = exc
    barrier()
    writer = _safe_writer(engine)
    writer.error = None
    try:
        engine.save_checkpoint(partial, tag=TAG, client_state={"step": step}, save_latest=False)
    except OSError as exc:
        error = error or exc
    error = error or writer.error
    if error is None:
        try:
            save_rng_state(_rng_path(partial, rank))
        except OSError as exc:
            error = exc
    if _all_agree(error is None, device) and rank == 0:
        try:
            write_json_atomic(os.path.join(partial, COMPLETE), {"step": step, "world_size": world_size,
                                                                **(extra or {})})
            for directory in (os.path.join(partial, TAG), partial):
                if os.path.isdir(directory):
                    _fsync_dir(directory)
            _replace_dir(partial, final)
            _fsync_dir(root)
        except OSError as exc:
            error = exc
    if not _all_agree(error is None, device):
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
        _fsync_dir(root)
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


def check_loadable(path: str, rank: int) -> None:
    """Every state file of checkpoint ``path`` this rank may read: the structures load with
    weights_only=True, the safetensors files parse whole, this rank's RNG state is there. Raises
    UnsafeState naming the first file that fails (before DeepSpeed reads anything)."""
    from safetensors import SafetensorError, safe_open

    state_dir = os.path.join(path, TAG)
    names = sorted(os.listdir(state_dir)) if os.path.isdir(state_dir) else []
    if not any(name.endswith(".pt") for name in names):
        raise UnsafeState(f"{path}: holds no DeepSpeed state under {TAG}/; it is not a complete fastdadpo checkpoint")
    legacy = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.exists(legacy) and not os.path.exists(_rng_path(path, rank)):
        raise UnsafeState(f"{legacy}: a checkpoint of an earlier fastdadpo, whose RNG state is pickled; loading it "
                          f"could run code, so it is refused. Start a new run (its weights: export them with that "
                          f"version)")
    for name in names:
        full = os.path.join(state_dir, name)
        if name.endswith(".pt"):
            load_weights_only(full)
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


def load(engine, path: str, rank: int, world_size: int) -> int:
    """Collective. Restores the engine (weights, optimizer, scheduler) and this rank's RNG; returns
    the step. Every rank checks the files first and all agree, so a refused file ends every rank
    with the same error instead of leaving some waiting in DeepSpeed's collectives."""
    try:
        with open(os.path.join(path, COMPLETE), encoding="utf-8") as handle:
            info = json.load(handle)
        step, ranks = int(info["step"]), int(info["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"train.resume: {os.path.join(path, COMPLETE)} is unreadable ({exc}); resume from "
                          f"another checkpoint") from None
    if ranks != world_size:
        raise ConfigError(f"train.resume: {path} was written by {ranks} ranks; resume it with "
                          f"the same number (this run has {world_size})")
    problem = None
    try:
        check_loadable(path, rank)
    except UnsafeState as exc:
        problem = str(exc)
    if not _all_agree(problem is None, getattr(engine, "device", torch.device("cpu"))):
        raise UnsafeState(problem or f"train.resume: another rank refused a file of {path} (its message names it)")
    _safe_writer(engine)
    loaded, _ = engine.load_checkpoint(path, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise ConfigError(f"train.resume: DeepSpeed could not load the engine state from {path}")
    load_rng_state(_rng_path(path, rank))
    return step

def export_final(engine, student_model, tokenizer, output_dir: str, zero_stage: int, is_main: bool,
                 lora=None, base_model: str = "") -> str:
    """Collective. ``final/``: a Hugging Face model directory gathered from the shards, written as
    ``.final.partial`` and renamed, so it is visible only when complete; with LoRA adapters, the
    merged model, and the adapter alone in ``final-adapter/``. Returns the path of ``final/``."""
    from .models import merge_lora_state, save_lora_adapter

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; full tensors on rank 0 only
    else:
        state = engine.module.state_dict()
    final, partial = os.path.join(output_dir, "final"), os.path.join(output_dir, ".final.partial")
    if is_main:
        prefix = "model."  # the engine wraps the model as its ``model`` attribute
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        shutil.rmtree(partial, ignore_errors=True)
        if lora is not None:
            state, adapter = merge_lora_state(state, lora)
            adapter_dir = os.path.join(output_dir, "final-adapter")
            shutil.rmtree(adapter_dir, ignore_errors=True)
            save_lora_adapter(adapter_dir, adapter, lora, base_model)
        student_model.save_pretrained(partial, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
    barrier()
    return final
