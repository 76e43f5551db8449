"""``fastdadpo train CONFIG.yaml [--set KEY=VALUE ...]``: the training loop.

Read ``Trainer`` top to bottom: ``__init__`` sets up the process group and the data, builds the
student engine (trained), computes what never changes (reference and teacher sequence log-probs)
once, and builds the frozen teachers (sharded over the same ranks); ``train`` is the loop: for each
optimizer step, count the step's tokens and pairs over all ranks (the objectives' normalizers), run
every micro-batch through ``_loss_step`` (the loss is computed inside the student engine's forward,
on the gathered LM head, never on [tokens x vocab] logits), reduce the metrics, check that the loss
and the gradient are finite, step, log, checkpoint.

Works as one plain process and under ``torchrun --nproc_per_node=N -m fastdadpo train ...`` or the
``deepspeed`` launcher. Every rank makes the same collective calls in the same order.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import yaml

from fastdadpo.base import collectives
from fastdadpo.base.errors import ConfigError, UserError
from fastdadpo.base.files import DirectoryLock, write_text_atomic
from fastdadpo.commands import precompute
from fastdadpo.commands.config import Config, load_config
from fastdadpo.commands.metrics import Log, MetricsLog, accumulate, peak_memory_gb, reduce_step_metrics
from fastdadpo.commands.plan import training_headline
from fastdadpo.core.batch import Batch, collate
from fastdadpo.core.rows import load_examples
from fastdadpo.core.sampler import StepPlan, shard_rounds
from fastdadpo.core.step import Head, Normalizers, StepInputs
from fastdadpo.core.tokenized import tokenize_examples
from fastdadpo.engine import checkpoints
from fastdadpo.engine.interface import OptimizerSettings
from fastdadpo.models import loading as models
from fastdadpo.models.fingerprint import model_fingerprint
from fastdadpo.models.lora import add_lora
from fastdadpo.models.vocabulary import shared_vocabulary

# Optimizer steps in a row whose gradient may be non-finite before the run stops. fp16's dynamic
# loss scaling overflows on purpose while it searches for its scale (the engine then skips the
# step and halves the scale); in fp32 and bf16 a non-finite gradient is divergence at once.
SKIPPED_STEPS_TOLERATED = {torch.float16: 8, torch.bfloat16: 0, torch.float32: 0}


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the run stops, the last good checkpoint stays as it was."""


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
        collectives.barrier()
    finally:
        collectives.teardown()
    return 0


def train(config: Config, precompute_only: bool = False) -> Dict[str, float]:
    trainer = Trainer(config, with_teachers=not precompute_only)
    try:
        return trainer.train() if not precompute_only else {}
    finally:
        trainer.output_lock.release()


