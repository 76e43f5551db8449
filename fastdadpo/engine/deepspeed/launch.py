"""The process group under DeepSpeed: the common setup (``fastdadpo.engine.launch``), initialized
through DeepSpeed (which otherwise falls back to MPI discovery for a plain process and fails), with
the CPU as DeepSpeed's accelerator on machines without CUDA."""
from __future__ import annotations

import logging
import os

import torch

from fastdadpo.base.collectives import DistInfo
from fastdadpo.engine import launch


def quiet_deepspeed() -> None:
    """DeepSpeed's accelerator chosen (it reads ``DS_ACCELERATOR`` at its first import) and its INFO
    lines off."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def setup(timeout_s: float = 1800.0) -> DistInfo:
    """Initialize (once) the process group; returns this rank's place in it."""
    quiet_deepspeed()

    def init(backend, timeout):
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)

    return launch.setup(timeout_s, init)
