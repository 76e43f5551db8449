"""The training config: every default lives here, once.

A config is plain YAML with the sections below; ``--set KEY=VALUE`` (dot paths, later wins) changes
any key, the value parsed as YAML (``--set train.lr=1e-5``, ``--set model.teacher=null``). Unknown
keys, wrong types and bad values are ``ConfigError``s naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from .errors import ConfigError

# Where a default comes from is said next to it. Zephyr = Tunstall et al. 2023 (dSFT, dDPO);
# ADPA = Gao, Wan et al. 2025 and its released recipe (github.com/SLIT-AI/ADPA).
DEFAULT_LR = {  # train.lr when unset
    "sft": 2e-5, "kd": 2e-5, "dckd": 2e-5, "adpa": 2e-5,  # Zephyr dSFT
    "dpo": 5e-7, "dadpo": 5e-7, "dadpo_token": 5e-7,  # Zephyr dDPO
}


@dataclass
class ModelConfig:
    student: str = ""
    teacher: Optional[str] = None
    reference: Optional[str] = None  # π_ref; default: the starting student
    teacher_reference: Optional[str] = None  # ADPA: the teacher before its alignment
    dtype: Optional[str] = None  # bf16 | fp16 | fp32; default bf16 on GPU, fp32 on CPU


@dataclass
class DataConfig:
    train: str = ""
    eval: Optional[str] = None
    max_length: int = 1024
    max_prompt_length: int = 512
    packing: bool = False  # padding-free batches (sequences concatenated, positions restarting)
    cache_dir: Optional[str] = None  # tokenization and log-prob caches; default $FASTDADPO_CACHE or ~/.cache/fastdadpo


@dataclass
class ObjectiveConfig:
    name: str = "dadpo"
    beta: float = 0.1  # dpo, dadpo_token; Zephyr dDPO
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0
    average_logps: bool = False  # length-normalized sequence log-probs (IPO-style)
    beta1: float = 0.1  # dadpo: weight of KL(π‖π_ref); equals dDPO's β when beta2 = 0
    beta2: float = 0.1  # dadpo: weight of KL(π‖π_te); no published default in the sources we have
    alpha: float = 0.1  # dadpo_token: weight of the token-level divergence; no published default
    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd (kd, dadpo_token, dckd)
    jsd_beta: float = 0.5
    temperature: float = 1.0  # divides both models' logits in divergences and ADPA's advantage
    lambda_chosen: float = 0.1  # dckd; ADPA's released recipe
    lambda_rejected: float = 0.1  # dckd; ADPA's released recipe
    gamma: float = 1.6  # adpa; ADPA's released recipe
    ce_weight: float = 0.0  # kd: weight of the cross-entropy on the teacher's responses


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # pairs (or sequences, for chosen-only objectives) per rank per micro-step
    grad_accum: int = 1
    lr: Optional[float] = None  # default per objective: DEFAULT_LR
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; wins over epochs
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end (and on SIGTERM)
    eval_every: int = 0  # optimizer steps between evaluations on data.eval; 0: only at the end
    log_every: int = 1
    output_dir: str = "runs/fastdadpo"
    resume: Any = False  # true: the latest complete checkpoint in output_dir; a path: that checkpoint
    timeout_minutes: float = 30.0  # collectives; a rank that diverges fails loudly after this


@dataclass
class DeepSpeedSection:
    zero_stage: int = 3
    teacher_offload: bool = False  # teachers' ZeRO-3 shards live in CPU memory
    extra: Dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    source: str = field(default="<defaults>", compare=False)

    def to_dict(self) -> dict:
        raw = dataclasses.asdict(self)
        raw.pop("source")
        return raw

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else DEFAULT_LR[self.objective.name]


SECTIONS = {name: hint for name, hint in typing.get_type_hints(Config).items() if name != "source"}


# --- loading -----------------------------------------------------------------------------------------------

def load_config(path: Optional[str], overrides: List[str] = ()) -> Config:
    raw = read_yaml_mapping(path, "config") if path else {}
    for override in overrides:
        apply_override(raw, override)
    return config_from_mapping(raw, path or "<command line>")


def config_from_mapping(raw: Dict[str, Any], source: str) -> Config:
    """A validated Config from the raw mapping of a YAML file; ``source`` names it in errors."""
    config = _build(raw, source)
    validate(config)
    return config


def read_yaml_mapping(path: str, what: str) -> Dict[str, Any]:
    """A YAML file whose top level is a mapping (a config, a recipe); errors name the file and line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the {what} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, override: str) -> None:
    """``--set a.b.c=VALUE`` into the raw mapping, VALUE read as YAML (a plain string if it is not)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set train.lr=1e-5")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")  # deepspeed.extra.a.b=... nests below extra like any other path
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.setdefault(part, {}), dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = value


def _build(raw: dict, source: str) -> Config:
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section {name!r}{_suggest(name, SECTIONS)}; sections are "
                              f"{', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys, got {value!r}")
        sections[name] = _build_section(SECTIONS[name], value, name, source)
    return Config(**sections, source=source)


def _build_section(section_type, values: dict, section: str, source: str):
    hints = typing.get_type_hints(section_type)
    known = {f.name for f in dataclasses.fields(section_type)}
    kwargs = {}
    for key, value in values.items():
        path = f"{section}.{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown config key {path!r}{_suggest(key, known, section)}")
        kwargs[key] = _coerce(value, hints[key], path, source)
    return section_type(**kwargs)


def _suggest(key: str, options, section: str = "") -> str:
    match = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {(section + '.' if section else '') + match[0]!r}?)" if match else ""


def _coerce(value, annotation, path: str, source: str):
    """Check (and gently convert) a YAML value against a field's type."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return _coerce(value, inner, path, source)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin in (dict, typing.Dict) or annotation is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    expected = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{source}: {path} must be {_article(expected)}, got {value!r}")


