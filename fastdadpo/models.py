"""Loading Hugging Face causal LMs and reaching the two things the fused kernels need: the final
hidden states (from the decoder, without the LM head) and the LM-head weight.

Under ZeRO-3 a model is loaded already partitioned (``HfDeepSpeedConfig`` alive during
``from_pretrained``), never as a full copy per rank.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
from typing import Optional

import torch

from .errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Models whose logits are not hidden @ lm_head.T: the fused path would compute something else.
_UNSUPPORTED_HEAD_FEATURES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """``model.dtype``: bf16 on GPU, fp32 on CPU by default."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attn when installed (GPU, half precision), PyTorch SDPA otherwise."""
    if device.type == "cuda" and dtype != torch.float32 and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _looks_local(path: str) -> bool:
    """A path rather than a hub id ("name" or "org/name")."""
    return path.startswith(("/", ".", "~")) or path.endswith("/") or path.count("/") >= 2


def check_model_dir(path: str, key: str) -> None:
    """A local Hugging Face model directory, or something that can only be a hub id."""
    if not path:
        raise ConfigError(f"{key}: no model given")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ConfigError(f"{key}: {path} is a directory without config.json; give a Hugging Face model "
                              f"directory")
    elif _looks_local(path):
        raise ConfigError(f"{key}: {path} does not exist")


def require_model_dir(path: str, key: str) -> None:
    """A local Hugging Face model directory (nothing is downloaded)."""
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{key}: {path!r} is not a directory; give a local Hugging Face model directory "
                          f"(with config.json and the tokenizer)")
    check_model_dir(path, key)


def resolve_device(name=None) -> torch.device:
    """``name``, or CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} asked for, but CUDA is not available on this machine")
    return device


def load_tokenizer(path: str, key: str):
    """The model's tokenizer; one without a pad token pads with its eos token."""
    from transformers import AutoTokenizer

    check_model_dir(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{key}: the tokenizer of {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def right_padded(sequences, pad_id: int):
    """``(input_ids, attention_mask)`` of right-padded sequences: with causal attention the hidden
    states of real tokens do not depend on the padding after them, and positions start at 0."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


@contextlib.contextmanager
def zero3_loading(ds_config: Optional[dict]):
    """Keep an ``HfDeepSpeedConfig`` alive while loading, so weights arrive partitioned."""
    if ds_config is None or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay referenced during loading)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds_config


def load_causal_lm(path: str, *, dtype: torch.dtype, device: torch.device, ds_config: Optional[dict] = None,
                   key: str = "model", trainable: bool = False):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_model_dir(path, key)
    with zero3_loading(ds_config):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                         attn_implementation=attention_implementation(device, dtype))
        except SafetensorError as exc:
            raise ConfigError(f"{key}: the weights in {path!r} cannot be read ({exc}); a .safetensors file there is "
                              f"truncated or corrupt (an interrupted copy or download?): copy or export the model "
                              f"again") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot load a causal LM from {path!r}: {exc}") from None
    check_fused_head_supported(model, key)
    if ds_config is None:
        model.to(device)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def check_fused_head_supported(model, key: str) -> None:
    for feature in _UNSUPPORTED_HEAD_FEATURES:
        value = getattr(model.config, feature, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            raise ConfigError(f"{key}: the model's logits use {feature}={value}, which the fused kernels do not "
                              f"apply (they compute hidden @ lm_head.T); this architecture is not supported")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ConfigError(f"{key}: the fused kernels need a bias-free linear LM head "
                          f"(found {type(head).__name__ if head is not None else 'none'})")


def decoder(model):
    """The model without its LM head (returns final, normed hidden states)."""
    return getattr(model, model.base_model_prefix)


def head_weight(model) -> torch.nn.Parameter:
    return model.get_output_embeddings().weight


def head_rows(model) -> int:
    """Rows of the LM head (the padded vocabulary), also under ZeRO-3 where the local shard is empty."""
    weight = head_weight(model)
    return int(weight.ds_shape[0]) if hasattr(weight, "ds_shape") else weight.shape[0]


def final_hidden_states(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
    return out.last_hidden_state


def count_parameters(model) -> int:
    return sum(int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())


def zero3_inference_config(dtype: torch.dtype, *, offload: bool = False, extra: Optional[dict] = None) -> dict:
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
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def frozen_engine(model, ds_config: dict):
    """Wrap a frozen model (loaded under ``zero3_loading(ds_config)``) in a DeepSpeed engine, whose
    hooks gather each layer's shards for its forward. No optimizer: nothing is trained."""
    import deepspeed

    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    engine.eval()
    return engine


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
