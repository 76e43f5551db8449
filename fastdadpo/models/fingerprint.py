"""A model directory's identity for the caches: its config and weights hashed (tokenizer files
aside: they have their own fingerprint), so other weights at the same path never hit an old entry."""
from __future__ import annotations

import hashlib
import os

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
