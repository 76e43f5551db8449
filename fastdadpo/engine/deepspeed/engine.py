"""DeepSpeed ZeRO (stages 0–3, offload) behind ``fastdadpo.engine.interface``.

The student's loss runs inside its engine's forward: the module below computes the final hidden
states and hands them, with the LM-head weight, to a function (the objective). Under ZeRO-3 the
head's shards are gathered for that forward and again for its backward because the head weight is
registered as an external parameter of this module. Tied embeddings are the same parameter.

A frozen model runs its decoder in a ZeRO-3 engine too (so a teacher is sharded over the same
ranks), but its head never changes: it is gathered once, at build time, into a plain tensor.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from fastdadpo.base.collectives import DistInfo
from fastdadpo.engine import checkpoints
from fastdadpo.engine.deepspeed import launch
from fastdadpo.engine.deepspeed.checkpoint import deepspeed_safe_globals, full_state_dict, read_state, write_state
from fastdadpo.engine.deepspeed.config import inference_config, student_config, teacher_extra
from fastdadpo.engine.interface import Engine, FrozenModel, OptimizerSettings, TrainedStudent, restart_schedule
from fastdadpo.engine.modules import HiddenStates, StudentWithObjective
from fastdadpo.models.loading import head_logit_options, head_weight, load_causal_lm, release_memory


def _is_zero3(parameter) -> bool:
    return hasattr(parameter, "ds_id")


def gathered_copy(parameter: torch.Tensor) -> torch.Tensor:
    """A full, detached copy of a (possibly ZeRO-3-partitioned) parameter."""
    if not _is_zero3(parameter):
        return parameter.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
        return parameter.detach().clone()


@contextlib.contextmanager
def zero3_loading(ds_config: dict):
    """Keep an ``HfDeepSpeedConfig`` alive while loading, so weights arrive partitioned."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay referenced during loading)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds_config


def frozen_engine(module, ds_config: dict):
    """A frozen module (loaded under ``zero3_loading(ds_config)``) in a DeepSpeed engine, whose hooks
    gather each layer's shards for its forward. No optimizer: nothing is trained."""
    import deepspeed

    engine = deepspeed.initialize(model=module, config=ds_config)[0]
    engine.eval()
    return engine


