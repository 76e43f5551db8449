"""``fastdadpo train CONFIG.yaml [--set KEY=VALUE ...]``: the training loop.

Read ``train`` top to bottom: set up the process group and the data, compute what never changes
(reference and teacher sequence log-probs) once, build the student engine (trained) and the teacher
engines (frozen, sharded over the same ranks), then for each optimizer step: count the step's
tokens and pairs over all ranks (the objectives' normalizers), run every micro-batch through the
student engine (the loss is computed inside its forward, on the gathered LM head, never on
[tokens x vocab] logits), reduce the metrics, check that the loss is finite on every rank, step,
log, checkpoint.

Works as one plain process and under ``torchrun --nproc_per_node=N -m fastdadpo train ...`` or the
``deepspeed`` launcher. Every rank makes the same collective calls in the same order.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import yaml

from . import checkpoint, data, distributed, models
from .config import Config, cache_dir, load_config
from .engines import FrozenModel, build_frozen, build_student_engine
from .errors import ConfigError, UserError
from .objectives import OBJECTIVES, Head, Normalizers, Objective, StepInputs
from .precompute import cached, data_fingerprint, model_fingerprint, sequence_logps_table


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops, the last good checkpoint stays as it was."""


def add_arguments(parser) -> None:
    parser.add_argument("config", help="the YAML config (see configs/ and the README's table of keys)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key by its dot path, the value read as YAML; later ones win "
                             "(e.g. --set train.lr=1e-5 --set objective.beta2=0.2)")
    parser.add_argument("--precompute-only", action="store_true",
                        help="compute and cache the reference/teacher sequence log-probs the objective needs, "
                             "then exit (a later train run finds them in the cache)")


def run(args) -> int:
    # Destroy the group explicitly, on errors too: a gloo group torn down by interpreter exit while
    # the other rank is already gone aborts ("terminate called without an active exception").
    # The barrier only on success: a rank that failed alone must not leave the others waiting.
    try:
        train(load_config(args.config, args.set), precompute_only=args.precompute_only)
        distributed.barrier()
    finally:
        distributed.teardown()
    return 0


def build_objective(config: Config) -> Objective:
    o = config.objective
    params = {
        "sft": {},
        "kd": dict(kind=o.kind, jsd_beta=o.jsd_beta, temperature=o.temperature, ce_weight=o.ce_weight),
        "dpo": dict(beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing,
                    average_logps=o.average_logps),
        "dadpo": dict(beta1=o.beta1, beta2=o.beta2, average_logps=o.average_logps),
        "dadpo_token": dict(beta=o.beta, alpha=o.alpha, kind=o.kind, jsd_beta=o.jsd_beta, temperature=o.temperature,
                            loss_type=o.loss_type, label_smoothing=o.label_smoothing, average_logps=o.average_logps),
        "dckd": dict(lambda_chosen=o.lambda_chosen, lambda_rejected=o.lambda_rejected, kind=o.kind,
                     jsd_beta=o.jsd_beta, temperature=o.temperature),
        "adpa": dict(gamma=o.gamma, temperature=o.temperature),
    }[o.name]
    return OBJECTIVES[o.name](**params)


