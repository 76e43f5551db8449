"""The one interface the training loop, the precompute and generation talk to, whatever shards the
models: an ``Engine`` sets up the process group, loads models (sharded as they load where it
shards), builds the trained student with the loss inside its forward, and builds frozen teachers;
the ``TrainedStudent`` it returns takes backward passes, optimizer steps, checkpoints and the final
export. DeepSpeed ZeRO (``fastdadpo.engine.deepspeed``) implements it; nothing above this layer
names DeepSpeed.

Why the loss runs inside the student's forward: an engine that shards the LM head must gather it for
the forward and again for the backward, and its gradient-reduction hooks fire only on parameters
used inside its forward; computing the loss outside (on ``lm_head.weight`` read directly) sees an
empty shard.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
import math
from typing import Callable, Optional, Sequence

import torch

from fastdadpo.base.collectives import DistInfo


@dataclass(frozen=True)
class OptimizerSettings:
    """How the student is stepped: AdamW with warmup then cosine, clipping, accumulation."""

    micro_batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    warmup_ratio: float
    total_steps: int
    schedule: str = "warmup_cosine"  # one of LR_SCHEDULES

    def lr_factor(self) -> Callable[[int], float]:
        """The learning-rate factor at each step, for a LambdaLR."""
        if self.schedule == "warmup_cosine":
            return warmup_cosine(self.total_steps, self.warmup_ratio)
        return transformers_schedule(self.schedule, self.total_steps, self.warmup_ratio)


# The student's forward: (final hidden states, LM-head weight) -> whatever the objective returns.
Compute = Callable[[torch.Tensor, torch.Tensor], object]


class FrozenModel(abc.ABC):
    """A frozen model (a teacher, a reference) run every step without gradients: its final hidden
    states, and its full LM head with the map from the head's raw outputs to its logits."""

    head: torch.Tensor  # the full LM-head weight, gathered once
    softcap: Optional[float] = None  # ``fastdadpo.models.loading.head_logit_options``
    logit_scale: float = 1.0

    @abc.abstractmethod
    def hidden(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Final hidden states, no grad (collective where the model is sharded)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free its weights and hooks now."""


class TrainedStudent(abc.ABC):
    """The student in its engine. ``model`` is the Hugging Face model (its config, its export)."""

    model: torch.nn.Module

    @abc.abstractmethod
    def __call__(self, input_ids, attention_mask, position_ids, compute: Compute):
        """The decoder's forward, then ``compute(hidden, head_weight)`` inside the engine's forward."""

    @abc.abstractmethod
    def train(self) -> None: ...

    @abc.abstractmethod
    def eval(self) -> None: ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """``loss``: this micro-batch's contribution to the step's loss, which is the sum of the
        contributions over the step's micro-batches and ranks (the objectives normalize over the
        whole step). The gradient of that sum accumulates until ``optimizer_step``."""

    @abc.abstractmethod
    def optimizer_step(self, check_gradient: Callable[[Optional[float]], None]) -> Optional[float]:
        """Apply the step's accumulated gradient (clipped), advance the schedule, and return the
        gradient norm (None where the engine has none). ``check_gradient(norm)`` is called before
        the update where the norm is known before it (it may raise to stop the run without applying
        it), else right after (the engine then skips a non-finite update itself)."""

    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate the next ``optimizer_step`` applies."""

    @abc.abstractmethod
    def save_checkpoint(self, output_dir: str, step: int, run: Optional[dict] = None) -> str:
        """Collective: ``OUTPUT_DIR/checkpoints/step-N`` (``fastdadpo.engine.checkpoints``), returned;
        ``run``: what defines the run, recorded for the resume to check."""

    @abc.abstractmethod
    def load_checkpoint(self, path: str) -> int:
        """Collective: restores weights, optimizer, schedule and this rank's RNG; returns the step."""

    @abc.abstractmethod
    def export(self, tokenizer, output_dir: str, lora=None, base_model: str = "") -> str:
        """Collective: the full model as ``OUTPUT_DIR/final`` (and ``final-adapter`` with LoRA)."""


class Engine(abc.ABC):
    name: str

    @abc.abstractmethod
    def describe(self) -> str:
        """One phrase for the run's log (e.g. "DeepSpeed ZeRO stage 3")."""

    @abc.abstractmethod
    def checkpoint_format(self) -> str:
        """What a checkpoint of this engine's is readable by (e.g. "deepspeed zero 3"): a resume under
        another format is refused before any state is read."""

    @abc.abstractmethod
    def setup_distributed(self, timeout_s: float = 1800.0) -> DistInfo:
        """The process group (a one-rank group of its own for a plain process), set up once."""

    @abc.abstractmethod
    def load_student(self, path: str, *, key: str, dtype: torch.dtype, device: torch.device,
                     optimizer: OptimizerSettings, liger_kernels=False) -> torch.nn.Module:
        """The student's Hugging Face model, trainable, loaded the way ``build_student`` will shard it."""

    @abc.abstractmethod
    def build_student(self, model: torch.nn.Module, *, dtype: torch.dtype, optimizer: OptimizerSettings,
                      dist: DistInfo) -> TrainedStudent:
        """``model`` (LoRA and activation checkpointing already applied) wrapped for training."""

    @abc.abstractmethod
    def build_frozen(self, path: str, *, key: str, dtype: torch.dtype, device: torch.device,
                     liger_kernels=False) -> FrozenModel: ...

    @abc.abstractmethod
    def sampling_model(self, path: str, *, key: str, dtype: torch.dtype, device: torch.device,
                       world_size: int) -> torch.nn.Module:
        """A frozen model ``generate`` can run: plain with one rank, sharded over several (every rank
        then steps until all are done)."""



def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor every engine applies at each step: linear warmup, then cosine to 0.
    Kept here rather than transformers.get_scheduler on purpose: its warmup starts at a factor of 0
    (the first step then changes nothing), this one at 1/warmup, and every figure in the README was
    trained on this one."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# train.lr_scheduler_type: ours, then transformers' (TRL's lr_scheduler_type) that are a factor of the
# learning rate given the warmup and the length; reduce_lr_on_plateau and greedy read the loss,
# cosine_with_min_lr and warmup_stable_decay need settings of their own, and polynomial decays to an
# absolute lr_end (1e-7), so its factor would depend on train.lr.
LR_SCHEDULES = ("warmup_cosine", "linear", "cosine", "cosine_with_restarts", "constant", "constant_with_warmup",
                "inverse_sqrt")


def transformers_schedule(name: str, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """transformers.get_scheduler's factor for ``name``, as TRL's Trainer builds it (its warmup steps:
    ceil(total x ratio)); taken from the scheduler transformers makes, so it is theirs exactly."""
    from transformers import get_scheduler

    anchor = torch.nn.Parameter(torch.zeros(1))
    scheduler = get_scheduler(name, optimizer=torch.optim.SGD([anchor], lr=1.0),
                              num_warmup_steps=math.ceil(total_steps * warmup_ratio), num_training_steps=total_steps)
    return scheduler.lr_lambdas[0]


def restart_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: Sequence[float]) -> None:
    """After a checkpoint's state is loaded: this run's schedule at the restored step. The checkpoint
    holds the writing run's rates (0 at the end of its cosine) and base rates, and a resume may change
    train.max_steps or train.warmup_ratio (the schedule's length): the step resumed must take this
    run's rate, not the last one the old schedule set."""
    scheduler.base_lrs = list(base_lrs)
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports; LambdaLR keeps it there
