"""The training config: one dataclass per section, each field with its default and, beside it,
what it means and where the default comes from; each section validates its own keys.

A config is plain YAML with the sections below; ``--set KEY=VALUE`` (dot paths, later wins) changes
any key, the value parsed as YAML (``--set train.lr=1e-5``, ``--set model.teacher=null``). The
``objective:`` section parses into the chosen objective's own dataclass (``fastdadpo.objectives``):
a key that objective does not have is an error. Unknown keys, duplicate keys, wrong types,
non-finite numbers and bad values are ``ConfigError``s naming the key and where it was set (the
file, or ``--set``).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


from fastdadpo.base.errors import ConfigError
from fastdadpo.base.yaml_files import apply_override, check_shape, read_yaml_mapping
from fastdadpo.commands.trl_names import aliases_of, canonical_key, translate_section
from fastdadpo.core.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, Objective, ParameterError
from fastdadpo.core.tokenized import STRING_ROWS
from fastdadpo.engine.deepspeed.config import validate_extra
from fastdadpo.engine.deepspeed.engine import DeepSpeedEngine
from fastdadpo.engine.fsdp2.engine import FSDP2Engine
from fastdadpo.engine.interface import LR_SCHEDULES, Engine
from fastdadpo.kernels import BACKENDS, KernelSettings
from fastdadpo.models.loading import liger_unavailable_reason
from fastdadpo.models.lora import LoraSettings
from fastdadpo.models.served import ServerSettings, served_problem

REPORTERS = ("jsonl", "tensorboard", "wandb", "none")  # none: metrics.jsonl alone, as TRL's "none"
PROMPT_SHARE = 0.5  # data.max_prompt_length when unset: this share of data.max_length (TRL's 1024/512 ratio)


@dataclass
class ModelConfig:
    student: str = ""  # required: a Hugging Face model directory or Hub name
    teacher: Optional[str] = None  # the objectives that need one: a model sharing the student's tokenizer
    reference: Optional[str] = None  # π_ref; default: the starting student
    teacher_reference: Optional[str] = None  # ADPA: the teacher before its alignment
    dtype: Optional[str] = None  # bf16 | fp16 | fp32; default bf16 on GPU, fp32 on CPU
    # Liger's RMSNorm, RoPE and SwiGLU kernels in every model (never its losses: ours compute those):
    # auto = on CUDA for the architectures Liger supports; true = required (an error where impossible).
    liger_kernels: Any = "auto"
    lora: Optional[LoraSettings] = None  # null: train every parameter
    # A teacher too big to sit beside the student: its cached sequence log-probs come from this
    # OpenAI-compatible server (vLLM's prompt_logprobs) and the trainer never loads it; model.teacher
    # then gives only its tokenizer and config.
    teacher_url: Optional[str] = None
    teacher_model_name: Optional[str] = None  # the name it is served under; default: the server's only model
    reference_url: Optional[str] = None  # the same for π_ref, when model.reference names it
    reference_model_name: Optional[str] = None  # the name it is served under
    server: ServerSettings = field(default_factory=ServerSettings)  # how the served models are reached

    def validate(self, fail, objective: Objective) -> None:
        if not self.student:
            fail("model.student", "is required: a Hugging Face model directory or hub name")
        for needed in objective.required_models():
            if not getattr(self, needed):
                fail(f"model.{needed}", f"is required by objective {objective.name!r}")
        for role in ("teacher", "reference"):
            problem = served_problem(role, getattr(self, role), getattr(self, f"{role}_url"),
                                     getattr(self, f"{role}_model_name"), objective)
            if problem:
                fail(*problem)
        self.server.validate(fail, lambda name: f"model.server.{name}")
        if self.dtype not in (None, "bf16", "fp16", "fp32"):
            fail("model.dtype", f"is {self.dtype!r}; choose bf16, fp16 or fp32 (or leave it unset)")
        if self.liger_kernels not in ("auto", True, False):
            fail("model.liger_kernels", f"is {self.liger_kernels!r}; choose auto, true or false")
        if self.liger_kernels is True:
            reason = liger_unavailable_reason()
            if reason:
                fail("model.liger_kernels", f"is true, but {reason}; use auto (on where possible) or false")
        if self.lora is not None:
            self.lora.validate(fail)


def _check_directory(fail, key: str, path: str) -> None:
    """A directory the run will write: refused when it, or a folder on its way, is a file. (Whether
    it can be written is the trainer's to find out where it runs: `fastdadpo plan` may read a
    config meant for another machine.)"""
    if not path:
        fail(key, "must name a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(key, f"is {path!r}, but {existing!r} is a file, not a directory")


@dataclass
class DataConfig:
    train: str = ""  # required: JSONL, JSON, Parquet or a datasets.save_to_disk directory (DIR:split)
    eval: Optional[str] = None  # held-out rows in the same format, evaluated every train.eval_every steps
    max_length: int = 1024  # prompt + response tokens per sequence (TRL's DPO default)
    max_prompt_length: Optional[int] = None  # default: PROMPT_SHARE (half) of max_length
    packing: bool = False  # padding-free batches (sequences concatenated, positions restarting)
    cache_dir: Optional[str] = None  # tokenization and log-prob caches; default $FASTDADPO_CACHE or ~/.cache/fastdadpo
    # Plain-string rows: template (through the chat template, as one user turn and its reply) or raw (the
    # text itself, eos after each response: TRL's rule for its standard format; allows "text" rows).
    string_rows: str = "template"

    @property
    def prompt_length(self) -> int:
        """The prompt limit in force: the one given, or the documented share of ``max_length``."""
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        return max(1, int(self.max_length * PROMPT_SHARE))

    def validate(self, fail) -> None:
        if not self.train:
            fail("data.train", "is required: a JSONL, JSON or Parquet file, or a datasets directory")
        if self.max_length < 2:
            fail("data.max_length", f"must be at least 2 (a prompt token and a response token), got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            fail("data.max_prompt_length", f"({self.max_prompt_length}) must be positive and below data.max_length "
                                           f"({self.max_length})")
        if self.cache_dir is not None:
            _check_directory(fail, "data.cache_dir", self.cache_dir)
        if self.string_rows not in STRING_ROWS:
            fail("data.string_rows", f"is {self.string_rows!r}; choose {' or '.join(STRING_ROWS)}")

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.environ.get("FASTDADPO_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "fastdadpo")


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # pairs (or sequences, for chosen-only objectives) per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: Optional[float] = None  # default: the objective's default_lr
    epochs: float = 1.0  # passes over data.train
    max_steps: Optional[int] = None  # optimizer steps; wins over epochs
    warmup_ratio: float = 0.1  # Zephyr
    # warmup_cosine (ours: warmup from lr/warmup steps, then cosine to 0), or one of transformers' (TRL's):
    lr_scheduler_type: str = "warmup_cosine"  # linear, cosine, constant, constant_with_warmup... (LR_SCHEDULES)
    weight_decay: float = 0.0  # AdamW's
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    seed: int = 42  # initialization, data order, dropout
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end (and on SIGTERM)
    keep_checkpoints: int = 0  # the newest K complete checkpoints are kept, older ones deleted; 0 keeps all
    eval_every: int = 0  # optimizer steps between evaluations on data.eval; 0: only at the end
    log_every: int = 1  # optimizer steps between log lines
    # where metrics go besides metrics.jsonl (always written): tensorboard (output_dir/tensorboard; the
    # [tensorboard] extra), wandb (the [wandb] extra; WANDB_MODE=offline runs without a network)
    report_to: List[str] = field(default_factory=lambda: ["jsonl"])
    output_dir: str = "runs/fastdadpo"  # metrics.jsonl, config.yaml, checkpoints/, final/
    resume: Any = False  # true: the latest complete checkpoint in output_dir; a path: that checkpoint
    timeout_minutes: float = 30.0  # collectives; a rank that diverges fails loudly after this
    # Recompute the student's layer activations in backward instead of keeping them (non-reentrant, as
    # torch recommends): activation memory falls from every layer's to about one layer's, for roughly one
    # more forward of compute. Off by default: the tiny CPU runs do not need it; long sequences on GPUs do.
    gradient_checkpointing: bool = False

    def validate(self, fail) -> None:
        for key in ("micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                fail(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("save_every", "eval_every", "keep_checkpoints", "seed"):
            if getattr(self, key) < 0:
                fail(f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.seed >= 2**32:  # numpy's generators and torch.manual_seed take 32-bit seeds portably
            fail("train.seed", f"must be below 2^32, got {self.seed}")
        _check_directory(fail, "train.output_dir", self.output_dir)
        if self.max_steps is not None and self.max_steps < 1:
            fail("train.max_steps", f"must be >= 1, got {self.max_steps}")
        for key in ("epochs", "timeout_minutes") + (("lr",) if self.lr is not None else ()):
            if not getattr(self, key) > 0:
                fail(f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                fail(f"train.{key}", f"must be >= 0 (0: off), got {getattr(self, key)}")
        if not 0 <= self.warmup_ratio < 1:
            fail("train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler_type not in LR_SCHEDULES:
            fail("train.lr_scheduler_type", f"is {self.lr_scheduler_type!r}; choose from {', '.join(LR_SCHEDULES)}")
        unknown = [name for name in self.report_to if name not in REPORTERS]
        if unknown:
            fail("train.report_to", f"names {unknown}; choose from {', '.join(REPORTERS)}")
        for name in sorted(set(self.report_to) - {"jsonl", "none"}):
            if importlib.util.find_spec(name) is None:
                fail("train.report_to", f"asks for {name}, which is not installed: pip install 'fastdadpo[{name}]'")
        if not isinstance(self.resume, (bool, str)):
            fail("train.resume", f"must be true, false or a checkpoint path, got {self.resume!r}")
        if isinstance(self.resume, str) and not os.path.isdir(self.resume):
            fail("train.resume", f"is {self.resume!r}, which is not a directory; give a checkpoint directory "
                                 f"(OUTPUT_DIR/checkpoints/step-N) or true for the latest in train.output_dir")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 3  # the student's ZeRO stage: 0, 1, 2 or 3
    teacher_offload: bool = False  # teachers' ZeRO-3 shards live in CPU memory
    extra: Dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config

    def validate(self, fail, source: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            fail("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.teacher_offload and self.zero_stage != 3:
            fail("deepspeed.teacher_offload", "needs deepspeed.zero_stage 3")
        self.extra = validate_extra(self.extra, source)



ENGINE_NAMES = ("deepspeed", "fsdp2")


@dataclass
class EngineSection:
    """``engine:``: the distributed engine that trains. ``deepspeed`` (the default): DeepSpeed ZeRO,
    set in the ``deepspeed:`` section. ``fsdp2``: PyTorch's ``fully_shard`` per decoder layer, set
    here. ``engine: fsdp2`` is short for ``engine: {name: fsdp2}``."""

    name: str = "deepspeed"  # deepspeed | fsdp2
    # fsdp2: parameters, gradients and optimizer states in host memory (FSDP2's CPUOffloadPolicy), the
    # step on the CPU: for a student that does not fit the GPUs otherwise, at the speed of host memory.
    cpu_offload: bool = False
    # fsdp2: free each layer's gathered parameters after its forward and gather them again for its
    # backward (ZeRO-3's memory); false keeps them until the backward (one all-gather less per layer,
    # ZeRO-2's parameter memory). FSDP2's own default.
    reshard_after_forward: bool = True

    def validate(self, fail, deepspeed: "DeepSpeedSection") -> None:
        if self.name not in ENGINE_NAMES:
            fail("engine.name", f"is {self.name!r}; choose {' or '.join(ENGINE_NAMES)}")
        if self.name == "deepspeed":
            for key, default in (("cpu_offload", False), ("reshard_after_forward", True)):
                if getattr(self, key) != default:
                    fail(f"engine.{key}", "is read by engine fsdp2 only; with DeepSpeed offload and resharding are "
                                          "deepspeed.extra.zero_optimization settings")
        elif deepspeed != DeepSpeedSection():
            fail("deepspeed", "is read by engine deepspeed only, and this config trains with engine fsdp2; remove "
                              "the section (FSDP2's settings are engine.cpu_offload and engine.reshard_after_forward)")

    def build(self, deepspeed: "DeepSpeedSection", source: str) -> Engine:
        if self.name == "fsdp2":
            return FSDP2Engine(cpu_offload=self.cpu_offload, reshard_after_forward=self.reshard_after_forward)
        return DeepSpeedEngine(deepspeed.zero_stage, deepspeed.teacher_offload, deepspeed.extra, source)


@dataclass
class KernelsSection:
    """``kernels:``: the fused kernels' backend and memory budget, passed to every kernel call the
    trainer makes (the objectives' and the cached log-probs'). Unset: the environment
    (``FASTDADPO_KERNEL_BACKEND``, ``FASTDADPO_CHUNK_BUDGET_MB``), else the kernels' defaults."""

    # chunked (the default: budgeted row chunks, the row sweep Triton on CUDA and torch elsewhere),
    # chunked_triton, torch, triton (the tile-fused kernels) or naive (materialized logits: a reference)
    backend: Optional[str] = None
    # MiB one kernel call may take above its inputs, gradients included; default 1400 on CUDA, 160 on CPU
    chunk_budget_mb: Optional[float] = None

    def validate(self, fail) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            fail("kernels.backend", f"is {self.backend!r}; choose one of {', '.join(BACKENDS)} (or leave it unset)")
        if self.chunk_budget_mb is not None and not self.chunk_budget_mb > 0:
            fail("kernels.chunk_budget_mb", f"must be > 0 MiB, got {self.chunk_budget_mb}")

    def settings(self) -> KernelSettings:
        return KernelSettings(backend=self.backend, chunk_budget_mb=self.chunk_budget_mb)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: Objective = field(default_factory=OBJECTIVES[DEFAULT_OBJECTIVE])
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineSection = field(default_factory=EngineSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    source: str = field(default="<defaults>", compare=False)

    def to_dict(self) -> dict:
        raw = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("source", "objective")}
        return {**raw, "objective": self.objective.to_dict()}

    def build_engine(self) -> Engine:
        """The distributed engine this config trains with."""
        return self.engine.build(self.deepspeed, self.source)

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else self.objective.default_lr