class DeepSpeedStudent(TrainedStudent):
    def __init__(self, engine, model, *, zero_stage: int, dist: DistInfo, grad_accum: int):
        self.engine, self.model, self.zero_stage, self.dist, self.grad_accum = engine, model, zero_stage, dist, grad_accum

    def __call__(self, input_ids, attention_mask, position_ids, compute):
        return self.engine(input_ids, attention_mask, position_ids, compute)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages over the accumulation steps and the ranks; the contributions add up.
        self.engine.backward(loss * self.dist.world_size * self.grad_accum)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # not a boundary: counts the micro-step, accumulates only

    def optimizer_step(self, check_gradient) -> Optional[float]:
        norm = self._norm_before_step()
        if norm is not None:
            check_gradient(norm)  # before a step that would apply it
        self.engine.step()
        if norm is None:
            norm = self._norm_after_step()
            check_gradient(norm)
        return norm

    def _norm_before_step(self) -> Optional[float]:
        """Under ZeRO stage 0 DeepSpeed reports no gradient norm, and clips a non-finite gradient into
        NaN weights: the norm of the reduced gradients, before the step. Other stages: None (their
        optimizer computes it in the step, and skips the update when it is not finite)."""
        if self.zero_stage != 0:
            return None
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else None

    def _norm_after_step(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_checkpoint(self, output_dir: str, step: int, run: Optional[dict] = None) -> str:
        return checkpoints.save(lambda directory: write_state(self.engine, directory, step), output_dir, step,
                                self.dist.rank, self.dist.world_size, self.dist.device, extra={"run": run})

    def load_checkpoint(self, path: str) -> int:
        base_lrs = list(self.engine.lr_scheduler.base_lrs)  # this run's train.lr, before the checkpoint's
        step = checkpoints.load(lambda directory: read_state(self.engine, directory), path, self.dist.rank,
                                self.dist.world_size, self.dist.device, deepspeed_safe_globals())
        restart_schedule(self.engine.lr_scheduler, base_lrs)
        return step

    def export(self, tokenizer, output_dir: str, lora=None, base_model: str = "") -> str:
        state = full_state_dict(self.engine, self.zero_stage)  # collective
        return checkpoints.export_agreed(state, self.model, tokenizer, output_dir, self.dist.is_main, self.dist.device,
                                         lora=lora, base_model=base_model)


class ShardedFrozen(FrozenModel):
    def __init__(self, engine, head: torch.Tensor, softcap: Optional[float] = None, logit_scale: float = 1.0):
        self.engine, self.head, self.softcap, self.logit_scale = engine, head, softcap, logit_scale

    @torch.no_grad()
    def hidden(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        return self.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def release(self) -> None:
        """Free the shards, the hooks and the gathered head now (DeepSpeed's engine keeps its module
        reachable after the last reference to it goes; ``destroy`` unhooks it)."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        self.engine = self.head = None
        release_memory()


class DeepSpeedEngine(Engine):
    """The ``deepspeed:`` section: ZeRO ``zero_stage`` for the student, ZeRO-3 for frozen models
    (their shards in host memory with ``teacher_offload``), ``extra`` merged into both configs."""

    name = "deepspeed"

    def __init__(self, zero_stage: int = 3, teacher_offload: bool = False, extra: Optional[dict] = None,
                 source: str = "<defaults>"):
        self.zero_stage, self.teacher_offload, self.extra, self.source = zero_stage, teacher_offload, extra or {}, source

    def describe(self) -> str:
        return f"DeepSpeed ZeRO stage {self.zero_stage}" + (", teachers offloaded" if self.teacher_offload else "")

    def checkpoint_format(self) -> str:
        return f"deepspeed zero {self.zero_stage}"  # DeepSpeed reads a checkpoint under its own stage only

    def setup_distributed(self, timeout_s: float = 1800.0) -> DistInfo:
        return launch.setup(timeout_s)

    def _student_config(self, dtype: torch.dtype, optimizer: OptimizerSettings) -> dict:
        return student_config(zero_stage=self.zero_stage, micro_batch_size=optimizer.micro_batch_size,
                              grad_accum=optimizer.grad_accum, max_grad_norm=optimizer.max_grad_norm, dtype=dtype,
                              extra=self.extra, source=self.source)

    def load_student(self, path, *, key, dtype, device, optimizer, liger_kernels=False):
        # Under ZeRO-3 the student arrives partitioned: from_pretrained sees the engine's config.
        sharded = zero3_loading(self._student_config(dtype, optimizer)) if self.zero_stage == 3 else None
        return load_causal_lm(path, dtype=dtype, device=device, trainable=True, key=key, liger_kernels=liger_kernels,
                              sharded_loading=sharded)

    def build_student(self, model, *, dtype, optimizer, dist):
        import deepspeed

        wrapper = StudentWithObjective(model)
        head = head_weight(model)
        if _is_zero3(head):
            deepspeed.zero.register_external_parameter(wrapper, head)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW(params, lr=optimizer.lr, weight_decay=optimizer.weight_decay, betas=(0.9, 0.999),
                                  eps=1e-8, fused=torch.cuda.is_available() or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, optimizer.lr_factor())
        engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=adamw, lr_scheduler=scheduler,
                                               config=self._student_config(dtype, optimizer))
        return DeepSpeedStudent(engine, model, zero_stage=self.zero_stage, dist=dist, grad_accum=optimizer.grad_accum)

    def build_frozen(self, path, *, key, dtype, device, liger_kernels=False):
        config = inference_config(dtype, offload=self.teacher_offload, extra=teacher_extra(self.extra))
        model = load_causal_lm(path, dtype=dtype, device=device, key=key, liger_kernels=liger_kernels,
                               sharded_loading=zero3_loading(config))
        head = gathered_copy(head_weight(model)).to(device)
        return ShardedFrozen(frozen_engine(HiddenStates(model), config), head, **head_logit_options(model.config, key))

    def sampling_model(self, path, *, key, dtype, device, world_size):
        if world_size == 1:
            return load_causal_lm(path, dtype=dtype, device=device, key=key)
        config = inference_config(dtype)
        model = load_causal_lm(path, dtype=dtype, device=device, key=key, sharded_loading=zero3_loading(config))
        return frozen_engine(model, config).module  # the engine's hooks gather each layer's shards
