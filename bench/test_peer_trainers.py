"""fastdadpo train against the trainers users would otherwise run: TRL's DPOTrainer (dpo, and our
dadpo with its cached teacher log-probs beside it) and TRL's GKDTrainer and DistillationTrainer
(our kd, forward KL, and dadpo_token beside them), on the same work.

The same work: tiny Qwen2 models with Qwen2.5's real vocabulary (151,936 rows, student hidden 64,
teacher 128, built offline), a tokenizer that fills the head (so TRL's divergence over every head
row and ours over the tokenizer's vocabulary sum over the same columns), the same TRL-format
conversational pairs through a chat template that ends each turn at the end-of-sequence token, fp32,
the same micro-batch, lengths, learning rate and optimizer (AdamW 0.9/0.999/1e-8, no weight decay,
clipping at 1, cosine with no warm-up), every step on the same batch (bench/peers.py says why).
One process per run, so each has its own honest peak RSS. Ours runs under the single-rank
default (DeepSpeed ZeRO-3) and under ZeRO-0.

No row compares different math: each run's first-step loss must agree with every other run of the
same math (TRL DPO = our dpo; GKD = DistillationTrainer = our kd), and so must the student's
sequence log-probs (TRL DPO and every fastdadpo objective log them) and, within the same math, the
gradient norm. A DPO loss at the first step is log 2 whatever the tokens (policy = reference), so
the log-probs and gradient norm carry that check. The token ids TRL trained on in its first step
are compared per row with fastdadpo's tokenization of the same rows.

Recorded per run (extra_info): peak RSS of the process (ru_maxrss from wait4, the whole process:
Python, libraries, models, optimizer state, activations), median step time after the first step,
tokens/s (non-pad tokens per step over that time), the first step's metrics. Then a micro-batch
sweep: the largest micro-batch whose run stays within --train-memory-budget GiB (a run whose RSS
passes it is killed and does not fit), stopping at a trainer's first miss.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Dict, List, Optional, Tuple

import pytest

from bench.peers import QWEN25_VOCAB, STUDENT, TEACHER, RunResult, RunSpec, World, build_world, run_training, \
    tokenize_ours
from bench.settings import BenchSettings

TRL_INSTALLED = importlib.util.find_spec("trl") is not None
QUICK_VOCAB = 4096
REFERENCE_MICRO_BATCH = {False: 8, True: 2}  # full, quick
REFERENCE_STEPS = {False: 3, True: 2}
SWEEP_STEPS = 2  # the first step warms up; the second is timed
# Powers of four up to the cap rather than every doubling: each point is a process start (20-60 s
# on 2 shared cores) and TRL's DPO step costs ~3 s per pair there, so the full doubling would take
# over an hour. The points still span the 2 ... 64.
SWEEP = (2, 8, 32, 64)
MAX_MICRO_BATCH = 64
RUN_TIMEOUT_S = 1800
TOLERANCE = {"loss": 1e-4, "logps/chosen": 1e-4, "logps/rejected": 1e-4, "grad_norm": 1e-3}
MEMORY_METHOD = ("peak RSS of the training process: ru_maxrss from wait4 (Python, libraries, models, optimizer "
                 "state, activations); the run is killed when its RSS (polled every 50 ms) passes the budget")


@dataclass(frozen=True)
class Trainer:
    name: str
    trainer: str  # "ours" or the TRL trainer (bench.peers_trl)
    objective: str
    zero_stage: Optional[int]
    math: Optional[str]  # runs of the same math must agree on their first-step loss and gradient norm
    sweep: bool  # in the micro-batch sweep (the others: their reference run only, for wall time)
    quick: bool  # in the quick mode (CI)
    reference_handling: str = ""
    engine: str = "deepspeed"  # ours: deepspeed at zero_stage, or fsdp2


TRAINERS = [
    Trainer("trl-dpo", "dpo", "dpo", None, "dpo", True, True,
            "reference model loaded beside the student and run on every batch (TRL's default)"),
    Trainer("trl-dpo-precomputed", "dpo-precomputed", "dpo", None, "dpo", False, False,
            "reference log-probs precomputed before training (precompute_ref_log_probs=True), reference dropped"),
    Trainer("fastdadpo-dpo-zero3", "ours", "dpo", 3, "dpo", True, True,
            "reference log-probs computed once before training and cached (fastdadpo's only mode)"),
    Trainer("fastdadpo-dpo-zero0", "ours", "dpo", 0, "dpo", False, False,
            "reference log-probs computed once before training and cached (fastdadpo's only mode)"),
    Trainer("fastdadpo-dpo-fsdp2", "ours", "dpo", None, "dpo", False, True,
            "reference log-probs computed once before training and cached; PyTorch FSDP2 engine", "fsdp2"),
    Trainer("fastdadpo-dadpo-zero3", "ours", "dadpo", 3, None, False, False,
            "reference and teacher sequence log-probs cached before training; no teacher in memory while training"),
    Trainer("trl-gkd", "gkd", "kd", None, "kd", True, False, "no reference; teacher in memory, run on every batch"),
    Trainer("trl-distillation", "distillation", "kd", None, "kd", True, True,
            "no reference; teacher in memory, run on every batch"),
    Trainer("fastdadpo-kd-zero3", "ours", "kd", 3, "kd", True, True,
            "no reference; teacher in memory (ZeRO-3 engine), run on every batch"),
    Trainer("fastdadpo-kd-zero0", "ours", "kd", 0, "kd", False, False,
            "no reference; teacher in memory, run on every batch"),
    Trainer("fastdadpo-kd-fsdp2", "ours", "kd", None, "kd", False, True,
            "no reference; teacher in memory (sharded by FSDP2 beside the student), run on every batch", "fsdp2"),
    Trainer("fastdadpo-dadpo_token-zero3", "ours", "dadpo_token", 3, None, False, False,
            "reference log-probs cached; teacher in memory for the token-level KL"),
]
GROUP = {"dpo": "dpo", "dadpo": "dpo", "kd": "kd", "dadpo_token": "kd"}


def _spec(trainer: Trainer, micro_batch_size: int, steps: int) -> RunSpec:
    return RunSpec(trainer.trainer, trainer.objective, trainer.zero_stage, micro_batch_size, steps,
                   engine=trainer.engine)


@pytest.fixture(scope="session")
def peer_world(tmp_path_factory, request) -> World:
    quick = BenchSettings.of(request.config).quick
    return build_world(str(tmp_path_factory.mktemp("peer_world")), QUICK_VOCAB if quick else QWEN25_VOCAB,
                       REFERENCE_MICRO_BATCH[True] if quick else MAX_MICRO_BATCH)


class ReferenceRuns:
    """Each trainer's run at the reference micro-batch. Full mode: run when its test asks, alone on the
    machine (timings). Quick mode: every quick trainer's run starts at the first request, two at a
    time (no timing is asserted; the 2-core CI machine spends most of each run importing)."""

    def __init__(self, world: World, root: str, settings: BenchSettings):
        self.world, self.root, self.settings = world, root, settings
        self.futures: Dict[str, object] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=2) if settings.quick else None

    def _run(self, trainer: Trainer) -> RunResult:
        quick = self.settings.quick
        return run_training(self.world, _spec(trainer, REFERENCE_MICRO_BATCH[quick], REFERENCE_STEPS[quick]),
                            os.path.join(self.root, trainer.name, "reference"), self.budget, RUN_TIMEOUT_S)

    @property
    def budget(self) -> int:
        return self.settings.train_memory_budget_bytes

    def get(self, trainer: Trainer) -> RunResult:
        if self.pool is None:
            return self._run(trainer)
        with self.lock:
            if not self.futures:
                for other in TRAINERS:
                    if other.quick:
                        self.futures[other.name] = self.pool.submit(self._run, other)
        return self.futures[trainer.name].result()


@pytest.fixture(scope="session")
def reference_runs(peer_world, tmp_path_factory, request):
    runs = ReferenceRuns(peer_world, str(tmp_path_factory.mktemp("peer_runs")), BenchSettings.of(request.config))
    yield runs
    if runs.pool is not None:
        runs.pool.shutdown(wait=True)


# --- checks ------------------------------------------------------------------------------------------------------

# First-step values seen so far in this session: (quantity, math or None) -> (run name, value).
_FIRST_STEP: Dict[Tuple[str, Optional[str]], Tuple[str, float]] = {}


def _agreement_keys(trainer: Trainer, first_step: dict) -> List[Tuple[str, Optional[str]]]:
    keys = [(name, None) for name in ("logps/chosen", "logps/rejected") if name in first_step]
    if trainer.math is not None:
        keys += [(name, trainer.math) for name in ("loss", "grad_norm") if name in first_step]
    return keys


def check_agreement(trainer: Trainer, result: RunResult, seen=_FIRST_STEP) -> List[str]:
    """Compare this run's first step with every quantity an earlier run of the session recorded."""
    problems = []
    first = result.first_step
    for key in _agreement_keys(trainer, first):
        quantity, _ = key
        value = float(first[quantity])
        if key not in seen:
            seen[key] = (trainer.name, value)
            continue
        other, expected = seen[key]
        if value != pytest.approx(expected, rel=TOLERANCE[quantity], abs=1e-6):
            problems.append(f"first-step {quantity}: {trainer.name} {value!r} against {other} {expected!r} "
                            f"(relative tolerance {TOLERANCE[quantity]})")
    return problems