def train(config: Config, precompute_only: bool = False) -> Dict[str, float]:
    dist = distributed.setup(timeout_s=config.train.timeout_minutes * 60)
    log = _Log(dist.is_main)
    torch.manual_seed(config.train.seed)
    dtype = models.resolve_dtype(config.model.dtype, dist.device)
    objective = build_objective(config)
    out_dir = config.train.output_dir
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(config.to_dict(), handle, sort_keys=False)

    # --- data ---
    tokenizer = models.load_tokenizer(config.model.student, "model.student")
    vocab_size = _shared_vocabulary(config, tokenizer, objective)
    train_set = _tokenized(config.data.train, config, tokenizer, objective, log, "data.train")
    eval_set = _tokenized(config.data.eval, config, tokenizer, objective, log, "data.eval") if config.data.eval else []
    plan = _Plan.make(len(train_set), config, dist.world_size)
    log.info(plan.describe())

    def collate(examples):
        return data.collate(examples, pad_token_id=tokenizer.pad_token_id, include_rejected=objective.uses_rejected,
                            packing=config.data.packing)

    # --- the student engine ---
    student_model = models.load_causal_lm(config.model.student, dtype=dtype, device=dist.device, trainable=True,
                                          ds_config=_zero3_loading_config(config, dtype), key="model.student")
    engine = build_student_engine(
        student_model, zero_stage=config.deepspeed.zero_stage, micro_batch_size=config.train.micro_batch_size,
        grad_accum=config.train.grad_accum, max_grad_norm=config.train.max_grad_norm, lr=config.lr,
        weight_decay=config.train.weight_decay, total_steps=plan.total_steps, warmup_ratio=config.train.warmup_ratio,
        dtype=dtype, extra=config.deepspeed.extra, source=config.source)
    log.info(f"student: {models.count_parameters(student_model) / 1e6:.2f}M parameters, ZeRO stage "
             f"{config.deepspeed.zero_stage}, {dist.world_size} rank(s), {dtype}, objective {objective.name}")

    # --- what never changes: computed once (before any update), cached on disk ---
    cached_logps = _precompute(config, objective, engine, {"train": train_set, "eval": eval_set}, collate, dist,
                               dtype, log)
    if precompute_only:
        log.info(f"cached: {', '.join(f'{name} log-probs of {split}' for name, split in cached_logps) or 'nothing'}")
        return {}

    # --- frozen teachers, sharded over the same ranks ---
    teacher = teacher_reference = None
    if objective.needs_teacher:
        teacher = build_frozen(config.model.teacher, key="model.teacher", dtype=dtype, device=dist.device,
                               offload=config.deepspeed.teacher_offload, extra=config.deepspeed.extra)
    if objective.needs_teacher_reference:
        teacher_reference = build_frozen(config.model.teacher_reference, key="model.teacher_reference", dtype=dtype,
                                         device=dist.device, offload=config.deepspeed.teacher_offload,
                                         extra=config.deepspeed.extra)

    def run_micro_batch(batch, normalizers: Normalizers):
        """Forward one micro-batch through the student engine; returns (loss, metrics)."""
        teacher_head = teacher_reference_head = None
        if teacher is not None:
            teacher_head = Head(teacher.hidden(batch["input_ids"], batch["attention_mask"], batch["position_ids"]),
                                teacher.head)
        if teacher_reference is not None:
            teacher_reference_head = Head(teacher_reference.hidden(batch["input_ids"], batch["attention_mask"],
                                                                   batch["position_ids"]), teacher_reference.head)

        def compute(hidden, head_weight):
            output = objective(StepInputs(
                student=Head(hidden, head_weight), targets=batch["targets"], target_sequence=batch["target_sequence"],
                num_pairs=batch["num_examples"], num_sequences=batch["num_sequences"], normalizers=normalizers,
                vocab_size=vocab_size, teacher=teacher_head, teacher_reference=teacher_reference_head,
                reference_logps=_per_sequence(cached_logps.get(("reference", batch["split"])), batch),
                teacher_logps=_per_sequence(cached_logps.get(("teacher", batch["split"])), batch),
                response_tokens=batch["response_tokens"]))
            return output.loss, output.metrics

        return engine(batch["input_ids"], batch["attention_mask"], batch["position_ids"], compute)

    # --- resume ---
    start_step = 0
    resume_from = checkpoint.resolve_resume(config.train.resume, out_dir)
    if resume_from:
        start_step = checkpoint.load(engine, resume_from, dist.rank, dist.world_size)
        log.info(f"resumed from {resume_from} (step {start_step})")
    metrics_log = _MetricsLog(os.path.join(out_dir, "metrics.jsonl"), dist.is_main, keep_until=start_step)
    stop = _StopOnSigterm()

    # --- the loop ---
    progress = log.progress(plan.total_steps, start_step, config.train.log_every)
    last_metrics: Dict[str, float] = {}
    for step in range(start_step, plan.total_steps):
        started = time.perf_counter()
        engine.train()
        batches = [_to_device(collate(examples), dist.device, "train") for examples in plan.micro_batches(
            train_set, step, dist.rank, dist.world_size, config.train.seed)]
        normalizers = _normalizers(batches, dist.device)
        sums: Dict[str, torch.Tensor] = {}
        finite = True
        for k, batch in enumerate(batches):
            loss, metrics = run_micro_batch(batch, normalizers)
            finite &= bool(torch.isfinite(loss.detach()))
            # Contributions add up over micro-batches and ranks; DeepSpeed divides by both.
            engine.backward(loss * dist.world_size * len(batches))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            if k < len(batches) - 1:
                engine.step()  # not a boundary: accumulates only
        tokens = sum(b["input_ids"].numel() if b["attention_mask"] is None else int(b["attention_mask"].sum())
                     for b in batches)
        step_metrics, finite_everywhere, stop_requested = _reduce(sums, tokens, finite, stop.requested, dist.device)
        if not finite_everywhere:
            last = checkpoint.latest(out_dir)
            raise TrainingDiverged(f"the loss became non-finite at step {step + 1} (objective {objective.name}); "
                                   f"the run stopped before the optimizer step. The last good checkpoint is "
                                   f"{last or 'none (none was written yet)'}. Lower train.lr, raise "
                                   f"train.warmup_ratio, or check the data for empty responses")
        engine.step()
        elapsed = time.perf_counter() - started
        step_metrics.update(step=step + 1, epoch=round((step + 1) / plan.steps_per_epoch, 4),
                            lr=engine.get_lr()[0], grad_norm=_grad_norm(engine),
                            tokens_per_s=step_metrics.pop("tokens") / elapsed, peak_mem_gb=_peak_memory_gb(dist.device))
        at_end = step + 1 == plan.total_steps
        every = config.train.eval_every
        if eval_set and ((every and (step + 1) % every == 0) or at_end):  # the final model always
            engine.eval()
            step_metrics.update(_evaluate(eval_set, collate, run_micro_batch, dist, config.train.micro_batch_size))
            engine.train()
        metrics_log.write(step_metrics)
        last_metrics = step_metrics
        progress.update(step_metrics)
        if stop_requested or (config.train.save_every and ((step + 1) % config.train.save_every == 0 or at_end)):
            path = checkpoint.save(engine, out_dir, step + 1, dist.rank, dist.world_size)
            log.info(f"checkpoint {path}")
        if stop_requested:
            log.info(f"stopped by SIGTERM after step {step + 1}; continue with --set train.resume=true")
            progress.close()
            return last_metrics
    progress.close()
    _export_final(engine, student_model, tokenizer, out_dir, config.deepspeed.zero_stage, dist)
    log.info(f"done: {plan.total_steps} steps; model in {os.path.join(out_dir, 'final')}")
    return last_metrics


