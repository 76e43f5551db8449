"""The process group under DeepSpeed: a plain single process (no launcher) gets its own one-rank
group, since DeepSpeed otherwise falls back to MPI discovery and fails. On machines without CUDA
the DeepSpeed accelerator is the CPU and the backend gloo."""
from __future__ import annotations

import datetime
import logging
import os
import socket

import torch

from fastdadpo.base.collectives import DistInfo


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_environment() -> None:
    """Environment DeepSpeed must see before it is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # a plain process: a one-rank group of its own
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))


def quiet_deepspeed() -> None:
    import deepspeed  # noqa: F401  (its logger exists once imported)
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def setup(timeout_s: float = 1800.0) -> DistInfo:
    """Initialize (once) the process group; returns this rank's place in it."""
    prepare_environment()
    import deepspeed
    import torch.distributed as dist

    quiet_deepspeed()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