class Trainer:
    def __init__(self, config: Config, with_teachers: bool = True):
        self.config, self.objective = config, config.objective
        self.engine = config.build_engine()
        self.dist = dist = self.engine.setup_distributed(timeout_s=config.train.timeout_minutes * 60)
        self.log = Log(dist.is_main)
        with collectives.peers_lost_reported(dist, lambda: "while setting up (loading, precomputing)",
                                             self._how_to_continue):
            self._set_up(with_teachers)

    def _set_up(self, with_teachers: bool) -> None:
        """Data, the student in its engine, what never changes (cached), the frozen teachers."""
        config, dist = self.config, self.dist
        # Before any load; rank 0 decides, so every node resumes from the same checkpoint (or none).
        self.resume_from = collectives.decided_by_main(self._resume_point)
        torch.manual_seed(config.train.seed)
        self.dtype = models.resolve_dtype(config.model.dtype, dist.device)
        self._write_output_file()  # the directory alone, before any work: can it be written?
        self.output_lock = DirectoryLock(config.train.output_dir)
        collectives.decided_by_main(self._claim_output_dir)  # rank 0 holds it for the run
        # --- data ---
        self.tokenizer = models.load_tokenizer(config.model.student, "model.student")
        self.needs = self.objective.needs()
        self.vocab_size = shared_vocabulary(self.tokenizer, config.model.student, {
            f"model.{key}": getattr(config.model, key) for key in self.needs.vocabulary_models})
        self.train_set = self._tokenized(config.data.train, "data.train")
        self.eval_set = self._tokenized(config.data.eval, "data.eval") if config.data.eval else []
        self.plan = StepPlan.make(len(self.train_set), micro_batch_size=config.train.micro_batch_size,
                                  grad_accum=config.train.grad_accum, world_size=dist.world_size,
                                  epochs=config.train.epochs, max_steps=config.train.max_steps)
        self.log.info(self.plan.describe())
        self.log.info(training_headline(config, dist.world_size, dist.device))  # fastdadpo plan's one line
        # --- the student, in its engine ---
        t = config.train
        optimizer = OptimizerSettings(micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, lr=config.lr,
                                      weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                                      warmup_ratio=t.warmup_ratio, schedule=t.lr_scheduler_type,
                                      total_steps=self.plan.total_steps)
        student_model = self.engine.load_student(config.model.student, key="model.student", dtype=self.dtype,
                                                 device=dist.device, optimizer=optimizer,
                                                 liger_kernels=config.model.liger_kernels)
        # Its soft cap and logit scale, for every kernel call on its head.
        self.student_logits = models.head_logit_options(student_model.config, "model.student")
        self.kernel_settings = config.kernels.settings()  # the kernels: section, for every kernel call
        if config.model.lora is not None:
            adapted = add_lora(student_model, config.model.lora)
            self.log.info(f"LoRA: r {config.model.lora.r}, alpha {config.model.lora.alpha:g} on {adapted} modules; "
                          f"everything else frozen")
        if t.gradient_checkpointing:  # teachers run without grad: nothing of theirs is kept for a backward
            student_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.student = self.engine.build_student(student_model, dtype=self.dtype, optimizer=optimizer, dist=dist)
        self.log.info(f"student: {models.count_parameters(student_model) / 1e6:.2f}M parameters, "
                      f"{self.engine.describe()}, {dist.world_size} rank(s), {self.dtype}, "
                      f"objective {self.objective.name}, activation checkpointing "
                      f"{'on' if t.gradient_checkpointing else 'off'}")
        # --- what never changes: computed once (before any update), cached on disk ---
        self.cached = precompute.training_tables(config, self.engine, self.student,
                                                 {"train": self.train_set, "eval": self.eval_set}, self.collate, dist,
                                                 self.dtype, self.log)
        tables = ', '.join(f'{name} log-probs of {split}' for name, split in self.cached) or 'nothing'
        self.log.info(f"precomputed once (held for the run; on disk where data.cache_dir is writable): {tables}")
        # --- frozen teachers, sharded over the same ranks ---
        online = self.needs.online if with_teachers else ()
        self.teacher = self._frozen("teacher") if "teacher" in online else None
        self.teacher_reference = self._frozen("teacher_reference") if "teacher_reference" in online else None
        # Only now that every input has loaded: a run that fails on bad data or a bad model leaves a
        # finished run's config.yaml in the same output_dir as it was.
        self._write_output_file("config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    def _how_to_continue(self) -> str:
        last = checkpoints.latest(self.config.train.output_dir)
        return (f"The last complete checkpoint is {last or 'none (none was written yet)'}; continue from it with --set "
                f"train.resume=true once every rank can start")

    @functools.cached_property
    def _identity(self) -> dict:
        """What defines this run, recorded in its checkpoints: a resume must be the same run. The
        models count by path and by their files' fingerprint (other weights put at the same path)."""
        config, model = self.config, self.config.model
        used = ("student", *config.objective.needs().models, *(["reference"] if model.reference else []))
        return {"student": model.student, "objective": config.objective.name, "data.train": config.data.train,
                "engine": self.engine.checkpoint_format(),
                **{f"model.{key}": getattr(model, key) for key in used if key != "student"},
                "weights": {key: model_fingerprint(getattr(model, key)) for key in used
                            if not getattr(model, f"{key}_url", None)}}

    def _resume_point(self) -> Optional[str]:
        """``train.resume`` resolved (rank 0), refused when the checkpoint is another run's."""
        config = self.config
        path = checkpoints.resolve_resume(config.train.resume, config.train.output_dir)
        recorded = checkpoints.run_identity(path) if path else None
        if recorded:
            ours = self._identity
            differs = [f"{key} {recorded.get(key)!r} (this config: {ours[key]!r})" for key in ours
                       if key in recorded and key != "weights" and recorded[key] != ours[key]]
            weights = recorded.get("weights") if isinstance(recorded.get("weights"), dict) else {}
            differs += [f"model.{key} ({getattr(self.config.model, key)}) holds other weights than when it was "
                        f"written" for key, value in ours["weights"].items() if weights.get(key, value) != value]
            if differs:
                raise ConfigError(f"train.resume: {path} was written by another run: its {'; '.join(differs)}. Resume "
                                  f"it with the config it was trained with, or train into a new train.output_dir")
        return path

    def _claim_output_dir(self) -> None:
        """Rank 0: the output directory's lock for the whole run (two runs writing one directory would
        interleave their metrics and checkpoints), and no fresh run over an earlier run's checkpoints
        (a later resume would continue that other run)."""
        output_dir = self.config.train.output_dir
        holder = self.output_lock.acquire()
        if holder is not None:
            raise ConfigError(f"{self.config.source}: train.output_dir {output_dir} is in use by another fastdadpo "
                              f"run ({holder}); wait for it to finish, or choose another train.output_dir")
        earlier = checkpoints.latest(output_dir)
        if not self.config.train.resume and earlier is not None:
            raise ConfigError(f"{self.config.source}: train.output_dir {output_dir} holds an earlier run's checkpoints "
                              f"(the latest {earlier}); continue that run with --set train.resume=true, or train into "
                              f"a new train.output_dir (or delete {os.path.join(output_dir, 'checkpoints')})")
        final = os.path.join(output_dir, "final")
        if not self.config.train.resume and os.path.isdir(final):
            raise ConfigError(f"{self.config.source}: train.output_dir {output_dir} holds an earlier run's final model "
                              f"({final}), which this run would replace; train into a new train.output_dir, or "
                              f"delete it first")

    def _write_output_file(self, name: Optional[str] = None, text: str = "") -> None:
        """Rank 0: ``train.output_dir`` created, and ``text`` written to ``name`` in it (no name: the
        directory only); a directory this user cannot write is a one-paragraph error."""
        output_dir = self.config.train.output_dir
        if not self.dist.is_main:
            return
        try:
            os.makedirs(output_dir, exist_ok=True)
            if name is not None:
                write_text_atomic(os.path.join(output_dir, name), text)
            elif not os.access(output_dir, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            raise ConfigError(f"{self.config.source}: train.output_dir {output_dir!r} cannot be written "
                              f"({exc.strerror or exc}); choose a directory this user can write") from None

    # --- the loop ---
    def train(self) -> Dict[str, float]:
        config, dist, plan = self.config, self.dist, self.plan
        start_step = self.student.load_checkpoint(self.resume_from) if self.resume_from else 0
        if self.resume_from:
            self.log.info(f"resumed from {self.resume_from} (step {start_step})")
        metrics_log = MetricsLog(os.path.join(config.train.output_dir, "metrics.jsonl"), dist.is_main,
                                 keep_until=start_step, log=self.log, report_to=config.train.report_to,
                                 run_config=config.to_dict())
        stop = collectives.StopOnSigterm()
        progress = self.log.progress(plan.total_steps, start_step, config.train.log_every)
        last_metrics: Dict[str, float] = {}
        self.bad_gradients, self.step = 0, start_step
        with collectives.peers_lost_reported(dist, lambda: f"at step {self.step + 1}", self._how_to_continue):
            for step in range(start_step, plan.total_steps):
                self.step = step
                last_metrics, stopped = self._step_and_report(step, stop.requested, metrics_log, progress)
                if stopped:
                    progress.close()
                    metrics_log.close()
                    return last_metrics
            progress.close()
            metrics_log.close()
            final = self.student.export(self.tokenizer, config.train.output_dir, lora=config.model.lora,
                                        base_model=config.model.student)
        self.log.info(f"done: {plan.total_steps} steps; model in {final}")
        return last_metrics

    def _step_and_report(self, step: int, stop: bool, metrics_log: MetricsLog, progress):
        """One optimizer step, then its evaluation, metrics row and checkpoint; returns (the row,
        whether SIGTERM asked the run to stop here)."""
        config, dist, plan = self.config, self.dist, self.plan
        metrics, stop_requested = self._optimizer_step(step, stop)
        at_end = step + 1 == plan.total_steps
        every = config.train.eval_every
        if self.eval_set and ((every and (step + 1) % every == 0) or at_end):  # the final model always
            metrics.update(self.evaluate())
        metrics_log.write(metrics)
        progress.update(metrics)
        save_every = config.train.save_every
        if stop_requested or at_end or (save_every and (step + 1) % save_every == 0):
            path = self.student.save_checkpoint(config.train.output_dir, step + 1, self._identity)
            checkpoints.rotate(config.train.output_dir, config.train.keep_checkpoints, dist.is_main)
            self.log.info(f"checkpoint {path}")
        if stop_requested:
            self.log.info(f"stopped by SIGTERM after step {step + 1}; continue with --set train.resume=true")
            return metrics, True
        return metrics, False

    def _optimizer_step(self, step: int, stop: bool) -> Tuple[Dict[str, float], bool]:
        """One optimizer step over this rank's micro-batches; its metrics (all ranks) and whether
        any rank asked to stop."""
        started = time.perf_counter()
        self.student.train()
        batches = [self.collate(examples).to(self.dist.device) for examples in self.plan.micro_batches(
            self.train_set, step, self.dist.rank, self.dist.world_size, self.config.train.seed)]
        normalizers = self._normalizers(batches)
        sums: Dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros((), device=self.dist.device)
        for k, batch in enumerate(batches):
            loss, metrics = self._loss_step(batch, normalizers, "train")
            nonfinite += (~torch.isfinite(loss.detach())).float().reshape(())
            self.student.backward(loss)  # contributions add up over micro-batches and ranks
            accumulate(sums, metrics)
        step_metrics, finite_everywhere, stop_requested = reduce_step_metrics(
            sums, sum(b.tokens() for b in batches), nonfinite, stop, self.dist.device)
        if not finite_everywhere:
            self._diverged(f"the loss became non-finite at step {step + 1}")
        lr = self.student.lr()  # the rate this step applies (the schedule moves on inside the step)
        grad_norm = self.student.optimizer_step(lambda norm: self._check_gradient(norm, step))
        step_metrics.update(step=step + 1, epoch=round((step + 1) / self.plan.steps_per_epoch, 4), lr=lr,
                            grad_norm=grad_norm, peak_mem_gb=peak_memory_gb(self.dist.device),
                            tokens_per_s=step_metrics.pop("tokens") / (time.perf_counter() - started))
        return step_metrics, stop_requested

    def _loss_step(self, batch: Batch, normalizers: Normalizers, split: str):
        """(loss, metrics) of one micro-batch: the teachers' hidden states, then the student's
        forward with the objective inside it."""
        teacher = _frozen_head(self.teacher, batch)
        teacher_reference = _frozen_head(self.teacher_reference, batch)

        def compute(hidden, head_weight):
            output = self.objective(StepInputs(
                student=Head(hidden, head_weight, **self.student_logits), batch=batch, normalizers=normalizers, vocab_size=self.vocab_size,
                teacher=teacher, teacher_reference=teacher_reference,
                reference_logps=batch.per_sequence(self.cached.get(("reference", split))),
                teacher_logps=batch.per_sequence(self.cached.get(("teacher", split))),
                kernels=self.kernel_settings))
            return output.loss, output.metrics

        return self.student(batch.input_ids, batch.attention_mask, batch.position_ids, compute)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """The objective's loss and metrics on data.eval, normalized over the whole eval set, each
        example counted once. Ranks shard the set; a rank with nothing left runs a stand-in
        micro-batch (ZeRO-3 ranks must make the same collective calls) whose result is dropped."""
        self.student.eval()
        rounds = shard_rounds(len(self.eval_set), self.config.train.micro_batch_size, self.dist.rank,
                              self.dist.world_size)
        batches = [(self.collate([self.eval_set[i] for i in indices or [0]]), not indices) for indices in rounds]
        normalizers = self._normalizers([batch for batch, stand_in in batches if not stand_in])
        sums: Dict[str, torch.Tensor] = {}
        for batch, stand_in in batches:
            _, metrics = self._loss_step(batch.to(self.dist.device), normalizers, "eval")
            accumulate(sums, {k: torch.zeros_like(v) for k, v in metrics.items()} if stand_in else metrics)
        metrics, _, _ = reduce_step_metrics(sums, 0, 0, False, self.dist.device)
        metrics.pop("tokens")
        self.student.train()
        return {f"eval/{k}": v for k, v in metrics.items()}

    # --- setup helpers ---
    def collate(self, examples) -> Batch:
        return collate(examples, pad_token_id=self.tokenizer.pad_token_id,
                            include_rejected=self.needs.uses_rejected, packing=self.config.data.packing)

    def _normalizers(self, batches: List[Batch]) -> Normalizers:
        counts = torch.zeros(3, dtype=torch.float64, device=self.dist.device)
        for batch in batches:
            counts += batch.counts().to(self.dist.device)
        pairs, chosen_tokens, rejected_tokens = collectives.all_reduce_sum(counts).tolist()
        return Normalizers(pairs=pairs, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)

    def _tokenized(self, path: str, key: str):
        fields = self.needs.fields
        examples = load_examples(path, require=("prompt",) + fields)
        d = self.config.data
        tokenized, report = tokenize_examples(
            examples, self.tokenizer, max_length=d.max_length, max_prompt_length=d.prompt_length, fields=fields,
            cache_dir=os.path.join(d.resolved_cache_dir(), "tokenized"), log=self.log.info,
            show_progress=self.dist.is_main, string_rows=d.string_rows)
        self.log.info(f"{key}: {report.summary()}")
        if not tokenized:
            raise ConfigError(f"{key}: no usable examples in {path} after tokenization ({report.summary()})")
        return tokenized

    def _frozen(self, key: str):
        return self.engine.build_frozen(getattr(self.config.model, key), key=f"model.{key}", dtype=self.dtype,
                                        device=self.dist.device, liger_kernels=self.config.model.liger_kernels)

    def _check_gradient(self, grad_norm: Optional[float], step: int) -> None:
        """Count steps in a row with a non-finite gradient (the engine skips their update); past the
        dtype's tolerance the run stops. The norm is the same on every rank (a global reduction)."""
        self.bad_gradients = self.bad_gradients + 1 if grad_norm is not None and not math.isfinite(grad_norm) else 0
        if self.bad_gradients > SKIPPED_STEPS_TOLERATED.get(self.dtype, 0):
            self._diverged(f"the gradient norm was non-finite ({grad_norm}) on {self.bad_gradients} step(s) in a row, "
                           f"up to step {step + 1}")

    def _diverged(self, what: str):
        last = checkpoints.latest(self.config.train.output_dir)
        raise TrainingDiverged(f"{what} (objective {self.objective.name}); the run stopped before applying it, and "
                               f"no final model was exported. The last good checkpoint is "
                               f"{last or 'none (none was written yet)'}. Lower train.lr, raise train.warmup_ratio, "
                               f"or check the data for empty responses")


def _frozen_head(frozen, batch: Batch) -> Optional[Head]:
    if frozen is None:
        return None
    return Head(frozen.hidden(batch.input_ids, batch.attention_mask, batch.position_ids), frozen.head,
                softcap=frozen.softcap, logit_scale=frozen.logit_scale)