SECTIONS = {name: hint for name, hint in typing.get_type_hints(Config).items() if name not in ("source", "objective")}
SECTION_NAMES = ("model", "data", "objective", "train", "engine", "deepspeed", "kernels")


# --- loading -----------------------------------------------------------------------------------------------

def load_config(path: Optional[str], overrides: List[str] = ()) -> Config:
    raw = read_yaml_mapping(path, "config") if path else {}
    if isinstance(raw.get("engine"), str):  # ``engine: fsdp2``, so that --set engine.cpu_offload=... applies
        raw["engine"] = {"name": raw["engine"]}
    overridden = {}
    for override in overrides:
        overridden[apply_override(raw, override)] = override
    return config_from_mapping(raw, path or "<command line>", overridden)


def config_from_mapping(raw: Dict[str, Any], source: str, overridden: Optional[Dict[str, str]] = None) -> Config:
    """A validated Config from the raw mapping of a YAML file; ``source`` names it in errors, and
    ``overridden`` ({dot path: the --set that gave it}) names the --set for keys given there."""
    where = _Where(source, overridden or {})
    check_shape(raw, source)
    config = _build(raw, where)
    validate(config, where)
    return config


@dataclass
class _Where:
    """Where a key was set, for errors: the --set that gave it, else the file."""

    source: str
    overridden: Dict[str, str]

    def __call__(self, key: str) -> str:
        for given, override in self.overridden.items():
            section, _, name = given.partition(".")
            path = f"{section}.{canonical_key(section, name)}" if name else given  # TRL's name given
            if key == path or key.startswith(path + ".") or path.startswith(key + "."):
                return f"--set {override.split('=', 1)[0]}"
        return self.source

    def fail(self, key: str, message: str):
        raise ConfigError(f"{self(key)}: {key} {message}")