def _article(type_name: str) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "dict": "a mapping", "Dict": "a mapping"}
    return names.get(type_name, f"a {type_name}")


# --- validation --------------------------------------------------------------------------------------------

_NEEDS = {  # what each objective needs from model.*
    "kd": ("teacher",), "dadpo": ("teacher",), "dadpo_token": ("teacher",), "dckd": ("teacher",),
    "adpa": ("teacher", "teacher_reference"),
}


def validate(config: Config) -> None:
    from .objectives import LOSS_TYPES, OBJECTIVES

    src = config.source
    o, t, d = config.objective, config.train, config.data

    def fail(key: str, message: str):
        raise ConfigError(f"{src}: {key} {message}")

    if o.name not in OBJECTIVES:
        fail("objective.name", f"is {o.name!r}; choose one of {', '.join(OBJECTIVES)}")
    for key in ("beta", "beta1", "temperature"):
        if not getattr(o, key) > 0:
            fail(f"objective.{key}", f"must be > 0, got {getattr(o, key)}")
    for key in ("beta2", "alpha", "lambda_chosen", "lambda_rejected", "gamma", "ce_weight"):
        if getattr(o, key) < 0:
            fail(f"objective.{key}", f"must be >= 0, got {getattr(o, key)}")
    if not 0 < o.jsd_beta < 1:
        fail("objective.jsd_beta", f"must be in (0, 1), got {o.jsd_beta}")
    if o.loss_type not in LOSS_TYPES:
        fail("objective.loss_type", f"is {o.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if o.kind not in ("forward_kl", "reverse_kl", "jsd"):
        fail("objective.kind", f"is {o.kind!r}; choose one of forward_kl, reverse_kl, jsd")
    if not 0 <= o.label_smoothing < 0.5:
        fail("objective.label_smoothing", f"must be in [0, 0.5), got {o.label_smoothing}")
    if o.label_smoothing and o.loss_type != "sigmoid":
        fail("objective.label_smoothing", f"applies to loss_type sigmoid only, not {o.loss_type!r}")
    if not config.model.student:
        fail("model.student", "is required: a Hugging Face model directory or hub name")
    for needed in _NEEDS.get(o.name, ()):
        if not getattr(config.model, needed):
            fail(f"model.{needed}", f"is required by objective {o.name!r}")
    if not d.train:
        fail("data.train", "is required: a JSONL, JSON or Parquet file, or a datasets directory")
    if not 0 < d.max_prompt_length < d.max_length:
        fail("data.max_prompt_length", f"({d.max_prompt_length}) must be positive and below data.max_length "
                                       f"({d.max_length})")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(t, key) < 1:
            fail(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("save_every", "eval_every"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.max_steps is not None and t.max_steps < 1:
        fail("train.max_steps", f"must be >= 1, got {t.max_steps}")
    if not t.epochs > 0:
        fail("train.epochs", f"must be > 0, got {t.epochs}")
    if config.lr <= 0:
        fail("train.lr", f"must be > 0, got {config.lr}")
    if not 0 <= t.warmup_ratio < 1:
        fail("train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    if not isinstance(t.resume, (bool, str)):
        fail("train.resume", f"must be true, false or a checkpoint path, got {t.resume!r}")
    if t.timeout_minutes <= 0:
        fail("train.timeout_minutes", f"must be > 0, got {t.timeout_minutes}")
    if config.deepspeed.zero_stage not in (0, 1, 2, 3):
        fail("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {config.deepspeed.zero_stage}")
    if config.deepspeed.teacher_offload and config.deepspeed.zero_stage != 3:
        fail("deepspeed.teacher_offload", "needs deepspeed.zero_stage 3")
    from .ds_config import validate_extra

    config.deepspeed.extra = validate_extra(config.deepspeed.extra, src)


def cache_dir(config: Config) -> str:
    return config.data.cache_dir or os.environ.get("FASTDADPO_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastdadpo")