def check_tokens(world: World, trainer: Trainer, result: RunResult) -> Optional[str]:
    """TRL's first-step sequences against fastdadpo's tokenization, row by row (matched by prompt)."""
    if result.sequences is None:
        return None
    ours = {tuple(t.prompt_ids): t for t in tokenize_ours(world, _spec(trainer, result.micro_batch_size, 1))}
    if len(result.sequences) != len(ours):
        return f"{trainer.name} trained its first step on {len(result.sequences)} rows, fastdadpo on {len(ours)}"
    for row in result.sequences:
        mine = ours.get(tuple(row["prompt"]))
        if mine is None:
            return f"{trainer.name}: a prompt fastdadpo did not tokenize that way: {row['prompt']}"
        for name in ("chosen", "rejected"):
            if name in row and row[name] != mine.response_ids(name):
                return (f"{trainer.name}: {name} tokens differ for prompt {row['prompt']}: TRL {row[name]}, "
                        f"fastdadpo {mine.response_ids(name)}")
    return None


# --- the sweep -----------------------------------------------------------------------------------------------------

def _predicted_seconds(last: RunResult, micro_batch_size: int, steps: int) -> float:
    """The next run's wall time if its steps scale with the micro-batch and its start-up does not."""
    step_time = last.steady_step_seconds or (last.step_seconds[-1] if last.step_seconds else 0.0)
    start_up = max(0.0, last.wall_seconds - sum(last.step_seconds))
    return start_up + steps * step_time * micro_batch_size / last.micro_batch_size


