"""``fastdadpo plan CONFIG.yaml``: the memory one training step needs per GPU, before launching.

It reads the training config and the models' architecture configs only (no weights), and adds up,
per rank, one small function per term below (each says where its bytes come from): the student's
parameters, gradients and AdamW states under the ZeRO stage and offload in force, each online
teacher's ZeRO-3 shard plus its gathered LM head (a full copy per rank) plus what ZeRO-3 gathers
at a time, the student's activations at ``data.max_length`` (with and without activation
checkpointing), the teachers' no-grad forward, and the fused kernels' buffers (their own row-chunk
rule, and the dW accumulator [V, H]). Terms that are alive together are summed per phase of a step
(precompute, teacher forward, student forward/backward, optimizer step); the peak is the largest
phase. Then: the largest micro-batch that fits ``--gpu-memory``, and what to change when nothing fits.

Figures are planned for the worst case of the config: every sequence ``data.max_length`` tokens,
every position a response token. ``--device cpu`` plans what a CPU run holds in host memory (fp32,
the chunked-torch kernels), the mode ``bench/plan_check.py`` checks against measured peak RSS.

A model named by a path that is not a local directory (a hub name, or a run's output that does not
exist yet) is looked up in the architecture tables shipped in ``fastdadpo/plan_data/`` by hub name,
else by a distinctive part of the path (``runs/qwen2.5-1.5b-dsft/final`` is Qwen2.5-1.5B); the output
says so. ``--arch model.student=NAME`` names the table to use.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fastdadpo.base.endpoint import display_url
from fastdadpo.base.errors import ConfigError
from fastdadpo.commands.architectures import Architecture, load_architecture
from fastdadpo.commands.config import load_config
from fastdadpo.commands.memory_terms import (DS_MAX_LIVE, DS_PERSISTENCE, DS_PREFETCH_BUCKET, DS_REDUCE_BUCKET,
                                             LIGER_ARCHS, Models, Plan, Setting, build_plan)

GIB = 2**30
FSDP2_NOTE = ("engine fsdp2: its terms are ZeRO-3's where they agree (parameters, gradients and AdamW states "
              "sharded over every rank; engine.cpu_offload as ZeRO-3's parameter and optimizer offload) and its own "
              "where they differ: fp32 weights that are their own master, fp32 gradient shards freed after each "
              "step, no reduce bucket, the root group (embeddings, head) and two layers gathered")
# The largest micro-batch the search tries.
MAX_MICRO_BATCH = 4096


# P: parameters, W: ranks, b: the model dtype's bytes (2 bf16/fp16, 4 fp32), V/H: vocabulary and hidden size.
# With model.lora the weights are the frozen base plus the adapters, and everything the optimizer holds
# (gradients, master weights, moments) covers the adapters only: ``trained_params``.


# --- from a config ---------------------------------------------------------------------------------------------

def setting_from_config(config, *, ranks: int, device: str, micro_batch: Optional[int] = None,
                        checkpointing: Optional[bool] = None, **changes) -> Setting:
    """The Setting a training config asks for, on ``ranks`` ranks of ``device``."""
    zero = dict(config.deepspeed.extra.get("zero_optimization", {}))
    if config.engine.name == "fsdp2":  # planned with ZeRO-3's terms: see fsdp2_note
        offload = "cpu" if config.engine.cpu_offload else "none"
        zero = {"offload_optimizer": {"device": offload}, "offload_param": {"device": offload},
                "stage3_param_persistence_threshold": 0}
        changes = {"zero_stage": 3, "engine": "fsdp2", "teacher_offload": config.engine.cpu_offload, **changes}
    dtype = config.model.dtype or ("bf16" if device == "gpu" else "fp32")

    def offloaded(section: str) -> bool:
        return str(zero.get(section, {}).get("device", "none")).lower() in ("cpu", "nvme")

    student_type = changes.pop("student_type", "")
    liger_setting = getattr(config.model, "liger_kernels", False)
    liger = device == "gpu" and liger_setting is not False and student_type in LIGER_ARCHS
    values = dict(
        ranks=ranks, device=device, dtype_bytes=4 if dtype == "fp32" else 2, zero_stage=config.deepspeed.zero_stage,
        offload_optimizer=offloaded("offload_optimizer"), offload_param=offloaded("offload_param"),
        teacher_offload=config.deepspeed.teacher_offload,
        micro_batch=micro_batch or config.train.micro_batch_size, grad_accum=config.train.grad_accum,
        sequences=2 if config.objective.needs().uses_rejected else 1, max_length=config.data.max_length,
        checkpointing=bool(getattr(config.train, "gradient_checkpointing", False)) if checkpointing is None
        else checkpointing, liger=liger,
        reduce_bucket=int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", zero.get("prefetch_bucket_size",
                                                                               DS_PREFETCH_BUCKET))),
        max_live=int(zero.get("stage3_max_live_parameters", zero.get("max_live_parameters", DS_MAX_LIVE))),
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold",
                                           zero.get("param_persistence_threshold", DS_PERSISTENCE))),
        chunk_budget_mb=config.kernels.chunk_budget_mb)
    lora = getattr(config.model, "lora", None)
    if lora is not None:
        values.update(lora_rank=int(lora.r), lora_targets=tuple(lora.target_modules), lora_dropout=float(lora.dropout))
    values.update(changes)
    return Setting(**values)


def models_from_config(config, tables: Optional[Dict[str, str]] = None) -> Models:
    """The architectures of the student, the teachers online every step, and the frozen models
    loaded before training for cached log-probs (``fastdadpo.precompute``)."""
    tables = tables or {}
    model, objective = config.model, config.objective

    def arch(key: str) -> Architecture:
        return load_architecture(getattr(model, key), f"model.{key}", tables.get(f"model.{key}"))

    student = arch("student")
    needs = objective.needs()
    online = [(key, arch(key)) for key in needs.online]
    # π_ref unset is the starting student: nothing more to load for it. A served model
    # (model.KEY_url) gives its log-probs from its server: nothing of it on the training GPUs.
    served = tuple((key, display_url(getattr(model, f"{key}_url"))) for key in needs.cached
                   if getattr(model, f"{key}_url", None))
    precomputed = [(key, arch(key)) for key in needs.cached
                   if (key != "reference" or model.reference) and key not in dict(served)]
    return Models(student=student, teachers=tuple(online), precomputed=tuple(precomputed), served=served)


@dataclass
class Report:
    """A plan at the config's micro-batch, the searches around it, and what to change."""

    config_path: str
    models: Models
    objective: str
    setting: Setting
    memory_bytes: int
    plan: Plan
    plan_other_checkpointing: Plan
    largest: int  # largest micro-batch that fits, 0 if none
    largest_other_checkpointing: int
    suggestions: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    gpus: int = 1
    nodes: int = 1

    @property
    def fits(self) -> bool:
        return self.plan.peak_bytes <= self.memory_bytes

    def to_json(self) -> dict:
        s = self.setting

        def plan_json(plan: Plan) -> dict:
            return {"checkpointing": plan.setting.checkpointing,
                    "terms": {t.name: t.bytes for t in plan.terms},
                    "phases": {k: {"bytes": plan.phase_bytes(k), "terms": v} for k, v in plan.phases.items()},
                    "peak_bytes": plan.peak_bytes, "peak_phase": plan.peak_phase}

        with_ck, without_ck = ((self.plan, self.plan_other_checkpointing) if s.checkpointing
                               else (self.plan_other_checkpointing, self.plan))
        largest_with, largest_without = ((self.largest, self.largest_other_checkpointing) if s.checkpointing
                                         else (self.largest_other_checkpointing, self.largest))
        return {
            "config": self.config_path, "objective": self.objective,
            "models": {key: {**dataclasses.asdict(arch), "params": arch.params}
                       for key, arch in [("student", self.models.student), *self.models.teachers,
                                         *[(f"{k} (precompute)", a) for k, a in self.models.precomputed]]},
            "setting": dataclasses.asdict(s), "gpus": self.gpus, "nodes": self.nodes, "ranks": s.ranks,
            "memory_bytes": self.memory_bytes, "micro_batch_size": s.micro_batch, "tokens_per_micro_batch": s.tokens,
            "terms": {t.name: t.bytes for t in self.plan.terms},
            "phases": {k: {"bytes": self.plan.phase_bytes(k), "terms": v} for k, v in self.plan.phases.items()},
            "peak_bytes": self.plan.peak_bytes, "peak_phase": self.plan.peak_phase, "fits": self.fits,
            "without_checkpointing": plan_json(without_ck), "with_checkpointing": plan_json(with_ck),
            "largest_micro_batch": self.largest,
            "largest_micro_batch_without_checkpointing": largest_without,
            "largest_micro_batch_with_checkpointing": largest_with,
            "suggestions": self.suggestions, "notes": self.notes,
        }


