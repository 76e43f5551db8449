"""The one content-addressed cache: what never changes between runs (tokenized data, the frozen
models' sequence log-probs) is computed once and kept on disk, keyed by everything it depends on.

An entry is one safetensors file (reading it runs no code) named by a digest of its key. It holds
named tensors and, in its metadata, the key it was made for, a small JSON document, and a sha256 of
key, document and tensors. An entry that cannot be read, was made for another key (a digest
collision or a renamed file) or fails its digest (truncated, edited) is said once and rebuilt, never
trusted. Entries are written whole or not at all (``write_file_atomic``), so ranks racing to write
one, or a kill mid-write, leave the old entry or a complete new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Callable, Dict, Optional, Tuple

import torch

from fastdadpo.base.files import write_file_atomic

Entry = Tuple[Dict[str, torch.Tensor], dict]  # (tensors, the JSON document)


def key_text(key: dict) -> str:
    """The canonical text of a key (sorted, compact JSON): what is hashed and recorded."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _digest(text: str, document: str, tensors: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(text.encode())
    digest.update(document.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"\n{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def say_once(message: str, log: Optional[Callable[[str], None]] = None) -> None:
    """Through ``log`` (the trainer's: rank 0 only), else on stderr by rank 0, not by every rank."""
    if log is not None:
        log(message)
    elif os.environ.get("RANK", "0") == "0":
        print(f"fastdadpo: {message}", file=sys.stderr, flush=True)


class ContentCache:
    """Entries under ``directory``; ``what`` names them in messages ("tokenization cache")."""

    def __init__(self, directory: str, what: str, log: Optional[Callable[[str], None]] = None):
        self.directory, self.what, self.log = directory, what, log

    def path(self, key: dict) -> str:
        return os.path.join(self.directory, hashlib.sha256(key_text(key).encode()).hexdigest()[:24] + ".safetensors")

    def load(self, key: dict, redo: str) -> Optional[Entry]:
        """The entry for ``key``, or None: none yet, or one that is not usable (said once, with
        ``redo``: what the caller does instead, e.g. "tokenizing again")."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        entry, problem = self._read(path, key_text(key))
        if problem is not None:
            say_once(f"{self.what} {path}: {problem}; {redo}", self.log)
        return entry

    def store(self, key: dict, tensors: Dict[str, torch.Tensor], document=None) -> Optional[str]:
        """The entry written (its path), or None when it could not be (a full disk, a directory this
        user cannot write): said once, and the run goes on without it (a cache is only a shortcut)."""
        from safetensors.torch import save

        text, document_text = key_text(key), json.dumps(document)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        payload = save(tensors, metadata={"key": text, "document": document_text,
                                          "sha256": _digest(text, document_text, tensors)})
        path = self.path(key)
        try:
            os.makedirs(self.directory, exist_ok=True)
            write_file_atomic(path, lambda handle: handle.write(payload), binary=True)
        except OSError as exc:
            say_once(f"{self.what} {path}: not written ({exc.strerror or exc}); this run goes on without it, the next "
                     f"computes it again (free space, or set data.cache_dir to a writable directory)", self.log)
            return None
        return path

    @staticmethod
    def _read(path: str, text: str) -> Tuple[Optional[Entry], Optional[str]]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            return None, f"unreadable ({' '.join(str(exc).split())[:120]})"
        if metadata.get("key") != text:
            return None, "it was written for other inputs"
        document_text = metadata.get("document", "null")
        if metadata.get("sha256") != _digest(text, document_text, tensors):
            return None, "its contents do not match their digest (truncated or edited)"
        try:
            return (tensors, json.loads(document_text)), None
        except ValueError as exc:
            return None, f"unreadable ({exc})"
