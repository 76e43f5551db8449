"""Files written whole or not at all: every writer of the project's outputs (checkpoints, caches,
metrics, configs, generated rows, recipe markers) goes through ``write_file_atomic``."""
from __future__ import annotations

import fcntl
import json
import os
import socket

from fastdadpo.base.errors import ConfigError


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's entry to disk (a directory after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask: from /proc where Linux shows it, since reading it through os.umask means
    setting it, for a moment, under every thread of the process."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def seal_directory(path: str) -> None:
    """Before a model directory is renamed into place: each file readable as the user's umask says
    (transformers writes weight shards through a temporary file, mode 0600, which a server running
    as another user, or a colleague, could not read) and synced to disk."""
    mode = 0o666 & ~_umask()
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if os.path.isfile(file) and not os.path.islink(file):
            os.chmod(file, mode)
        fsync_path(file)


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


def not_a_readable_file(path: str) -> str | None:
    """Why ``path`` cannot be read as a file (a few words), or None when it can: a FIFO, a socket
    or a device would block forever or never end, so only regular files pass."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a directory, not a file"
    if not os.path.isfile(path):
        return "is not a regular file (a FIFO, a socket or a device would be read forever or not at all)"
    if not os.access(path, os.R_OK):
        return "cannot be read by this user (permission denied)"
    return None


def move_aside(path: str, suffix: str) -> str:
    """``path`` renamed to the first free ``PATH.SUFFIX-N`` beside it (kept, never deleted: it may
    hold days of work); returns the new name."""
    number = 1
    while os.path.exists(f"{path}.{suffix}-{number}"):
        number += 1
    os.replace(path, f"{path}.{suffix}-{number}")
    return f"{path}.{suffix}-{number}"


def check_writable(path: str, flag: str) -> None:
    """``path`` names a file this user can write, its directory made now: checked before a command's
    work, whose results would otherwise be lost at the end. A file is created and removed beside it
    (a permission, a read-only file system, a file where a folder should be: what writing would meet)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "is a directory")
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, f"{existing} is a file, not a directory")
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".{os.path.basename(path)}.probe{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        raise ConfigError(f"{flag}: {path} cannot be written ({exc.strerror or exc}); give a file path in a "
                          f"directory this user can write") from None


def write_text_atomic(path: str, text: str) -> None:
    write_file_atomic(path, lambda handle: handle.write(text))


def write_json_atomic(path: str, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))


class DirectoryLock:
    """An exclusive lock on a directory for as long as this process runs in it: ``.lock`` inside it,
    locked with ``flock`` (released by the kernel when the process ends, however it ends: no stale
    lock after a kill), holding the holder's pid and host for the message another process gets."""

    NAME = ".lock"

    def __init__(self, directory: str):
        self.path = os.path.join(directory, self.NAME)
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """None when locked by this process now; else who holds it ("pid N on HOST")."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = release  # a run that failed in setup, in a process that goes on (tests, notebooks)
