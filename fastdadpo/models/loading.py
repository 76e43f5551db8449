"""Loading Hugging Face causal LMs and reaching the two things the fused kernels need: the final
hidden states (from the decoder, without the LM head) and the LM-head weight.

A distributed engine that shards weights as they load (ZeRO-3) passes its loading context
(``sharded_loading``), so a model never arrives as a full copy per rank.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import pickle
from typing import ContextManager, Optional

import torch

from fastdadpo.base.errors import ConfigError


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# Config fields that change a model's logits from hidden @ lm_head.T. The fused kernels apply
# z = cap·tanh(scale·x/cap) (``head_logit_options``); each field is read as what its architecture's
# forward does with it, and refused where that is anything else or unknown.
#   final_logit_softcapping  Gemma 2/3 and others: logits = cap·tanh(logits/cap)    -> softcap
#   logit_scale              Cohere, Cohere 2: logits = logits·logit_scale          -> scale
#   logits_scaling           Granite, MiniCPM 3: logits / logits_scaling (MiniCPM 3 divides the final
#                            hidden states, the same for a bias-free head) -> scale 1/value;
#                            HyperCLOVA X: logits·logits_scaling -> scale value; elsewhere unknown
#   output_multiplier_scale  no architecture known here applies it to the logits: refused
_HEAD_FEATURES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


_DIVIDING_LOGITS_SCALING = ("granite", "minicpm")  # model_type prefixes


_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


def loading_failure(key: str, path: str, what: str, exc: BaseException) -> ConfigError:
    """The one paragraph for a model directory that cannot be loaded: whatever transformers,
    tokenizers or torch raised for a bad file in it (a ``config.json`` that is a list or lacks a field,
    a corrupt ``tokenizer.json``, a pickled checkpoint that ``weights_only`` refuses). Out-of-memory
    errors are not the directory's: the caller re-raises them."""
    detail = " ".join(str(exc).split())[:240] or type(exc).__name__
    missing = _missing_shape_fields(path)
    if missing and "mismatch" in detail.lower():
        detail = (f"its config.json has no {', '.join(missing)}, so transformers used its class default and the "
                  f"weights do not fit that shape; write the model's own value(s) into config.json")
    if isinstance(exc, pickle.UnpicklingError):
        detail = ("its weights are a pickle that needs more than tensors to load, refused because unpickling it "
                  "could run code; convert them to safetensors with a tool you trust")
    return ConfigError(f"{key}: cannot load {what} from {path!r} ({type(exc).__name__}: {detail})")


# The fields a decoder's shape comes from; a config.json without one gets the class default silently.
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _missing_shape_fields(path: str) -> list:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return []
    return [name for name in SHAPE_FIELDS if isinstance(config, dict) and name not in config]


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


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


def _attention_for(path: str, device: torch.device, dtype: torch.dtype) -> str:
    """``attention_implementation``, or eager attention for an architecture without SDPA (Gemma 2:
    its attention logits are soft-capped, which SDPA cannot apply)."""
    chosen = attention_implementation(device, dtype)
    if chosen != "sdpa":
        return chosen
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping.get(type(AutoConfig.from_pretrained(path)), None)
    except Exception:  # noqa: BLE001 (loading the model reports what is wrong with the directory)
        return chosen
    return "eager" if model_class is not None and not getattr(model_class, "_supports_sdpa", True) else chosen


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
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {name!r} is not a device fastdadpo runs on; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} asked for, but CUDA is not available on this machine")
    return device


def load_tokenizer(path: str, key: str):
    """The model's tokenizer; one without a pad token pads with its eos token."""
    from transformers import AutoTokenizer

    check_model_dir(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 (see loading_failure)
        if _out_of_memory(exc):
            raise
        raise loading_failure(key, path, "a tokenizer", exc) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{key}: the tokenizer of {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def liger_unavailable_reason(model_type: Optional[str] = None) -> Optional[str]:
    """Why Liger's model kernels cannot run here (or for ``model_type``); None when they can."""
    if not torch.cuda.is_available():
        return "Liger's kernels are Triton GPU kernels and this machine has no CUDA device"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if model_type is not None and model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for the {model_type!r} architecture"
    return None


def apply_liger_kernels(model, setting, key: str) -> bool:
    """``model.liger_kernels`` on one loaded model: patches its RMSNorm, RoPE and SwiGLU with Liger's
    kernels (never Liger's losses: the fused kernels here compute those). Returns whether it did."""
    if setting is False:
        return False
    reason = liger_unavailable_reason(model.config.model_type)
    if reason:
        if setting is True:
            raise ConfigError(f"model.liger_kernels is true, but for {key} {reason}; use auto or false")
        return False
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def load_causal_lm(path: str, *, dtype: torch.dtype, device: torch.device, key: str = "model",
                   trainable: bool = False, liger_kernels=False, sharded_loading: Optional[ContextManager] = None):
    """The model at ``path`` (frozen and in eval mode unless ``trainable``), on ``device``; under
    ``sharded_loading`` (an engine's) its weights arrive sharded and stay where the engine puts them."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_model_dir(path, key)
    with sharded_loading or contextlib.nullcontext():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                         attn_implementation=_attention_for(path, device, dtype))
        except SafetensorError as exc:
            raise ConfigError(f"{key}: the weights in {path!r} cannot be read ({exc}); a .safetensors file there is "
                              f"truncated or corrupt (an interrupted copy or download?): copy or export the model "
                              f"again") from None
        except Exception as exc:  # noqa: BLE001 (see loading_failure)
            if _out_of_memory(exc):
                raise
            raise loading_failure(key, path, "a causal LM", exc) from None
    check_fused_head_supported(model, key)
    apply_liger_kernels(model, liger_kernels, key)
    if sharded_loading is None:
        model.to(device)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def head_logit_options(config, key: str) -> dict:
    """``{"softcap": cap or None, "logit_scale": scale}``: how ``config``'s model maps its head's raw
    outputs to its logits, as the fused kernels take it (``softcap=``, ``logit_scale=``)."""
    model_type = str(getattr(config, "model_type", "") or "")
    softcap, scale = None, 1.0
    for feature in _HEAD_FEATURES:
        value = getattr(config, feature, None)
        off = (None, 0, 0.0, False) if feature == "final_logit_softcapping" else (None, 1, 1.0, False)
        if value in off and not (value is True):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key}: the model's config has {feature}={value!r}, not a positive number the fused "
                              f"kernels can apply to its logits")
        if feature == "final_logit_softcapping":
            softcap = float(value)
        elif feature == "logit_scale":
            scale *= float(value)
        elif feature == "logits_scaling" and model_type.startswith(_DIVIDING_LOGITS_SCALING):
            scale /= float(value)
        elif feature == "logits_scaling" and model_type.startswith(_MULTIPLYING_LOGITS_SCALING):
            scale *= float(value)
        else:
            raise ConfigError(f"{key}: the model's logits use {feature}={value} (model_type {model_type!r}), whose "
                              f"effect on the logits this architecture defines in its own forward and the fused "
                              f"kernels do not know (they apply a soft cap and a scale to hidden @ lm_head.T); "
                              f"this architecture is not supported")
    return {"softcap": softcap, "logit_scale": scale}


def check_fused_head_supported(model, key: str) -> None:
    head_logit_options(model.config, key)
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


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
