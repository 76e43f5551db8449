"""The collectives the layers above call, all through ``torch.distributed`` and safe to call in a
plain single process (they do nothing there). Every rank calls each in the same order; a rank that
diverges makes the others fail after the group's timeout instead of hanging forever. Setting up the
group is the engine's (``fastdadpo.engine.setup_distributed``).
"""
from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastdadpo.base.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_agree(ok: bool, device) -> bool:
    """True on every rank iff ``ok`` on every rank (a decision all ranks must share)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    return float(all_reduce_sum(flag)) == 0.0


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj) -> list:
    """Every rank's ``obj``, in rank order, on rank 0 (an empty list elsewhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if dist.get_rank() == 0 else []


def teardown() -> None:
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
def peers_lost_reported(info: DistInfo, where, how_to_continue):
    """A collective that fails because another rank died (killed, out of memory, a lost node) ends
    this rank with one paragraph instead of the backend's traceback: what happened, ``where()`` (e.g.
    the step), and ``how_to_continue()`` (e.g. the checkpoint to resume from)."""
    try:
        yield
    except RuntimeError as exc:
        if info.world_size == 1 or not _lost_peer(exc):
            raise
        raise lost_peers(info.rank, info.world_size, where(), exc, how_to_continue()) from None


def lost_peers(rank: int, world_size: int, where: str, exc: BaseException, how_to_continue: str) -> UserError:
    """The one paragraph for a rank whose peers are gone (dead, killed, hung, never started)."""
    others = ", ".join(str(r) for r in range(world_size) if r != rank)
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return UserError(f"rank {rank} of {world_size}: lost contact with rank(s) {others} {where} ({detail}). Another "
                     f"rank died, was killed or hangs: the launcher's log names it and its exit status. "
                     f"{how_to_continue}")


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
