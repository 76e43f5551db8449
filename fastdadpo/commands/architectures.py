"""What the planner knows of a model without loading it: its architecture (``Architecture``), from a
model directory's ``config.json``; for a Hub name, from its ``config.json`` in the Hugging Face cache,
else from the tables shipped in ``plan_data/`` (``--arch``), else downloaded from the Hub (unless
``HF_HUB_OFFLINE`` is set): so any Hub model plans, and the common ones plan offline."""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from fastdadpo.base.errors import ConfigError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # OWNER/NAME
PLAN_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_data")


@dataclass(frozen=True)
class Architecture:
    """The shapes the memory model needs, from a model's config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # LM-head rows
    tied: bool
    model_type: str = "llama"
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = ""
    source: str = ""  # where the shapes came from, for the output

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """One decoder layer: q/k/v/o projections (+ q/k/v biases: Qwen2 always has them), the
        gated MLP's gate/up/down (3·H·I), two RMSNorm weights (2·H)."""
        h = self.hidden
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.attention_bias:
            attention += self.q_dim + 2 * self.kv_dim
        mlp = 3 * h * self.intermediate + (2 * self.intermediate + h if self.mlp_bias else 0)
        return attention + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Embedding V·H, the layers, the final norm H, and an untied LM head V·H."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embedding_params + self.layers * self.layer_params() + self.hidden + head

    @property
    def largest_module_params(self) -> int:
        """The largest set of parameters ZeRO-3 gathers for one module's forward: the embedding
        (or LM head, V·H) or the widest projection (an MLP matrix H·I, or q_proj H·q_dim)."""
        return max(self.embedding_params, self.hidden * self.intermediate, self.hidden * self.q_dim)

    def linear_shapes(self) -> Dict[str, Tuple[int, int]]:
        """(in, out) features of each decoder projection, by the module names LoRA targets."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def lora_params(self, rank: int, targets: Tuple[str, ...]) -> int:
        """LoRA adapters: A [r, in] and B [out, r] per targeted projection per layer, r·(in + out)."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * sum(shapes[t]) for t in targets if t in shapes)

    def describe(self) -> str:
        kv = f" ({self.kv_heads} KV)" if self.kv_heads != self.heads else ""
        return (f"{self.params / 1e9:.2f}B parameters, hidden {self.hidden}, {self.layers} layers, {self.heads} heads"
                f"{kv}, MLP {self.intermediate}, vocabulary {self.vocab:,}{', tied embeddings' if self.tied else ''}")