def _build(raw: dict, where: _Where) -> Config:
    sections = {}
    for name, value in raw.items():
        if name not in SECTION_NAMES:
            raise ConfigError(f"{where(name)}: unknown config section {name!r}{_suggest(name, SECTION_NAMES)}; "
                              f"sections are {', '.join(SECTION_NAMES)}")
        if name == "engine" and isinstance(value, str):
            value = {"name": value}  # ``engine: fsdp2``
        if not isinstance(value, dict):
            raise ConfigError(f"{where(name)}: section {name!r} must be a mapping of keys, got {value!r}")
        if name == "objective":
            sections[name] = _build_objective(value, where)
        else:
            sections[name] = SECTIONS[name](**_section_values(SECTIONS[name], value, name, where))
    return Config(**sections, source=where.source)


def _section_values(section_type, values: dict, section: str, where: _Where) -> dict:
    hints = typing.get_type_hints(section_type)
    known = [f.name for f in dataclasses.fields(section_type)]
    kwargs = {}
    for key, value in translate_section(section, values, where.overridden, where.fail).items():
        path = f"{section}.{key}"
        if key not in known:
            raise ConfigError(f"{where(path)}: unknown config key {path!r}{_suggest(key, known, section)}")
        kwargs[key] = _coerce(value, hints[key], path, where)
    return kwargs


