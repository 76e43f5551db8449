"""Files written whole or not at all: every writer of the project's outputs (checkpoints, caches,
metrics, configs, generated rows, recipe markers) goes through ``write_file_atomic``."""
from __future__ import annotations

import json
import os


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's entry to disk (a directory after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path: str, text: str) -> None:
    write_file_atomic(path, lambda handle: handle.write(text))


def write_json_atomic(path: str, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))
