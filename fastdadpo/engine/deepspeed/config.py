"""The DeepSpeed configs fastdadpo generates, and validation of the user's ``deepspeed.extra``.

DeepSpeed silently ignores top-level keys it does not know, so a dotted key such as
``"zero_optimization.stage": 3`` or a typo is a no-op that users discover weeks later; and it
rejects floats where it wants integers (YAML reads ``5e8`` as a string, ``5.0e8`` as a float).
Here a dotted key or an unknown top-level key is an error with a suggestion, integral numbers are
made ints, the keys fastdadpo owns (batch sizes, clipping, optimizer, precision, ZeRO stage) are
refused with the config key to use instead, and the ZeRO section is checked by DeepSpeed's own model.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Optional

import torch

from fastdadpo.base.errors import ConfigError
from fastdadpo.base.yaml_files import merge_mappings
from fastdadpo.engine.deepspeed.launch import quiet_deepspeed

KNOWN_TOP_LEVEL_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "communication_data_type", "seq_parallel_communication_data_type", "sparse_gradients", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing", "flops_profiler",
    "wall_clock_breakdown", "memory_breakdown", "steps_per_print", "dump_state", "tensorboard", "wandb",
    "csv_monitor", "comet", "comms_logger", "autotuning", "elasticity", "data_efficiency", "curriculum_learning",
    "compression_training", "checkpoint", "aio", "nebula", "data_types", "disable_allgather", "dataloader_drop_last",
    "pipeline", "load_universal", "use_node_local_storage", "graph_harvesting", "compile", "timers",
    "weight_quantization", "hybrid_engine", "sparse_attention", "quantize_training", "eigenvalue",
    "progressive_layer_drop", "gradient_allreduce_op", "use_data_before_expert_parallelism", "mixed_precision",
}
# Set through fastdadpo's own config, so that there is one place for each.
OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_size and train.grad_accum",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.max_grad_norm",
    "optimizer": "train.lr and train.weight_decay (fastdadpo uses torch AdamW)",
    "scheduler": "train.lr_scheduler_type and train.warmup_ratio",
    "bf16": "model.dtype", "fp16": "model.dtype",
}
INTEGER_KEYS = {
    (), ("zero_optimization",), ("zero_optimization", "offload_param"), ("zero_optimization", "offload_optimizer"),
}
INTEGER_NAMES = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print", "stage",
    "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_model_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size",
    "buffer_count", "buffer_size", "max_in_cpu", "prefetch_bucket_size", "param_persistence_threshold",
    "model_persistence_threshold", "max_live_parameters", "max_reuse_distance", "mics_shard_size",
}


def _integral(value, path: str, source: str):
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{source}: deepspeed.extra.{path} must be an integer, got {value!r}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{source}: deepspeed.extra.{path} must be an integer, got {value}")
        return int(value)
    return value


def _normalize(node: dict, trail: tuple, source: str) -> dict:
    out = {}
    for key, value in node.items():
        path = ".".join(trail + (key,))
        if not isinstance(key, str):
            raise ConfigError(f"{source}: deepspeed.extra.{path}: keys must be strings")
        if "." in key:
            nested = key.split(".")
            example = "".join(f"{k}: {{" for k in nested[:-1]) + f"{nested[-1]}: ..." + "}" * (len(nested) - 1)
            raise ConfigError(f"{source}: deepspeed.extra key {path!r} is dotted; DeepSpeed reads nested mappings "
                              f"and would silently ignore it. Write {example} instead")
        if isinstance(value, dict):
            out[key] = _normalize(value, trail + (key,), source)
        elif trail in INTEGER_KEYS and key in INTEGER_NAMES:
            out[key] = _integral(value, path, source)
        else:
            out[key] = value
    return out


def validate_extra(extra: Dict[str, Any], source: str) -> Dict[str, Any]:
    """The normalized ``deepspeed.extra``, or a ConfigError naming the offending key."""
    extra = _normalize(extra or {}, (), source)
    for key in extra:
        if key in OWNED_KEYS:
            raise ConfigError(f"{source}: deepspeed.extra.{key} is set by fastdadpo; use {OWNED_KEYS[key]}")
        if key not in KNOWN_TOP_LEVEL_KEYS:
            match = difflib.get_close_matches(key, KNOWN_TOP_LEVEL_KEYS, n=1)
            hint = f" (did you mean {match[0]!r}?)" if match else ""
            raise ConfigError(f"{source}: deepspeed.extra.{key} is not a DeepSpeed config key{hint}; DeepSpeed "
                              f"would silently ignore it")
    _check_value_types(extra, source)
    zero = extra.get("zero_optimization", {})
    if "stage" in zero:
        raise ConfigError(f"{source}: deepspeed.extra.zero_optimization.stage is set by fastdadpo; use "
                          f"deepspeed.zero_stage")
    _check_zero_section(zero, source)
    _check_other_sections(extra, source)
    return extra


# Top-level keys DeepSpeed reads as sections (mappings) and as switches (booleans); a value of
# another type fails inside DeepSpeed's engine with its traceback, or is taken as truthy.
SECTION_KEYS = {"zero_optimization", "activation_checkpointing", "checkpoint", "flops_profiler", "tensorboard", "wandb",
                "csv_monitor", "comet", "comms_logger", "autotuning", "elasticity", "data_efficiency",
                "curriculum_learning", "compression_training", "aio", "nebula", "data_types", "pipeline", "compile",
                "timers", "weight_quantization", "hybrid_engine", "sparse_attention", "quantize_training",
                "eigenvalue", "progressive_layer_drop", "amp", "torch_autocast", "mixed_precision"}
SWITCH_KEYS = {"wall_clock_breakdown", "memory_breakdown", "dump_state", "prescale_gradients", "sparse_gradients",
               "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "disable_allgather",
               "dataloader_drop_last", "load_universal", "use_node_local_storage", "graph_harvesting",
               "use_data_before_expert_parallelism"}
TAG_VALIDATION = ("ignore", "warn", "fail")  # checkpoint.tag_validation, as DeepSpeed reads it


def _check_value_types(extra: dict, source: str) -> None:
    for key, value in extra.items():
        if key in SECTION_KEYS and not isinstance(value, dict):
            raise ConfigError(f"{source}: deepspeed.extra.{key} must be a mapping of DeepSpeed's {key} settings, got "
                              f"{value!r}")
        if key in SWITCH_KEYS and not isinstance(value, bool):
            raise ConfigError(f"{source}: deepspeed.extra.{key} must be true or false, got {value!r}")
    tag = extra.get("checkpoint", {}).get("tag_validation")
    if tag is not None and str(tag).lower() not in TAG_VALIDATION:
        raise ConfigError(f"{source}: deepspeed.extra.checkpoint.tag_validation is {tag!r}; DeepSpeed takes Ignore, "
                          f"Warn or Fail")


def _check_zero_section(zero: dict, source: str) -> None:
    if not zero:
        return  # nothing to check: DeepSpeed is not even imported
    quiet_deepspeed()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        raise ConfigError(f"{source}: deepspeed.extra.zero_optimization is invalid: {_model_problems(exc)}") from None


def _model_problems(exc) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def _section_readers() -> Dict[str, Any]:
    """{section: DeepSpeed's own reader of it} for the sections DeepSpeed validates with a model
    (pydantic): each is called here on the user's section alone, so a bad value fails now, named,
    not inside the engine after the models are loaded."""
    from deepspeed.comm.config import DeepSpeedCommsConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.runtime.config import HybridEngineConfig

    monitor = lambda key: lambda section: get_monitor_config({key: section})  # noqa: E731
    return {"tensorboard": monitor("tensorboard"), "wandb": monitor("wandb"), "csv_monitor": monitor("csv_monitor"),
            "comet": monitor("comet"), "comms_logger": lambda section: DeepSpeedCommsConfig({"comms_logger": section}),
            "compile": lambda section: CompileConfig(**section), "hybrid_engine": lambda section: HybridEngineConfig(**section)}


def _section_defaults() -> Dict[str, dict]:
    """{section: {key: DeepSpeed's default}} for the sections DeepSpeed reads key by key without
    checking (``get_scalar_param``): a key it does not know is ignored and a value of another type
    than its default is taken as it is ("maybe" is a truthy switch). Read from DeepSpeed's constants,
    so the keys follow the installed release."""
    from deepspeed.profiling import constants as flops
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT

    flops_defaults = {getattr(flops, name): getattr(flops, f"{name}_DEFAULT") for name in dir(flops)
                      if name.startswith("FLOPS_PROFILER_") and hasattr(flops, f"{name}_DEFAULT")}
    return {"activation_checkpointing": ACT_CHKPT_DEFAULT, "flops_profiler": flops_defaults, "aio": AIO_DEFAULT_DICT}


def _value_fits(value, default) -> bool:
    """``value`` has the type of DeepSpeed's ``default`` (a None default: anything; a switch may be
    null, which DeepSpeed reads as off)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return value is None or isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _check_other_sections(extra: dict, source: str) -> None:
    present = [key for key in extra if key != "zero_optimization" and isinstance(extra[key], dict)]
    if not present:
        return  # nothing to check: DeepSpeed is not even imported
    quiet_deepspeed()
    from pydantic import ValidationError

    readers, defaults = _section_readers(), _section_defaults()
    for key in present:
        section = extra[key]
        if key in readers:
            try:
                readers[key](section)
            except ValidationError as exc:
                raise ConfigError(f"{source}: deepspeed.extra.{key} is invalid: {_model_problems(exc)}") from None
        for name, value in section.items() if key in defaults else ():
            known = defaults[key]
            if name not in known:
                match = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {match[0]!r}?)" if match else ""
                raise ConfigError(f"{source}: deepspeed.extra.{key}.{name} is not one of DeepSpeed's {key} settings"
                                  f"{hint}; DeepSpeed would silently ignore it. It reads {', '.join(sorted(known))}")
            if isinstance(known[name], int) and not isinstance(known[name], bool) and isinstance(value, float):
                value = section[name] = _integral(value, f"{key}.{name}", source)  # 1.048576e6 as elsewhere
            if not _value_fits(value, known[name]):
                raise ConfigError(f"{source}: deepspeed.extra.{key}.{name} is {value!r}; DeepSpeed expects "
                                  f"{'true or false' if isinstance(known[name], bool) else type(known[name]).__name__}"
                                  f" (its default is {known[name]!r}) and would take this value unchecked")


def student_config(*, zero_stage: int, micro_batch_size: int, grad_accum: int, max_grad_norm: float,
                   dtype: torch.dtype, extra: dict, source: str) -> dict:
    """The student engine's DeepSpeed config: fastdadpo's settings, then ``deepspeed.extra``."""
    zero: Dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # final/ and checkpoints gather full 16-bit weights: without this flag DeepSpeed writes empty shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    base = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,  # a torch AdamW client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge_mappings(base, validate_extra(extra, source))


def inference_config(dtype: torch.dtype, *, offload: bool = False, extra: Optional[dict] = None) -> dict:
    """DeepSpeed config for a frozen model sharded with ZeRO-3 (a teacher, a generator)."""
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload:
        config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return merge_mappings(config, extra or {})


def teacher_extra(extra: dict) -> dict:
    """The part of ``deepspeed.extra`` that applies to frozen teachers: ZeRO-3 parameter settings."""
    zero = {k: v for k, v in (extra or {}).get("zero_optimization", {}).items()
            if k not in ("offload_optimizer", "stage3_gather_16bit_weights_on_model_save")}
    return {"zero_optimization": zero} if zero else {}
