"""State files that hold no pickled code: every tensor of a state in a ``.safetensors`` file, the
rest (step counters, an engine's bookkeeping) as a ``.pt`` structure that loads with
``torch.load(weights_only=True)``: tensors, plain containers, numbers, strings, and the few classes an
engine allows (``safe_globals``, each rebuilt from its attributes without running code). The RNG
states are safetensors too (numbers in its metadata). A file that needs anything else is refused,
naming it.

Hand-written on purpose: torch's and the engines' own checkpoint writers pickle whole objects, and
unpickling a checkpoint from elsewhere can run code; safetensors alone cannot hold the non-tensor
part of an optimizer's or scheduler's state.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from fastdadpo.base.errors import UserError
from fastdadpo.base.files import fsync_path


_TENSOR_REF = "\x00fastdadpo-tensor:"  # stands for a tensor of the .safetensors file in a state's structure


class UnsafeState(UserError):
    """A state file that needs more than tensors and plain containers to load, or cannot be read."""


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
    fsync_path(path)


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


def load_weights_only(path: str, safe_globals: Sequence[type] = ()):
    """A ``torch.save`` file loaded with ``weights_only=True`` (and the engine's allow-list,
    ``safe_globals``), or an UnsafeState naming the file."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
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


def load_state(path: str, safe_globals: Sequence[type] = ()):
    """What ``save_state`` wrote (also a plain tensor file loadable with weights_only=True)."""
    structure = load_weights_only(path, safe_globals)
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
