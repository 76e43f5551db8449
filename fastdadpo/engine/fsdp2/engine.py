"""PyTorch FSDP2 (``fully_shard``) behind ``fastdadpo.engine.interface``.

The student is sharded per decoder layer and at the root (the wrapper whose forward runs the
objective); the root group holds the embeddings, the final norm and the LM head, so the head is
gathered once for the forward, read whole by the fused loss, and its gradient (formed by the kernels
in that forward) reaches the root's reduce-scatter like any other: no per-chunk all-gather of the
head. In bf16 the parameters kept are fp32 (the optimizer's master copy) and computed in bf16
(``MixedPrecisionPolicy``), gradients reduced in fp32. A frozen teacher is sharded the same way over
the same ranks; its head is copied whole once, before sharding.

Checkpoints hold each rank's shards in the pickle-free state files (``fastdadpo.engine.state``):
``state/rank{R}.pt`` (the structure) and ``.safetensors`` (the tensors), with the global shape of
every sharded tensor. FSDP2 shards dim 0 as ``torch.chunk`` does, so a tensor is its ranks' shards
end to end: a checkpoint loads on any number of ranks (each rank rebuilds the full state in host
memory and keeps its own shard of it).
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch
import torch.distributed as dist

from fastdadpo.base.collectives import DistInfo
from fastdadpo.base.errors import ConfigError
from fastdadpo.engine import checkpoints, launch
from fastdadpo.engine.interface import Engine, FrozenModel, TrainedStudent, restart_schedule
from fastdadpo.engine.modules import HiddenStates, StudentWithObjective
from fastdadpo.engine.state import UnsafeState, load_state, save_state
from fastdadpo.models.loading import decoder, head_logit_options, head_weight, load_causal_lm, release_memory

_RANK_FILE = re.compile(r"^rank(\d+)\.pt$")


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def _layers(model, key: str):
    layers = getattr(decoder(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(f"{key}: engine fsdp2 shards a model per decoder layer and found no decoder layers "
                          f"(``model.{model.base_model_prefix}.layers``) in {type(model).__name__}; use engine "
                          f"deepspeed for this architecture")
    return layers


def _shard(root: torch.nn.Module, model, key: str, device: torch.device, *, offload: bool, reshard: bool,
           param_dtype: Optional[torch.dtype] = None) -> None:
    """``fully_shard`` on each decoder layer, then on ``root`` (which holds everything else)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = dict(mesh=_mesh(device), reshard_after_forward=reshard,
                   offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy())
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in _layers(model, key):
        fully_shard(layer, **options)
    fully_shard(root, **options)


def _local(value):
    """A shard as a plain tensor (a DTensor's local part), recursively through containers."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


def _global_shapes(value, prefix: str = "") -> dict:
    """{path: global shape} of every DTensor in ``value`` (the tensors sharded over the ranks)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return {prefix: list(value.shape)}
    shapes = {}
    if isinstance(value, dict):
        for k, v in value.items():
            shapes.update(_global_shapes(v, f"{prefix}/{k}"))
    return shapes


def _joined(parts: list, shapes: dict, prefix: str = ""):
    """The full value from every rank's part: sharded tensors concatenated along dim 0 in rank order
    (and checked against their recorded global shape), anything else rank 0's."""
    first = parts[0]
    if prefix in shapes:
        full = torch.cat([part for part in parts], dim=0)
        if list(full.shape) != shapes[prefix]:
            raise UnsafeState(f"checkpoint state {prefix}: its shards make {tuple(full.shape)}, not the recorded "
                              f"{tuple(shapes[prefix])}; the checkpoint is incomplete or mixed")
        return full
    if isinstance(first, dict):
        return {k: _joined([part[k] for part in parts], shapes, f"{prefix}/{k}") for k in first}
    return first


