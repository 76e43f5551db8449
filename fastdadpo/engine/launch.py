"""The process group every engine starts from: a plain single process (no launcher) gets a one-rank
group of its own (environment of a one-rank torchrun: rank 0, a free local port); under torchrun
(or the ``deepspeed`` launcher) the launcher's environment is used as it is. NCCL on CUDA, gloo on
the CPU, and every collective with the given timeout."""
from __future__ import annotations

import datetime
import os
import socket
from typing import Callable, Optional

import torch
import torch.distributed as dist

from fastdadpo.base.collectives import DistInfo, lost_peers
from fastdadpo.base.errors import UserError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_environment() -> None:
    if "RANK" not in os.environ:  # a plain process: a one-rank group of its own
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))


def _group_not_formed(exc: BaseException, timeout_s: float) -> UserError:
    """One paragraph for a process group that did not form: a rank that never joined (stopped, hung,
    dead before it got here) is a wait that timed out, as a rank lost later is; anything else (the
    port taken, an address that does not resolve) failed at once and is said as it is."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    detail = " ".join(str(exc).split())[:200] or type(exc).__name__
    if isinstance(exc, getattr(dist, "DistStoreError", ())) or "timeout" in detail.lower():
        return lost_peers(rank, world, f"while forming the process group, after {timeout_s:g} s", exc,
                          "Nothing was done yet: start the run again once every rank can.")
    return UserError(f"rank {rank} of {world}: the process group could not form ({type(exc).__name__}: {detail}); "
                     f"check MASTER_ADDR and MASTER_PORT (a port another job holds?) and the launcher's settings")


def setup(timeout_s: float, init: Optional[Callable[[str, datetime.timedelta], None]] = None) -> DistInfo:
    """The process group, initialized once (by ``init(backend, timeout)`` when an engine has its own
    way, else by torch); returns this rank's place in it."""
    prepare_environment()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(seconds=timeout_s)
        try:
            if init is not None:
                init(backend, timeout)
            else:
                dist.init_process_group(backend=backend, timeout=timeout)
        except getattr(dist, "DistError", RuntimeError) as exc:
            raise _group_not_formed(exc, timeout_s) from None
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