# --- data and the step plan --------------------------------------------------------------------------------

def _head_rows(path: str, key: str) -> int:
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(path).vocab_size)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read the model config of {path!r}: {exc}") from None


def _shared_vocabulary(config: Config, tokenizer, objective: Objective) -> int:
    """The vocabulary divergences are computed over; the teachers must share the student's tokenizer."""
    student_rows = _head_rows(config.model.student, "model.student")
    vocab = len(tokenizer)
    for key in ("teacher", "teacher_reference"):
        path = getattr(config.model, key)
        if path and (objective.needs_teacher or objective.needs_teacher_logps):
            other = models.load_tokenizer(path, f"model.{key}")
            vocab = data.check_tokenizers_compatible(tokenizer, other, student_head_rows=student_rows,
                                                     teacher_head_rows=_head_rows(path, f"model.{key}"))
    return vocab


def _tokenized(path: str, config: Config, tokenizer, objective: Objective, log, key: str):
    fields = ("chosen", "rejected") if objective.uses_rejected else ("chosen",)
    examples = data.load_examples(path, require=("prompt",) + fields)
    tokenized, report = data.tokenize_examples(examples, tokenizer, max_length=config.data.max_length,
                                               max_prompt_length=config.data.max_prompt_length, fields=fields,
                                               cache_dir=os.path.join(cache_dir(config), "tokenized"))
    log.info(f"{key}: {report.summary()}")
    if not tokenized:
        raise ConfigError(f"{key}: no usable examples in {path} after tokenization ({report.summary()})")
    return tokenized


