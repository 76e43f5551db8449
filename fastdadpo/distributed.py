"""Process-group setup and the few collectives the trainer uses, all with timeouts.

A plain single process (no launcher) gets its own one-rank group: DeepSpeed otherwise falls back
to MPI discovery and fails. On machines without CUDA the DeepSpeed accelerator is the CPU and the
backend gloo. Every collective here is called by every rank in the same order; a rank that
diverges makes the others fail after ``timeout`` instead of hanging forever.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj) -> list:
    """Every rank's ``obj``, in rank order, on rank 0 (an empty list elsewhere)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if dist.get_rank() == 0 else []


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # a group whose peers are gone: nothing left to tear down cleanly
            pass


# What gloo and NCCL say when the other end of a collective is gone (some versions raise a plain
# RuntimeError rather than a DistError).
_LOST_PEER_WORDS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "nccl", "gloo",
                    "socket", "peer")


def _lost_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another rank went away (not an OOM, not a bug of this rank)."""
    import torch.distributed as dist

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    message = str(exc).lower()
    return any(word in message for word in _LOST_PEER_WORDS)


def decided_by_main(decide):
    """``decide()`` run on rank 0 only and its result (or its UserError) given to every rank, so
    every rank acts on the same answer (what one rank sees on its own disk may differ) and fails
    together instead of leaving the others waiting in a collective."""
    from .errors import UserError

    import torch.distributed as dist

    outcome = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except UserError as exc:
            outcome = ("error", str(exc))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise UserError(value)
    return value


@contextlib.contextmanager
def peers_lost_reported(info: DistInfo, where, last_checkpoint):
    """A collective that fails because another rank died (killed, out of memory, a lost node) ends
    this rank with one paragraph instead of the backend's traceback: what happened, ``where()`` (e.g.
    the step), and ``last_checkpoint()`` to resume from."""
    from .errors import UserError

    try:
        yield
    except RuntimeError as exc:
        if info.world_size == 1 or not _lost_peer(exc):
            raise
        others = [r for r in range(info.world_size) if r != info.rank]
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"rank {info.rank} of {info.world_size}: lost contact with rank(s) "
                        f"{', '.join(map(str, others))} {where()} ({detail}). Another rank died or was killed: "
                        f"the launcher's log names it and its exit status. The last complete checkpoint is "
                        f"{last_checkpoint() or 'none (none was written yet)'}; continue from it with --set "
                        f"train.resume=true once every rank can start") from None


class StopOnSigterm:
    """SIGTERM asks for a checkpoint at the end of the current step, then a clean exit."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum, frame):
        self.requested = True