def sweep(world: World, trainer: Trainer, reference: RunResult, root: str, settings: BenchSettings):
    """(runs by micro-batch, the largest that fits, why the sweep stopped)."""
    budget = settings.train_memory_budget_bytes

    def run_at(micro_batch_size: int) -> RunResult:
        return run_training(world, _spec(trainer, micro_batch_size, SWEEP_STEPS),
                            os.path.join(root, trainer.name, f"micro_batch_{micro_batch_size}"), budget, RUN_TIMEOUT_S)

    search: List[RunResult] = []
    stopped = "micro-batch cap"
    last = reference
    for micro_batch_size in [b for b in SWEEP if b <= min(MAX_MICRO_BATCH, settings.train_max_micro_batch)]:
        if micro_batch_size != reference.micro_batch_size:
            predicted = _predicted_seconds(last, micro_batch_size, SWEEP_STEPS)
            if micro_batch_size > last.micro_batch_size and predicted > settings.peers_run_seconds:
                stopped = (f"time cap: micro-batch {micro_batch_size} predicted {predicted:.0f} s "
                           f"> --peers-run-seconds {settings.peers_run_seconds:.0f}")
                break
        last = reference if micro_batch_size == reference.micro_batch_size else run_at(micro_batch_size)
        search.append(last)
        if not last.fits:
            stopped = "over the memory budget"
            break
    fitting = [run.micro_batch_size for run in search if run.fits]
    if search and not search[-1].fits and fitting and search[-1].micro_batch_size // 2 > max(fitting):
        # A miss after a coarse jump: one run halfway (in doubling terms) sharpens the answer.
        search.append(run_at(search[-1].micro_batch_size // 2))
    search.sort(key=lambda run: run.micro_batch_size)
    largest = max((run.micro_batch_size for run in search if run.fits), default=0)
    return search, largest, stopped


def _versions() -> dict:
    def of(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {name: of(name) for name in ("trl", "transformers", "torch", "deepspeed", "accelerate", "datasets")}


def _summary(run: RunResult) -> dict:
    return {"micro_batch_size": run.micro_batch_size, "fits": run.fits, "over_budget": run.over_budget,
            "peak_rss_bytes": run.peak_rss_bytes, "step_seconds": run.steady_step_seconds,
            "tokens_per_s": run.tokens_per_s, "wall_seconds": run.wall_seconds, "first_step": run.first_step}


@pytest.mark.peers
@pytest.mark.timeout(4 * RUN_TIMEOUT_S)
@pytest.mark.skipif(not TRL_INSTALLED, reason="TRL is not installed; `pip install -e .[bench]` installs it "
                                              "(the bench extra's trl)")
@pytest.mark.parametrize("trainer", TRAINERS, ids=[t.name for t in TRAINERS])
def test_peer_trainer(benchmark, trainer, peer_world, reference_runs, tmp_path, request):
    settings = BenchSettings.of(request.config)
    if settings.quick and not trainer.quick:
        pytest.skip("full run only (quick mode: TRL DPO and DistillationTrainer against our ZeRO-3 default and FSDP2)")
    benchmark.group = f"peers {GROUP[trainer.objective]} V={peer_world.vocab_size}"
    reference = benchmark.pedantic(reference_runs.get, args=(trainer,), rounds=1, warmup_rounds=0)
    assert reference.fits, (f"{trainer.name}: the reference micro-batch {reference.micro_batch_size} does not fit "
                            f"in {settings.train_memory_budget_bytes / 2**30:.1f} GiB: {_summary(reference)}")
    token_problem = check_tokens(peer_world, trainer, reference)
    agreement = check_agreement(trainer, reference)

    search, largest, stopped = [reference], (reference.micro_batch_size if reference.fits else 0), "quick mode"
    if trainer.sweep and not settings.quick:
        search, largest, stopped = sweep(peer_world, trainer, reference, str(tmp_path), settings)

    benchmark.extra_info.update(
        case="peer_trainer", implementation=trainer.name, trainer=trainer.trainer, objective=trainer.objective,
        math=trainer.math, zero_stage=trainer.zero_stage, engine=trainer.engine, reference_handling=trainer.reference_handling,
        vocab=peer_world.vocab_size, student_hidden=STUDENT["hidden_size"], teacher_hidden=TEACHER["hidden_size"],
        layers=STUDENT["layers"], dtype="fp32", device="cpu", micro_batch_size=reference.micro_batch_size,
        steps=REFERENCE_STEPS[settings.quick], max_length=RunSpec.max_length,
        max_prompt_length=RunSpec.max_prompt_length, lr=RunSpec.lr, beta=RunSpec.beta, seed=RunSpec.seed,
        optimizer="AdamW(0.9, 0.999, eps 1e-8), weight decay 0, clip 1.0, cosine, no warm-up",
        peak_memory_bytes=reference.peak_rss_bytes, step_seconds=reference.steady_step_seconds,
        tokens_per_step=reference.tokens_per_step, tokens_per_s=reference.tokens_per_s,
        wall_seconds=reference.wall_seconds, first_step_loss=reference.first_step.get("loss"),
        first_step=reference.first_step, all_steps=reference.steps, tokens_checked=reference.sequences is not None,
        largest_micro_batch=largest, sweep_stopped=stopped, memory_budget_bytes=settings.train_memory_budget_bytes,
        memory_method=MEMORY_METHOD, versions=_versions(), search=[_summary(run) for run in search])
    problems = ([token_problem] if token_problem else []) + agreement
    if problems:
        benchmark.has_error = True
        pytest.fail("; ".join(problems))


@pytest.mark.peers
def test_checks_catch_different_math_and_tokens(peer_world):
    """The two guards above fail when they should: another loss or gradient norm of the same math,
    other log-probs of the same student, a response token that differs from fastdadpo's."""
    by_name = {trainer.name: trainer for trainer in TRAINERS}
    trl_dpo, ours_dpo, ours_dadpo = (by_name[name] for name in ("trl-dpo", "fastdadpo-dpo-zero3", "fastdadpo-dadpo-zero3"))
    first = {"loss": 0.6931, "logps/chosen": -50.0, "logps/rejected": -40.0, "grad_norm": 1.0}

    def result(**changes):
        return RunResult("x", 2, True, 0, 0.0, False, steps=[dict(first, **changes)])

    seen: dict = {}
    assert check_agreement(trl_dpo, result(), seen) == []
    assert check_agreement(ours_dpo, result(loss=0.6931 * (1 + 1e-6)), seen) == []
    assert len(check_agreement(ours_dpo, result(loss=0.7), seen)) == 1
    assert len(check_agreement(ours_dpo, result(grad_norm=1.1), seen)) == 1
    # dadpo's loss is other math (no check), its student log-probs are not
    assert check_agreement(ours_dadpo, result(loss=0.9, grad_norm=3.0), seen) == []
    assert len(check_agreement(ours_dadpo, result(**{"logps/chosen": -51.0}), seen)) == 1

    spec = _spec(trl_dpo, len(peer_world.rows), 1)
    rows = [{"prompt": list(t.prompt_ids), "chosen": list(t.chosen_ids), "rejected": list(t.rejected_ids)}
            for t in tokenize_ours(peer_world, spec)]
    run = RunResult("x", spec.micro_batch_size, True, 0, 0.0, False, sequences=rows)
    assert check_tokens(peer_world, trl_dpo, run) is None
    rows[-1]["rejected"] = rows[-1]["rejected"][:-1]  # e.g. a template that drops the eos
    assert "rejected tokens differ" in check_tokens(peer_world, trl_dpo, run)
