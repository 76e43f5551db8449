"""A `fastdadpo train` step with the fused kernels against the same step with materialized logits
(FASTDADPO_KERNEL_BACKEND=naive): tokens/s, peak memory, and the largest micro-batch that fits.

The models are tiny but the vocabulary is not (V=32,768 against hidden sizes 64 and 128), so the
LM-head losses dominate a step, as they do for small students of large-vocabulary teachers. Each
run is a real `fastdadpo train` process: one rank (gloo on CPU), objective dadpo_token (DPO
log-probs and a token-level forward KL to the online teacher from one sweep), under DeepSpeed ZeRO-3
(the default engine) and, for the fused kernels, under PyTorch FSDP2 too (``engine: fsdp2``).

"Fits": on GPU, the run does not run out of memory (micro-batches double until one does); on CPU,
where running out means swapping or the OOM killer, the run's peak RSS (the trainer's own
``peak_mem_gb``: ru_maxrss, the whole process) stays within ``--train-memory-budget`` GiB.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import string
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional

import pytest
import torch
import yaml

from bench.settings import BenchSettings

VOCAB = 32768
STUDENT = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, seed=1)
TEACHER = dict(hidden_size=128, layers=2, heads=4, kv_heads=2, seed=2)
OBJECTIVE = "dadpo_token"
EXAMPLES = 64  # micro-batches larger than this repeat examples (the trainer pads steps that way)
RUN_TIMEOUT_S = 1800
BACKENDS = {"fused": "chunked" if torch.cuda.is_available() else "torch", "naive": "naive"}  # the defaults
# implementation -> (kernel backend, engine)
RUNS = {"fused": ("fused", "deepspeed"), "naive": ("naive", "deepspeed"), "fused-fsdp2": ("fused", "fsdp2")}


@pytest.fixture(scope="session")
def train_world(tmp_path_factory):
    """A tokenizer with a 32,768-token vocabulary (the task's texts plus random filler words, so BPE
    has that many merges to learn), a student and a wider teacher sharing it, preference pairs."""
    from fastdadpo.demo.synthetic import WORDS, build_tokenizer, make_examples, save_model_dir, task_corpus, tiny_causal_lm

    root = tmp_path_factory.mktemp("train_world")
    rng = random.Random(0)
    filler = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 10))) for _ in range(12000)]
    filler_texts = [" ".join(filler[i:i + 20]) for i in range(0, len(filler), 20)] * 2
    tokenizer = build_tokenizer(task_corpus(600, seed=0) + filler_texts, vocab_size=VOCAB)
    assert len(tokenizer) == VOCAB, f"the tokenizer learned {len(tokenizer)} tokens, not {VOCAB}"
    world = {}
    for name, shape in (("student", STUDENT), ("teacher", TEACHER)):
        model = tiny_causal_lm(VOCAB, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               **shape)
        world[name] = save_model_dir(model, tokenizer, str(root / name))
    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": " ".join(rng.sample(WORDS, 3))}
            for r in make_examples(EXAMPLES, seed=4)]
    world["train"] = str(root / "train.jsonl")
    with open(world["train"], "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return world


@dataclass
class TrainRun:
    micro_batch_size: int
    returncode: int
    steps: int
    tokens_per_s: Optional[float]  # median over the steps after the first (which warms up)
    peak_memory_bytes: Optional[int]  # max of the trainer's peak_mem_gb over the steps
    first_step_loss: Optional[float]
    out_of_memory: bool
    fits: bool


def _config(world: dict, out_dir: str, micro_batch_size: int, steps: int, engine: str = "deepspeed") -> str:
    config = {
        "model": {"student": world["student"], "teacher": world["teacher"]},
        "data": {"train": world["train"], "max_length": 64, "max_prompt_length": 40,
                 "cache_dir": os.path.join(out_dir, "cache")},  # per run: each pays its own precompute
        "objective": {"name": OBJECTIVE},
        "train": {"micro_batch_size": micro_batch_size, "grad_accum": 1, "max_steps": steps, "warmup_ratio": 0.0,
                  "output_dir": os.path.join(out_dir, "run"), "seed": 7},
        **({"deepspeed": {"zero_stage": 3}} if engine == "deepspeed" else {"engine": engine}),
    }
    path = os.path.join(out_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    return path


def _environment(backend: str) -> dict:
    env = dict(os.environ, FASTDADPO_KERNEL_BACKEND=BACKENDS[backend], TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_train(world: dict, backend: str, micro_batch_size: int, steps: int, out_dir: str,
              memory_budget_bytes: Optional[int], engine: str = "deepspeed") -> TrainRun:
    """One `fastdadpo train` process. Raises on failures other than running out of memory."""
    os.makedirs(out_dir, exist_ok=True)
    command = [sys.executable, "-m", "fastdadpo", "train", _config(world, out_dir, micro_batch_size, steps, engine)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_environment(backend))
    log = result.stdout[-2000:] + result.stderr[-4000:]
    # CUDA raises OutOfMemoryError; on CPU the kernel's OOM killer ends the process with SIGKILL.
    out_of_memory = result.returncode != 0 and ("out of memory" in log.lower() or result.returncode == -9)
    if result.returncode != 0 and not out_of_memory:
        raise AssertionError(f"fastdadpo train ({backend}, {engine}, micro-batch {micro_batch_size}) failed:\n{log}")
    rows = []
    metrics_path = os.path.join(out_dir, "run", "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    steady = rows[1:] or rows
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady) if steady else None
    peak = int(max(r["peak_mem_gb"] for r in rows) * 2**30) if rows else None
    fits = not out_of_memory and peak is not None and (memory_budget_bytes is None or peak <= memory_budget_bytes)
    return TrainRun(micro_batch_size, result.returncode, len(rows), tokens_per_s, peak,
                    rows[0]["loss"] if rows else None, out_of_memory, fits)


@pytest.mark.train
@pytest.mark.timeout(4 * RUN_TIMEOUT_S)
@pytest.mark.parametrize("implementation", list(RUNS))
def test_train_step(benchmark, implementation, train_world, tmp_path, request):
    """Timed: one run of a few steps at the reference micro-batch (process start-up included; the
    steady tokens/s is in extra_info). Then micro-batches double from 1 until one does not fit."""
    settings = BenchSettings.of(request.config)
    backend, engine = RUNS[implementation]
    reference_micro_batch, steps, search_steps = (2, 2, 2) if settings.quick else (8, 4, 2)
    on_cpu = not torch.cuda.is_available()
    budget = settings.train_memory_budget_bytes if on_cpu else None

    def run(micro_batch_size: int, run_steps: int) -> TrainRun:
        return run_train(train_world, backend, micro_batch_size, run_steps,
                         str(tmp_path / f"micro_batch_{micro_batch_size}"), budget, engine)

    benchmark.group = f"train step {OBJECTIVE} V={VOCAB}"
    reference = benchmark.pedantic(run, args=(reference_micro_batch, steps), rounds=1, warmup_rounds=0)
    assert reference.fits, f"{implementation}: the reference micro-batch {reference_micro_batch} does not fit: {reference}"

    search: List[TrainRun] = []
    micro_batch_size = reference_micro_batch if settings.quick else 1
    while micro_batch_size <= settings.train_max_micro_batch:
        probe = reference if micro_batch_size == reference_micro_batch else run(micro_batch_size, search_steps)
        search.append(probe)
        if not probe.fits:
            break
        micro_batch_size *= 2
    largest = max((probe.micro_batch_size for probe in search if probe.fits), default=0)

    benchmark.extra_info.update(
        case="train_step", implementation=implementation, kernel_backend=BACKENDS[backend], engine=engine,
        objective=OBJECTIVE,
        vocab=VOCAB, student_hidden=STUDENT["hidden_size"], teacher_hidden=TEACHER["hidden_size"],
        device="cuda" if not on_cpu else "cpu", micro_batch_size=reference_micro_batch, steps=steps,
        tokens_per_s=reference.tokens_per_s, peak_memory_bytes=reference.peak_memory_bytes,
        first_step_loss=reference.first_step_loss, largest_micro_batch=largest,
        largest_micro_batch_capped=bool(search and search[-1].fits),
        memory_budget_bytes=budget, micro_batch_cap=settings.train_max_micro_batch,
        memory_method=("trainer peak_mem_gb: ru_maxrss of the whole process" if on_cpu
                       else "trainer peak_mem_gb: torch.cuda.max_memory_allocated"),
        search=[asdict(probe) for probe in search])
    # Every implementation trains the same step: the first losses must agree (the last to run checks).
    _first_step_losses[implementation] = reference.first_step_loss
    if len(_first_step_losses) == len(RUNS):
        first = next(iter(_first_step_losses.values()))
        if any(loss != pytest.approx(first, rel=1e-4) for loss in _first_step_losses.values()):
            benchmark.has_error = True
            pytest.fail(f"the train steps compute different losses: {_first_step_losses}")
    failure = settings.memory_baseline.check(request.node.nodeid, reference.peak_memory_bytes)
    if failure:
        benchmark.has_error = True
        pytest.fail(failure)


_first_step_losses: dict = {}