def largest_micro_batch(models: Models, objective, s: Setting, memory_bytes: int) -> int:
    """The largest micro-batch (up to MAX_MICRO_BATCH) whose peak fits; 0 if not even 1 does.
    Peak grows with the micro-batch, so a doubling then a bisection finds it."""
    def fits(mb: int) -> bool:
        return build_plan(models, objective, dataclasses.replace(s, micro_batch=mb)).peak_bytes <= memory_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_MICRO_BATCH and fits(high):
        low, high = high, high * 2
    high = min(high, MAX_MICRO_BATCH + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def suggestions(models: Models, objective, s: Setting, memory_bytes: int, gpus: int, nodes: int) -> List[str]:
    """What would make micro-batch 1 fit when it does not: each change alone, with its peak."""
    out = []

    def peak(**changes) -> int:
        return build_plan(models, objective, dataclasses.replace(s, micro_batch=1, **changes)).peak_bytes

    def add(what: str, **changes):
        value = peak(**changes)
        out.append(f"{what}: peak {_gib(value)} at micro-batch 1 ({'fits' if value <= memory_bytes else 'still too large'})")

    if not s.checkpointing:
        add("train.gradient_checkpointing: true", checkpointing=True)
    if s.zero_stage < 3:
        add("deepspeed.zero_stage: 3", zero_stage=3)
    if s.on_gpu and not s.offload_optimizer:
        add("deepspeed.extra.zero_optimization.offload_optimizer: {device: cpu}", offload_optimizer=True)
    if s.on_gpu and s.zero_stage == 3 and not s.offload_param:
        add("deepspeed.extra.zero_optimization.offload_param: {device: cpu} (with offload_optimizer)",
            offload_param=True, offload_optimizer=True)
    if s.on_gpu and models.teachers and not s.teacher_offload and s.zero_stage == 3:
        add("deepspeed.teacher_offload: true", teacher_offload=True)
    if s.on_gpu and not s.offload_optimizer:
        add("all of the above", checkpointing=True, zero_stage=3, offload_optimizer=True, offload_param=True,
            teacher_offload=bool(models.teachers))
    for more in (2, 4, 8, 16):
        ranks = s.ranks * more
        if peak(ranks=ranks) <= memory_bytes:
            out.append(f"more GPUs: {ranks} ranks ({nodes * more} nodes of {gpus}) fit micro-batch 1 "
                       f"(peak {_gib(peak(ranks=ranks))})")
            break
    else:
        out.append(f"more GPUs alone do not help enough: even {s.ranks * 16} ranks need {_gib(peak(ranks=s.ranks * 16))} "
                   f"(the unsharded terms: gathered heads, activations, kernel buffers)")
    return out


def make_report(config, *, config_path: str, gpus: int, nodes: int, memory_gb: float, device: str = "gpu",
                tables: Optional[Dict[str, str]] = None, micro_batch: Optional[int] = None) -> Report:
    models = models_from_config(config, tables)
    s = setting_from_config(config, ranks=gpus * nodes, device=device, micro_batch=micro_batch,
                            student_type=models.student.model_type)
    memory = int(memory_gb * GIB)
    plan = build_plan(models, config.objective, s)
    other = dataclasses.replace(s, checkpointing=not s.checkpointing)
    report = Report(config_path=config_path, models=models, objective=config.objective.name, setting=s,
                    memory_bytes=memory, plan=plan, plan_other_checkpointing=build_plan(models, config.objective, other),
                    largest=largest_micro_batch(models, config.objective, s, memory),
                    largest_other_checkpointing=largest_micro_batch(models, config.objective, other, memory),
                    gpus=gpus, nodes=nodes)
    if config.engine.name == "fsdp2":
        report.notes.append(FSDP2_NOTE)
    elif report.largest == 0:  # the suggestions are DeepSpeed settings
        report.suggestions = suggestions(models, config.objective, s, memory, gpus, nodes)
    return report


# --- text ------------------------------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def headline(report: Report) -> str:
    """One line: the peak against the memory, and the largest micro-batch."""
    s = report.setting
    where = "GPU" if s.on_gpu else "rank (host memory)"
    ck = "with" if s.checkpointing else "without"
    other = "with" if not s.checkpointing else "without"
    verdict = "fits" if report.fits else "does NOT fit"
    return (f"plan: peak {_gib(report.plan.peak_bytes)} per {where} at micro-batch {s.micro_batch} "
            f"({report.plan.peak_phase}, {ck} activation checkpointing), {verdict} in {report.memory_bytes / GIB:.1f} "
            f"GiB; largest micro-batch {_capped(report.largest)} ({_capped(report.largest_other_checkpointing)} {other} "
            f"checkpointing)")


def _capped(micro_batch: int) -> str:
    return f">= {micro_batch}" if micro_batch >= MAX_MICRO_BATCH else str(micro_batch)


def render(report: Report) -> str:
    s = report.setting
    lines = [f"fastdadpo plan: {report.config_path}: objective {report.objective}, "
             f"{report.nodes} node(s) x {report.gpus} {'GPU' if s.on_gpu else 'rank'}(s) = {s.ranks} rank(s), "
             f"{report.memory_bytes / GIB:g} GiB each, {'fp32' if s.dtype_bytes == 4 else '16-bit'} weights, "
             f"ZeRO stage {s.zero_stage}"
             + (", optimizer offloaded" if s.offload_optimizer else "") + (", parameters offloaded" if s.offload_param else "")
             + (", teachers offloaded" if s.teacher_offload and report.models.teachers else "")]
    for key, arch in [("model.student", report.models.student),
                      *[(f"model.{k} (online)", a) for k, a in report.models.teachers],
                      *[(f"model.{k} (cached log-probs, before training)", a) for k, a in report.models.precomputed]]:
        lines.append(f"  {key}: {arch.name}: {arch.describe()}")
        lines.append(f"      from {arch.source}")
    for key, url in report.models.served:
        lines.append(f"  model.{key} (cached log-probs): served at {url}: no memory on the training "
                     f"{'GPU' if s.on_gpu else 'rank'}s")
    lines.append(f"per {'GPU' if s.on_gpu else 'rank'} at micro-batch {s.micro_batch} ({s.micro_batch} x {s.sequences} "
                 f"sequence(s) x {s.max_length} tokens = {s.tokens:,} tokens), grad_accum {s.grad_accum}:")
    other = {t.name: t.bytes for t in report.plan_other_checkpointing.terms}
    for term in report.plan.terms:
        extra = ""
        if term.name == "student activations":
            extra = f"  ({'without' if s.checkpointing else 'with'} checkpointing: {_gib(other[term.name])})"
        note = f"  [{term.note}]" if term.note else ""
        lines.append(f"  {term.name:<42} {_gib(term.bytes):>12}{extra}{note}")
    lines.append("phases (the terms alive together):")
    for phase in report.plan.phases:
        mark = "  <- peak" if phase == report.plan.peak_phase else ""
        lines.append(f"  {phase:<42} {_gib(report.plan.phase_bytes(phase)):>12}{mark}")
    ck_on = "on" if s.checkpointing else "off"
    lines.append(f"peak {_gib(report.plan.peak_bytes)} of {report.memory_bytes / GIB:g} GiB "
                 f"(checkpointing {ck_on}): {'fits' if report.fits else 'does NOT fit'}; with checkpointing "
                 f"{'off' if s.checkpointing else 'on'} (train.gradient_checkpointing): "
                 f"{_gib(report.plan_other_checkpointing.peak_bytes)}")
    lines.append(f"largest micro-batch per {'GPU' if s.on_gpu else 'rank'}: {report.largest} with checkpointing {ck_on}, "
                 f"{report.largest_other_checkpointing} with it {'off' if s.checkpointing else 'on'}"
                 + (f" (search capped at {MAX_MICRO_BATCH})" if MAX_MICRO_BATCH in (report.largest,
                                                                                   report.largest_other_checkpointing) else ""))
    if report.suggestions:
        lines.append("nothing fits at micro-batch 1; each of these changes alone gives:")
        lines += [f"  - {text}" for text in report.suggestions]
    lines += [f"note: {text}" for text in report.notes]
    return "\n".join(lines)


def training_headline(config, world_size: int, device) -> str:
    """The plan's one-line headline for ``fastdadpo train`` at start, on this run's ranks and device
    (a GPU's total memory; on CPU the host memory shared by this node's ranks). Never fails the run:
    a config the planner cannot read gives a line saying so."""
    try:
        if getattr(device, "type", str(device)) == "cuda":
            import torch

            memory_gb = torch.cuda.get_device_properties(device).total_memory / GIB
            kind = "gpu"
        else:
            import psutil

            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or 1)
            memory_gb = psutil.virtual_memory().total / GIB / max(1, local)
            kind = "cpu"
        return headline(make_report(config, config_path=config.source, gpus=world_size, nodes=1, memory_gb=memory_gb,
                                    device=kind))
    except Exception as exc:  # the plan is advice: a training run never stops for it
        return f"plan: unavailable ({' '.join(str(exc).split())[:200]})"