def _build_objective(values: dict, where: _Where) -> Objective:
    values = dict(values)
    name = values.pop("name", DEFAULT_OBJECTIVE)
    if not isinstance(name, str) or name not in OBJECTIVES:
        where.fail("objective.name", f"is {name!r}; choose one of {', '.join(OBJECTIVES)}")
    objective_type = OBJECTIVES[name]
    for key in values:
        if key not in {f.name for f in objective_type.parameters()}:
            users = [other for other, cls in OBJECTIVES.items() if key in {f.name for f in cls.parameters()}]
            used_by = f" (it is a parameter of {', '.join(users)})" if users else ""
            params = ", ".join(f.name for f in objective_type.parameters()) or "no parameters"
            raise ConfigError(f"{where('objective.' + key)}: objective.{key} is not a parameter of objective "
                              f"{name!r}{used_by}; {name!r} has {params}")
    try:
        return objective_type(**_section_values(objective_type, values, "objective", where))
    except ParameterError as exc:
        where.fail(f"objective.{exc.key}", exc.message)


def _suggest(key: str, options, section: str = "") -> str:
    """A near name among ``options`` and TRL's names for them (said as such)."""
    if not isinstance(key, str):
        return ""
    trl = {alias: ours for alias, ours in aliases_of(section).items() if ours in options}
    match = difflib.get_close_matches(key, list(options) + list(trl), n=1)
    if not match:
        return ""
    prefix = section + "." if section else ""
    if match[0] in trl:
        return f" (did you mean {prefix + match[0]!r}, TRL's name for {prefix + trl[match[0]]!r}?)"
    return f" (did you mean {prefix + match[0]!r}?)"