@dataclass
class _Plan:
    """Optimizer step k of epoch e takes this rank's share of a seeded shuffle of the data, cut by
    ``data.micro_batches`` into steps of micro_batch_size x grad_accum x world_size examples (the
    global batch), and splits it into grad_accum micro-batches. The examples of a step depend only on
    the global batch size, so 2 ranks x 1, 1 rank x 2 and 1 x 1 x 2 accumulations train alike."""

    micro_batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    examples: int
    padded: int

    @staticmethod
    def make(examples: int, config: Config, world_size: int) -> "_Plan":
        t = config.train
        per_rank_step = t.micro_batch_size * t.grad_accum
        steps_per_epoch = -(-examples // (per_rank_step * world_size))
        total = t.max_steps or max(1, int(t.epochs * steps_per_epoch))
        return _Plan(t.micro_batch_size, t.grad_accum, steps_per_epoch, total, examples,
                     data.padded_example_count(examples, per_rank_step, world_size))

    def describe(self) -> str:
        return (f"{self.examples} examples, {self.micro_batch_size} per micro-batch, {self.grad_accum} micro-batches "
                f"per step: {self.steps_per_epoch} steps per epoch ({self.padded} examples repeated to fill the last "
                f"step), {self.total_steps} steps")

    def micro_batches(self, train_set, step: int, rank: int, world_size: int, seed: int) -> List[list]:
        epoch, position = divmod(step, self.steps_per_epoch)
        cached = getattr(self, "_epoch_cache", None)
        if cached is None or cached[0] != epoch:
            cached = (epoch, data.micro_batches(train_set, self.micro_batch_size * self.grad_accum, seed=seed,
                                                epoch=epoch, rank=rank, world_size=world_size))
            self._epoch_cache = cached
        examples = cached[1][position]
        return [examples[k * self.micro_batch_size:(k + 1) * self.micro_batch_size] for k in range(self.grad_accum)]


def _to_device(batch: dict, device: torch.device, split: str) -> dict:
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    moved["split"] = split
    return moved


def _per_sequence(table: Optional[torch.Tensor], batch: dict) -> Optional[torch.Tensor]:
    """Cached [examples, 2] sequence log-probs laid out like the batch's sequences."""
    if table is None:
        return None
    rows = table[batch["example_index"].cpu()]
    values = rows[:, 0] if batch["num_sequences"] == batch["num_examples"] else torch.cat([rows[:, 0], rows[:, 1]])
    return values.to(batch["input_ids"].device)


def _normalizers(batches: List[dict], device: torch.device) -> Normalizers:
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        owner, b = batch["target_sequence"], batch["num_examples"]
        counts[0] += b
        counts[1] += ((owner >= 0) & (owner < b)).sum()
        counts[2] += (owner >= b).sum()
    distributed.all_reduce_sum(counts)
    return Normalizers(pairs=float(counts[0]), chosen_tokens=float(counts[1]), rejected_tokens=float(counts[2]))


def _reduce(sums: Dict[str, torch.Tensor], tokens: int, finite: bool, stop: bool, device: torch.device):
    """One collective for the step's metrics, the finite check and the stop request."""
    keys = sorted(sums)
    vector = torch.stack([sums[k].to(device).reshape(()) for k in keys]
                         + [torch.tensor(float(tokens), device=device), torch.tensor(0.0 if finite else 1.0, device=device),
                            torch.tensor(1.0 if stop else 0.0, device=device)]).double()
    distributed.all_reduce_sum(vector)
    values = vector.tolist()
    metrics = dict(zip(keys, values[:len(keys)]))
    metrics["tokens"] = values[len(keys)]
    return metrics, values[len(keys) + 1] == 0, values[len(keys) + 2] > 0


# --- precompute -----------------------------------------------------------------------------------------------

def _precompute(config: Config, objective: Objective, engine, splits: dict, collate, dist, dtype, log) -> dict:
    """{(name, split): [examples, 2] table} of cached sequence log-probs the objective needs."""
    tables = {}
    wanted = []
    if objective.needs_reference_logps:
        wanted.append(("reference", config.model.reference or config.model.student))
    if objective.needs_teacher_logps:
        wanted.append(("teacher", config.model.teacher))
    for name, path in wanted:
        frozen: Optional[FrozenModel] = None
        for split, examples in splits.items():
            if not examples:
                continue
            key = {"kind": "sequence_logps", "model": model_fingerprint(path), "data": data_fingerprint(examples),
                   "dtype": str(dtype), "uses_rejected": objective.uses_rejected, "version": 1}

            def compute():
                nonlocal frozen
                log.info(f"computing {name} log-probs of {split} ({len(examples)} examples), cached for later runs")
                if name == "reference" and not config.model.reference:
                    token_logps = _student_token_logps(engine)  # π_ref = the starting student, before any update
                else:
                    if frozen is None:
                        frozen = build_frozen(path, key=f"model.{name}", dtype=dtype, device=dist.device,
                                              offload=config.deepspeed.teacher_offload, extra=config.deepspeed.extra)
                    token_logps = _frozen_token_logps(frozen)
                return sequence_logps_table(
                    token_logps, examples, collate=collate, micro_batch_size=config.train.micro_batch_size,
                    rank=dist.rank, world_size=dist.world_size, gather=distributed.all_gather_object, device=dist.device)

            tables[(name, split)] = cached(cache_dir(config), key, compute, dist.is_main,
                                           distributed.broadcast_object)
        del frozen
    return tables


def _student_token_logps(engine):
    from fastdadpo.kernels import fused_linear_logprobs

    def token_logps(batch):
        engine.eval()
        return engine(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                      lambda hidden, head: fused_linear_logprobs(hidden, head, batch["targets"]))

    return token_logps


def _frozen_token_logps(frozen: FrozenModel):
    from fastdadpo.kernels import fused_linear_logprobs

    def token_logps(batch):
        hidden = frozen.hidden(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return fused_linear_logprobs(hidden, frozen.head, batch["targets"])

    return token_logps


# --- evaluation, export, logging --------------------------------------------------------------------------------

@torch.no_grad()
def _evaluate(eval_set, collate, run_micro_batch, dist, micro_batch_size: int) -> Dict[str, float]:
    """The objective's loss and metrics on data.eval, normalized over the whole eval set, each
    example counted once. Ranks shard the set; a rank with nothing left runs a dummy micro-batch
    (ZeRO-3 ranks must make the same collective calls) whose result is dropped."""
    rounds = data.shard_rounds(len(eval_set), micro_batch_size, dist.rank, dist.world_size)
    batches = [(collate([eval_set[i] for i in indices or [0]]), not indices) for indices in rounds]  # on the CPU
    normalizers = _normalizers([batch for batch, dummy in batches if not dummy], dist.device)
    sums: Dict[str, torch.Tensor] = {}
    for batch, dummy in batches:
        _, metrics = run_micro_batch(_to_device(batch, dist.device, "eval"), normalizers)
        for key, value in metrics.items():  # the same keys on every rank, zeros for a dummy
            sums[key] = sums.get(key, 0.0) + (torch.zeros_like(value) if dummy else value.float())
    metrics, _, _ = _reduce(sums, 0, True, False, dist.device)
    metrics.pop("tokens")
    return {f"eval/{k}": v for k, v in metrics.items()}


def _zero3_loading_config(config: Config, dtype) -> Optional[dict]:
    """The config ``from_pretrained`` sees, so a ZeRO-3 student arrives partitioned."""
    if config.deepspeed.zero_stage != 3:
        return None
    from .ds_config import student_config

    return student_config(zero_stage=3, micro_batch_size=config.train.micro_batch_size,
                          grad_accum=config.train.grad_accum, max_grad_norm=config.train.max_grad_norm, dtype=dtype,
                          extra=config.deepspeed.extra, source=config.source)


def _export_final(engine, student_model, tokenizer, out_dir: str, zero_stage: int, dist) -> None:
    """final/: a Hugging Face model directory gathered from the shards, visible only when complete."""
    import shutil

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; full tensors on rank 0 only
    else:
        state = engine.module.state_dict()
    if dist.is_main:
        prefix = "model."
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        final, partial = os.path.join(out_dir, "final"), os.path.join(out_dir, ".final.partial")
        shutil.rmtree(partial, ignore_errors=True)
        student_model.save_pretrained(partial, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
    distributed.barrier()


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _StopOnSigterm:
    """SIGTERM asks for a checkpoint at the end of the current step, then a clean exit."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum, frame):
        self.requested = True


class _MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step (rank 0). On resume, rows after the resumed
    step (from the interrupted run) are dropped so the file tells one consistent story."""

    def __init__(self, path: str, active: bool, keep_until: int):
        self.path, self.active = path, active
        self.writer = None
        if not active:
            return
        kept = []
        if keep_until and os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                kept = [line for line in handle if line.strip() and json.loads(line).get("step", 0) <= keep_until]
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(tmp, path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, row: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()


class _Log:
    def __init__(self, active: bool):
        self.active = active
        self.bar = None

    def info(self, message: str) -> None:
        if not self.active:
            return
        if self.bar is not None and self.bar.bar is not None:
            self.bar.bar.write(f"[fastdadpo] {message}")
        else:
            print(f"[fastdadpo] {message}", flush=True)

    def progress(self, total: int, initial: int, every: int):
        self.bar = _Progress(total, initial, self.active, every)
        return self.bar


class _Progress:
    """Rank 0's progress: a bar (steps, loss, tokens/s, ETA) on a terminal, a plain line every
    ``every`` steps otherwise (logs of recipe stages, CI)."""

    def __init__(self, total: int, initial: int, active: bool, every: int):
        self.total, self.step, self.active, self.every = total, initial, active, every
        self.started, self.first = time.perf_counter(), initial
        self.bar = None
        if active and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, metrics: dict) -> None:
        self.step += 1
        if not self.active:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            self.bar.update(1)
        elif self.step % self.every == 0 or self.step == self.total:
            rate = (self.step - self.first) / max(time.perf_counter() - self.started, 1e-9)
            eta = (self.total - self.step) / max(rate, 1e-9)
            print(f"[fastdadpo] step {self.step}/{self.total} loss {metrics['loss']:.4f} "
                  f"tok/s {metrics['tokens_per_s']:.0f} eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