# --- the command -------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("config", help="the training config (YAML), as for fastdadpo train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for fastdadpo train")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes; ZeRO shards over gpus x nodes ranks")
    parser.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                        help="memory per GPU in GiB (per rank, host memory, with --device cpu)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="gpu: 16-bit unless model.dtype says otherwise, the chunked CUDA kernels; cpu: host "
                             "memory of a CPU run (fp32 by default, the chunked-torch kernels)")
    parser.add_argument("--micro-batch", type=int, default=None, help="plan this micro-batch instead of the config's")
    parser.add_argument("--arch", action="append", default=[], metavar="model.KEY=TABLE",
                        help="use a shipped architecture table for a model (names: fastdadpo/plan_data/*.json)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args) -> int:
    for flag, value in (("--gpus", args.gpus), ("--nodes", args.nodes)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not args.gpu_memory > 0 or not math.isfinite(args.gpu_memory):
        raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ConfigError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    tables = {}
    for item in args.arch:
        key, sep, table = item.partition("=")
        if not sep or not key.startswith("model."):
            raise ConfigError(f"--arch {item!r}: expected model.KEY=TABLE, e.g. --arch model.student=qwen2.5-1.5b-instruct")
        tables[key] = table
    config = load_config(args.config, args.set)
    report = make_report(config, config_path=args.config, gpus=args.gpus, nodes=args.nodes, memory_gb=args.gpu_memory,
                         device=args.device, tables=tables, micro_batch=args.micro_batch)
    print(json.dumps(report.to_json(), indent=1) if args.json else render(report))
    return 0