class FSDP2Student(TrainedStudent):
    def __init__(self, module, model, optimizer, scheduler, *, dist_info: DistInfo, dtype: torch.dtype,
                 max_grad_norm: float):
        self.module, self.model, self.optimizer, self.scheduler = module, model, optimizer, scheduler
        self.dist, self.dtype, self.max_grad_norm = dist_info, dtype, max_grad_norm
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __call__(self, input_ids, attention_mask, position_ids, compute):
        return self.module(input_ids, attention_mask, position_ids, compute)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP2's reduce-scatter averages over the ranks; the contributions must add up.
        (loss * self.dist.world_size).backward()

    def optimizer_step(self, check_gradient) -> Optional[float]:
        from torch.distributed.tensor import DTensor

        # The global norm (a reduction over the ranks: the same on every rank), clipped as
        # DeepSpeed clips (max_norm / (norm + 1e-6)); train.max_grad_norm 0 measures without clipping.
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"), foreach=True)
        norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        check_gradient(norm)  # before the update: it raises to stop the run without applying it
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # --- checkpoints ---
    def _write_state(self, directory: str, step: int) -> Optional[OSError]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_state = get_model_state_dict(self.module)
        optimizer_state = get_optimizer_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        record = {"state": _local(state), "shapes": _global_shapes(state), "scheduler": self.scheduler.state_dict(),
                  "step": step, "world_size": self.dist.world_size}
        try:
            os.makedirs(directory, exist_ok=True)
            save_state(record, os.path.join(directory, f"rank{self.dist.rank}.pt"))
        except OSError as exc:
            return exc
        return None

    def _read_state(self, directory: str) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        ranks = sorted((int(m.group(1)), name) for name in os.listdir(directory) if (m := _RANK_FILE.match(name)))
        if [rank for rank, _ in ranks] != list(range(len(ranks))) or not ranks:
            raise UnsafeState(f"{directory}: the FSDP2 shards are rank0.pt ... rankN.pt without a gap; found "
                              f"{[name for _, name in ranks] or 'none'}")
        records = [load_state(os.path.join(directory, name)) for _, name in ranks]
        shapes = records[0]["shapes"]
        full = _joined([record["state"] for record in records], shapes)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, full["model"], options=options)
        set_optimizer_state_dict(self.module, self.optimizer, full["optimizer"], options=options)
        base_lrs = list(self.scheduler.base_lrs)  # this run's train.lr, before the checkpoint's
        self.scheduler.load_state_dict(records[0]["scheduler"])
        restart_schedule(self.scheduler, base_lrs)

    def save_checkpoint(self, output_dir: str, step: int, run: Optional[dict] = None) -> str:
        return checkpoints.save(lambda directory: self._write_state(directory, step), output_dir, step,
                                self.dist.rank, self.dist.world_size, self.dist.device, extra={"run": run})

    def load_checkpoint(self, path: str) -> int:
        return checkpoints.load(self._read_state, path, self.dist.rank, self.dist.world_size, self.dist.device,
                                reshards=True)

    def export(self, tokenizer, output_dir: str, lora=None, base_model: str = "") -> str:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective: full tensors on rank 0 only (the others get an empty dict).
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return checkpoints.export_agreed(state, self.model, tokenizer, output_dir, self.dist.is_main, self.dist.device,
                                         lora=lora, base_model=base_model, dtype=self.dtype)


class ShardedFrozenFSDP2(FrozenModel):
    def __init__(self, module, head: torch.Tensor, softcap: Optional[float] = None, logit_scale: float = 1.0):
        self.module, self.head, self.softcap, self.logit_scale = module, head, softcap, logit_scale

    @torch.no_grad()
    def hidden(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        return self.module(input_ids, attention_mask, position_ids)

    def release(self) -> None:
        self.module = self.head = None
        release_memory()


class FSDP2Engine(Engine):
    """``engine: {name: fsdp2}``: the student and the frozen teachers ``fully_shard``ed over every rank."""

    name = "fsdp2"

    def __init__(self, cpu_offload: bool = False, reshard_after_forward: bool = True):
        self.cpu_offload, self.reshard_after_forward = cpu_offload, reshard_after_forward

    def describe(self) -> str:
        return "PyTorch FSDP2 (per decoder layer)" + (", CPU offload" if self.cpu_offload else "")

    def checkpoint_format(self) -> str:
        return "fsdp2"

    def setup_distributed(self, timeout_s: float = 1800.0) -> DistInfo:
        return launch.setup(timeout_s)

    @staticmethod
    def _kept_dtype(dtype: torch.dtype, key: str) -> torch.dtype:
        """The dtype parameters are kept in: fp32 masters when computing in bf16."""
        if dtype == torch.float16:
            raise ConfigError(f"{key}: model.dtype fp16 needs dynamic loss scaling, which engine fsdp2 does not do "
                              f"here; use bf16 (same memory, no scaling) or engine deepspeed")
        return torch.float32

    def load_student(self, path, *, key, dtype, device, optimizer, liger_kernels=False):
        # Loaded in host memory and moved shard by shard to the device by fully_shard.
        return load_causal_lm(path, dtype=self._kept_dtype(dtype, key), device=torch.device("cpu"), trainable=True,
                              key=key, liger_kernels=liger_kernels)

    def build_student(self, model, *, dtype, optimizer, dist):
        module = StudentWithObjective(model)
        _shard(module, model, "model.student", dist.device, offload=self.cpu_offload,
               reshard=self.reshard_after_forward, param_dtype=None if dtype == torch.float32 else dtype)
        params = [p for p in module.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW(params, lr=optimizer.lr, weight_decay=optimizer.weight_decay, betas=(0.9, 0.999),
                                  eps=1e-8, fused=(torch.cuda.is_available() and not self.cpu_offload) or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, optimizer.lr_factor())
        return FSDP2Student(module, model, adamw, scheduler, dist_info=dist, dtype=dtype,
                            max_grad_norm=optimizer.max_grad_norm)

    def build_frozen(self, path, *, key, dtype, device, liger_kernels=False):
        model = load_causal_lm(path, dtype=dtype, device=torch.device("cpu"), key=key, liger_kernels=liger_kernels)
        head = head_weight(model).detach().clone().to(device)  # whole, before sharding
        module = HiddenStates(model)
        _shard(module, model, key, device, offload=self.cpu_offload, reshard=True)
        module.eval()
        return ShardedFrozenFSDP2(module, head, **head_logit_options(model.config, key))

    def sampling_model(self, path, *, key, dtype, device, world_size):
        if world_size == 1:
            return load_causal_lm(path, dtype=dtype, device=device, key=key)
        model = load_causal_lm(path, dtype=dtype, device=torch.device("cpu"), key=key)
        _shard(model, model, key, device, offload=self.cpu_offload, reshard=True)
        return model
