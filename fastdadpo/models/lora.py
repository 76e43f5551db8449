"""LoRA students (``model.lora``): PEFT's adapters injected into a loaded model, and at export the
merged model and the adapter in PEFT's own layout."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List

from fastdadpo.base.errors import ConfigError


LORA_ADAPTER = "default"  # the adapter's name inside the model (PEFT's default)


@dataclass
class LoraSettings:
    """``model.lora``: train low-rank adapters (PEFT's LoRA) instead of the whole student; the export
    writes the merged model to final/ and the adapter to final-adapter/."""

    r: int = 16  # rank; 16 with alpha 32 and dropout 0.05: the TRL and PEFT examples' settings
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.05
    # Every linear projection of the decoder (QLoRA, Dettmers et al. 2023: adapting them all matters).
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])

    def validate(self, fail) -> None:
        if self.r < 1:
            fail("model.lora.r", f"must be >= 1, got {self.r}")
        if not self.alpha > 0:
            fail("model.lora.alpha", f"must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            fail("model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            fail("model.lora.target_modules", "must name at least one module (e.g. q_proj)")


def add_lora(model, lora) -> int:
    """LoRA adapters (``lora``: r, alpha, dropout, target_modules) injected in place into ``model``'s
    target projections; every other parameter frozen (the LM head too, so the fused kernels compute no
    weight gradient). Returns the number of adapted modules."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none")
    try:
        inject_adapter_in_model(config, model, adapter_name=LORA_ADAPTER)
    except ValueError as exc:  # no module matched
        raise ConfigError(f"model.lora.target_modules: {exc}") from None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    return sum(1 for name, _ in model.named_modules() if name.endswith(f"lora_A.{LORA_ADAPTER}"))


def merge_lora_state(state: dict, lora) -> tuple[dict, dict]:
    """(the merged model's state dict, the adapter's in PEFT's file layout) from a state dict with
    injected adapters: each adapted ``W`` becomes ``W + (alpha / r)·B·A`` under its original name."""
    scale = lora.alpha / lora.r
    a_suffix, b_suffix = f".lora_A.{LORA_ADAPTER}.weight", f".lora_B.{LORA_ADAPTER}.weight"
    merged, adapter = {}, {}
    for key, value in state.items():
        if key.endswith(a_suffix):
            module = key[:-len(a_suffix)]
            base = state[f"{module}.base_layer.weight"]
            lora_b = state[module + b_suffix]
            merged[f"{module}.weight"] = (base.float() + scale * lora_b.float() @ value.float()).to(base.dtype)
            adapter[f"base_model.model.{module}.lora_A.weight"] = value
            adapter[f"base_model.model.{module}.lora_B.weight"] = lora_b
        elif key.endswith(b_suffix) or key.endswith(".base_layer.weight"):
            continue
        elif ".base_layer." in key:  # a bias of an adapted projection
            merged[key.replace(".base_layer.", ".")] = value
        else:
            merged[key] = value
    return merged, adapter


def save_lora_adapter(directory: str, adapter: dict, lora, base_model: str) -> None:
    """The adapter as PEFT saves one (``PeftModel.from_pretrained(base, directory)`` loads it)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
               bias="none", base_model_name_or_path=base_model, task_type="CAUSAL_LM").save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(directory, "adapter_model.safetensors"))
