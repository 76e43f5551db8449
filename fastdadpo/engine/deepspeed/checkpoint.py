"""DeepSpeed's checkpoint reads and writes, through ``fastdadpo.engine.state`` (no pickled code):
its engine state in ``state/`` of a checkpoint directory, and the full weights for ``final/``."""
from __future__ import annotations

import os
from typing import Optional

from fastdadpo.base.errors import ConfigError
from fastdadpo.engine.state import load_state, save_state


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed (0.19) puts in a ZeRO 0/1/2/3 checkpoint besides tensors and plain
    containers: its loss scalers (plain numbers inside), the fragment addresses of ZeRO-2 partitions
    (two ints) and the ZeRO stage enum. Each is rebuilt from its attributes, without running code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _checkpoint_engine_class():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SafeCheckpointEngine(CheckpointEngine):
        """DeepSpeed's reads and writes of a checkpoint, through ``save_state``/``load_state``. A
        failed write is recorded, not raised: DeepSpeed's collectives around it go on on every rank,
        and ``save`` then ends the run on all of them together."""

        def __init__(self):
            super().__init__(None)
            self.name = "fastdadpo.SafeCheckpointEngine"
            self.error: Optional[OSError] = None

        def create(self, info):
            pass

        def makedirs(self, path, exist_ok=False):
            try:
                os.makedirs(path, exist_ok=exist_ok)
            except OSError as exc:
                self.error = self.error or exc

        def save(self, state_dict, path: str):
            if self.error is not None:
                return
            try:
                save_state(state_dict, path)
            except OSError as exc:
                self.error = exc

        def load(self, path: str, map_location=None):
            return load_state(path, deepspeed_safe_globals())

        def commit(self, info):
            return True

        def preserves_storage_sharing(self):
            return False  # save_state copies what safetensors needs copied; DeepSpeed need not clone everything

    return SafeCheckpointEngine


def _safe_writer(engine):
    """The engine's checkpoint engine, made a SafeCheckpointEngine (once)."""
    cls = getattr(_safe_writer, "cls", None) or _checkpoint_engine_class()
    _safe_writer.cls = cls
    if not isinstance(getattr(engine, "checkpoint_engine", None), cls):
        engine.checkpoint_engine = cls()
        # zero_to_fp32.py and friends cannot read this format: not copied into checkpoints.
        engine._copy_recovery_script = lambda save_path: None
    return engine.checkpoint_engine


def write_state(engine, directory: str, step: int) -> Optional[OSError]:
    """Collective: the engine's state (every rank's shards) into ``directory``; the OSError met, if any."""
    writer = _safe_writer(engine)
    writer.error = None
    try:
        engine.save_checkpoint(os.path.dirname(directory), tag=os.path.basename(directory),
                               client_state={"step": step}, save_latest=False)
    except OSError as exc:
        return exc
    return writer.error


def read_state(engine, directory: str) -> None:
    """Collective: weights, optimizer and scheduler from ``directory``."""
    _safe_writer(engine)
    try:
        loaded, _ = engine.load_checkpoint(os.path.dirname(directory), tag=os.path.basename(directory),
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        # A checkpoint from before runs recorded their models' fingerprints, of a model of other shapes.
        raise ConfigError(f"checkpoint {directory} holds weights of other shapes than model.student now has "
                          f"({' '.join(str(exc).split())[:200]}); it was written for another model: read it with "
                          f"the config of the run that wrote it") from None
    if loaded is None:
        raise ConfigError(f"checkpoint {directory}: DeepSpeed could not load the engine state from it")


def full_state_dict(engine, zero_stage: int) -> Optional[dict]:
    """Collective: the wrapper's full state dict on rank 0 (under ZeRO-3 the other ranks get None)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # collective; full tensors on rank 0 only
    return engine.module.state_dict()