def _coerce(value, annotation, path: str, where: _Where):
    """Check (and gently convert) a YAML value against a field's type."""
    if isinstance(annotation, str):
        annotation = {"str": str, "int": int, "float": float, "bool": bool}.get(annotation, Any)
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return _coerce(value, inner, path, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,30}", value.strip()):
            number = int(value)
        if number is not None:
            if abs(number) > MAX_INT:
                where.fail(path, f"is {_short(value)}, beyond any sensible value (|n| ≤ 2^63 − 1)")
            return number
    elif annotation is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                where.fail(path, f"must be a finite number, got {_short(value)}")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin in (dict, typing.Dict) or annotation is dict:
        if isinstance(value, dict):
            return value
    elif origin in (list, typing.List):
        if isinstance(value, str):  # one item, as TRL's report_to takes "tensorboard"
            return [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        where.fail(path, f"must be a list of strings, got {value!r}")
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, dict):
            return annotation(**_section_values(annotation, value, path, where))
        where.fail(path, f"must be a mapping of keys ({', '.join(f.name for f in dataclasses.fields(annotation))}), "
                         f"got {value!r}")
    else:
        return value
    expected = getattr(annotation, "__name__", str(annotation))
    where.fail(path, f"must be {_article(expected)}, got {value!r}")


def _number(value) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            return math.inf
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


MAX_INT = 2**63 - 1


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


def _article(type_name: str) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "dict": "a mapping", "Dict": "a mapping"}
    return names.get(type_name, f"a {type_name}")


# --- validation --------------------------------------------------------------------------------------------

def validate(config: Config, where: Optional[_Where] = None) -> None:
    where = where or _Where(config.source, {})
    config.model.validate(where.fail, config.objective)
    config.data.validate(where.fail)
    config.train.validate(where.fail)
    config.deepspeed.validate(where.fail, where("deepspeed.extra"))
    config.engine.validate(where.fail, config.deepspeed)
    config.kernels.validate(where.fail)