def architecture_from_config(values: dict, name: str = "", source: str = "") -> Architecture:
    """An Architecture from a Hugging Face config's fields (a dict)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source or name}: the model config must be a JSON object, got {type(values).__name__}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if values.get(k) is None]
    if missing:
        raise ConfigError(f"{source or name}: the model config has no {', '.join(missing)}; fastdadpo plan "
                          f"covers dense decoder configs (Llama, Qwen2, Mistral and their kind)")
    shape = {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "num_key_value_heads", "head_dim"):
        value = values.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source or name}: {key} is {value!r}; a model's shape is positive integers")
        shape[key] = value
    heads = shape["num_attention_heads"]
    hidden = shape["hidden_size"]
    kv_heads = shape.get("num_key_value_heads", heads)
    # Grouped-query attention shares each KV head among a whole number of query heads; without
    # head_dim a head is hidden // heads wide, which must be exact. A config breaking either does not
    # build in transformers either, so its memory plan would describe a model that cannot exist.
    if heads % kv_heads:
        raise ConfigError(f"{source or name}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                          f"{kv_heads}; each key/value head serves a whole number of query heads")
    if "head_dim" not in shape and hidden % heads:
        raise ConfigError(f"{source or name}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                          f"and the config gives no head_dim")
    model_type = str(values.get("model_type", "llama"))
    return Architecture(
        hidden=hidden, layers=int(values["num_hidden_layers"]), heads=heads,
        kv_heads=kv_heads,
        head_dim=int(values.get("head_dim") or hidden // heads), intermediate=int(values["intermediate_size"]),
        vocab=int(values["vocab_size"]), tied=bool(values.get("tie_word_embeddings", False)), model_type=model_type,
        attention_bias=model_type == "qwen2" or bool(values.get("attention_bias", False)),
        mlp_bias=bool(values.get("mlp_bias", False)), name=name, source=source)


def known_architectures() -> Dict[str, dict]:
    """{table name: entry} of the shipped tables (``fastdadpo/plan_data/*.json``)."""
    tables = {}
    for path in sorted(glob.glob(os.path.join(PLAN_DATA, "*.json"))):
        with open(path, encoding="utf-8") as handle:
            tables[os.path.splitext(os.path.basename(path))[0]] = json.load(handle)
    return tables


def _known_match(path: str) -> Optional[Tuple[str, str]]:
    """(table name, why) for a path that is not a local directory: an exact hub name first, else the
    longest path hint found in the lowercased path (``vicuna-7b-pruned20`` before ``vicuna-7b``)."""
    tables = known_architectures()
    lowered = path.lower().rstrip("/")
    for table, entry in tables.items():
        if lowered in (n.lower() for n in entry.get("names", ())) or lowered == table:
            return table, "by name"
    hints = sorted(((hint.lower(), table) for table, entry in tables.items() for hint in entry.get("path_hints", ())),
                   key=lambda pair: -len(pair[0]))
    for hint, table in hints:
        if hint in lowered:
            return table, f"'{hint}' in the path"
    return None


def load_architecture(path: str, key: str, table: Optional[str] = None) -> Architecture:
    """The architecture of ``model.<key>``: its local directory's config.json, else a shipped table."""
    tables = known_architectures()
    if table is None and path and os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ConfigError(f"{key}: {path} is a directory without config.json; give a Hugging Face model directory")
        return _from_config_file(config_path, key, path)
    cached = _hub_config(path, download=False) if table is None and path else None
    if cached is not None:
        return _from_config_file(cached, key, path)
    if table is not None:
        if table not in tables:
            raise ConfigError(f"--arch {key}={table}: no such architecture table; known: {', '.join(tables)}")
        why = "given by --arch"
    else:
        match = _known_match(path or "")
        downloaded = _hub_config(path, download=True) if match is None and path else None
        if downloaded is not None:
            return _from_config_file(downloaded, key, path)
        if match is None:
            raise ConfigError(f"{key}: {path!r} is not a local model directory, not a Hub model whose config.json "
                              f"is cached or can be downloaded, and not a known architecture (tables: "
                              f"{', '.join(tables)}); give a local Hugging Face directory, or name a table with "
                              f"--arch {key}=NAME")
        table, why = match
    entry = tables[table]
    return architecture_from_config(
        entry["config"], name=entry.get("title", table),
        source=f"known architecture table {table} ({why}; shapes from {entry.get('source', 'its config')})")


def _hub_config(name: str, download: bool) -> Optional[str]:
    """The path of Hub model ``name``'s config.json: from the local Hugging Face cache (no network),
    or with ``download`` fetched (not when HF_HUB_OFFLINE is set); None when neither works."""
    if not _HUB_NAME.match(name):
        return None
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    if not download:
        found = try_to_load_from_cache(name, "config.json")
        return found if isinstance(found, str) else None
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return hf_hub_download(name, "config.json", etag_timeout=10)
    except Exception:  # noqa: BLE001 (not found, gated, no network: the caller's error says what to do)
        return None


def _from_config_file(config_path: str, key: str, path: str) -> Architecture:
    try:
        with open(config_path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read {config_path}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: {config_path} must hold a JSON object, found a {type(values).__name__}")
    values = values.get("text_config", values) if "hidden_size" not in values else values
    return architecture_from_config(values, name=path, source=f"{config_path}")
