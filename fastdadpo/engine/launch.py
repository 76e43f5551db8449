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

from fastdadpo.base.collectives import DistInfo, peers_lost_reported


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
        # A rank that never joins (stopped, hung, dead before it got here) ends the others at the
        # timeout with the lost-rank paragraph, as a rank lost later would.
        joining = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)
        with peers_lost_reported(joining, lambda: f"while forming the process group (waited {timeout_s:g} s)",
                                 lambda: "Nothing was done yet: start the run again once every rank can."):
            if init is not None:
                init(backend, timeout)
            else:
                dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
