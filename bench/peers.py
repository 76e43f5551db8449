"""The shared world and the process runner of bench/test_peer_trainers.py: tiny Qwen2 models with a
real vocabulary, a tokenizer that fills their head, TRL-format conversational pairs, and one
training process per run with its peak RSS and a memory budget.

Why the tokenizer fills the head: fastdadpo takes divergences over the shared tokenizer's
vocabulary, TRL over every row of the LM head. With ``len(tokenizer) == vocab_size`` both sums run
over the same 151,936 columns. A BPE learned on the task's texts has a few hundred tokens; the
rest are vocabulary entries no input can produce (their text holds a character outside the
byte-level alphabet), so tokenizing costs what it costs with the small vocabulary while the model
and every logit row have the real size.

Why every step trains on the same batch: the data of a run at micro-batch ``b`` is exactly ``b``
pairs, so each step's batch is the whole dataset on both sides, whatever either trainer's sampler
does (shuffling reorders rows inside the batch; every loss here is a mean, so order cannot change it).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

QWEN25_VOCAB = 151_936  # Qwen2.5-0.5B/1.5B/3B heads
STUDENT = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, seed=1)
TEACHER = dict(hidden_size=128, layers=2, heads=4, kv_heads=2, seed=2)
# Each turn ends at the end-of-sequence token, nothing after it: the response a trainer learns is
# its content and the eos, under TRL's and fastdadpo's cutting alike.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
_UNREACHABLE = "\u2400"  # not in the byte-level alphabet, so no input ever becomes these entries
POLL_SECONDS = 0.05


def filled_tokenizer(vocab_size: int):
    """A byte-level BPE on the task's texts, padded with unreachable entries to ``vocab_size`` tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from fastdadpo.demo.synthetic import build_tokenizer, task_corpus

    learned = build_tokenizer(task_corpus(600, seed=0), vocab_size=min(vocab_size, 2048), chat_template=None)
    state = json.loads(learned.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"the task's BPE already has {len(vocab)} tokens, more than {vocab_size}")
    for index in range(len(vocab), vocab_size):
        vocab[f"{_UNREACHABLE}{index}"] = index
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class World:
    root: str
    vocab_size: int
    student: str
    teacher: str
    rows: tuple  # TRL conversational preference rows (prompt / chosen / rejected as message lists)

    def pairs_file(self, count: int) -> str:
        """The first ``count`` rows as JSONL, read by both trainers."""
        path = os.path.join(self.root, f"pairs-{count}.jsonl")
        if not os.path.exists(path):
            with open(path, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in self.rows[:count])
        return path


def build_world(root: str, vocab_size: int, rows: int) -> World:
    from transformers import AutoTokenizer

    from fastdadpo.demo.synthetic import WORDS, make_examples, save_model_dir, tiny_causal_lm

    os.makedirs(root, exist_ok=True)
    tokenizer = filled_tokenizer(vocab_size)
    paths = {}
    for name, shape in (("student", STUDENT), ("teacher", TEACHER)):
        model = tiny_causal_lm(vocab_size, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               **shape)
        paths[name] = save_model_dir(model, tokenizer, os.path.join(root, name))
    reloaded = AutoTokenizer.from_pretrained(paths["student"])
    if len(reloaded) != vocab_size:
        raise AssertionError(f"the saved tokenizer has {len(reloaded)} tokens, the heads {vocab_size} rows")
    rng = random.Random(5)
    data = tuple({"prompt": [{"role": "user", "content": r["prompt"]}],
                  "chosen": [{"role": "assistant", "content": r["answer"]}],
                  "rejected": [{"role": "assistant", "content": " ".join(rng.sample(WORDS, rng.randint(2, 6)))}]}
                 for r in make_examples(rows, seed=4))
    return World(root, vocab_size, paths["student"], paths["teacher"], data)


# --- one training process ---------------------------------------------------------------------------------------

@dataclass
class ProcessRun:
    returncode: int
    wall_seconds: float
    peak_rss_bytes: int  # ru_maxrss of the process, from wait4 (the same measurement for every trainer)
    over_budget: bool  # killed because its RSS passed the budget
    log_tail: str = ""


def _rss_bytes(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_process(command: List[str], env: dict, log_path: str, budget_bytes: Optional[int],
                timeout_s: float) -> ProcessRun:
    """Runs ``command``, killing it when its RSS passes ``budget_bytes`` (polled every 50 ms; the
    peak from wait4 still says by how much a spike between polls went over)."""
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        over, done = threading.Event(), threading.Event()

        def watch():
            # Not process.poll(): that would reap the child before wait4 reads its resource usage.
            while not done.is_set():
                rss = _rss_bytes(process.pid)
                if budget_bytes is not None and rss is not None and rss > budget_bytes:
                    over.set()
                    process.send_signal(signal.SIGKILL)
                    return
                if time.perf_counter() - started > timeout_s:
                    process.send_signal(signal.SIGKILL)
                    return
                done.wait(POLL_SECONDS)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        process.returncode = os.waitstatus_to_exitcode(status)
        watcher.join()
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        tail = handle.read()[-6000:]
    return ProcessRun(process.returncode, time.perf_counter() - started, usage.ru_maxrss * 1024, over.is_set(), tail)


def child_env(**extra) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
               DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH"))
                                                                 if p))
    env.update(extra)
    return env


# --- the two sides ---------------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    trainer: str  # "ours" or a TRL trainer of bench.peers_trl
    objective: str  # ours: fastdadpo's objective name; TRL: the matching math ("dpo" or "kd")
    zero_stage: Optional[int]  # ours only
    micro_batch_size: int
    steps: int
    max_length: int = 128
    max_prompt_length: int = 64
    lr: float = 1e-5
    beta: float = 0.1
    seed: int = 7
    engine: str = "deepspeed"  # ours only: deepspeed (at zero_stage) or fsdp2

    @property
    def name(self) -> str:
        if self.trainer != "ours":
            return f"trl-{self.trainer}"
        return f"fastdadpo-{self.objective}-" + (f"zero{self.zero_stage}" if self.engine == "deepspeed" else self.engine)


@dataclass
class RunResult:
    name: str
    micro_batch_size: int
    fits: bool
    peak_rss_bytes: int
    wall_seconds: float
    over_budget: bool
    steps: List[dict] = field(default_factory=list)  # per step: loss, logps/chosen, logps/rejected, grad_norm
    step_seconds: List[float] = field(default_factory=list)
    tokens_per_step: Optional[int] = None
    sequences: Optional[list] = None  # TRL: the first step's token ids per row

    @property
    def first_step(self) -> dict:
        return self.steps[0] if self.steps else {}

    @property
    def steady_step_seconds(self) -> Optional[float]:
        """Median step time after the first step (which warms up allocators and kernels)."""
        later = sorted(self.step_seconds[1:])
        return later[len(later) // 2] if later else None

    @property
    def tokens_per_s(self) -> Optional[float]:
        seconds = self.steady_step_seconds
        return self.tokens_per_step / seconds if seconds and self.tokens_per_step else None


_METRICS = ("loss", "logps/chosen", "logps/rejected", "kd/divergence", "grad_norm")


def _ours(world: World, spec: RunSpec, work: str, budget: Optional[int], timeout_s: float) -> RunResult:
    import yaml

    config = {
        # Liger's model kernels and activation checkpointing off: TRL runs the plain model code here.
        "model": {"student": world.student, "teacher": world.teacher, "dtype": "fp32", "liger_kernels": False},
        "data": {"train": world.pairs_file(spec.micro_batch_size), "max_length": spec.max_length,
                 "max_prompt_length": spec.max_prompt_length, "cache_dir": os.path.join(work, "cache")},
        "objective": {"name": spec.objective, **({"beta": spec.beta} if spec.objective in ("dpo", "dadpo_token")
                                                   else {"beta1": spec.beta} if spec.objective == "dadpo" else {}),
                      **({"kind": "forward_kl", "temperature": 1.0} if spec.objective in ("kd", "dadpo_token")
                         else {})},
        "train": {"micro_batch_size": spec.micro_batch_size, "grad_accum": 1, "max_steps": spec.steps,
                  "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "lr": spec.lr, "seed": spec.seed,
                  "gradient_checkpointing": False, "output_dir": os.path.join(work, "run")},
        **({"deepspeed": {"zero_stage": spec.zero_stage}} if spec.engine == "deepspeed" else {"engine": spec.engine}),
    }
    path = os.path.join(work, "config.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    run = run_process([sys.executable, "-m", "fastdadpo", "train", path], child_env(), os.path.join(work, "log.txt"),
                      budget, timeout_s)
    rows = []
    metrics = os.path.join(work, "run", "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    result = _result(spec, run, budget, [{k: r[k] for k in _METRICS if k in r} for r in rows])
    if rows:
        # The trainer's tokens/s counts the non-pad tokens of a step over its wall time.
        tokens = _batch_tokens(world, spec)
        result.tokens_per_step = tokens
        result.step_seconds = [tokens / r["tokens_per_s"] for r in rows]
    return result


def _batch_tokens(world: World, spec: RunSpec) -> int:
    """Non-pad tokens fastdadpo forwards per step: prompt + chosen, and prompt + rejected where the
    objective uses the rejected responses (everything but kd), as tokenized by fastdadpo.core.tokenized."""
    tokenized = tokenize_ours(world, spec)
    with_rejected = spec.objective != "kd"
    return sum(len(t.prompt_ids) + len(t.chosen_ids) + (len(t.prompt_ids) + len(t.rejected_ids) if with_rejected
                                                        else 0) for t in tokenized)


def tokenize_ours(world: World, spec: RunSpec):
    from transformers import AutoTokenizer

    from fastdadpo.core.rows import load_examples
    from fastdadpo.core.tokenized import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(world.student)
    tokenized, _ = tokenize_examples(load_examples(world.pairs_file(spec.micro_batch_size)), tokenizer,
                                     max_length=spec.max_length, max_prompt_length=spec.max_prompt_length)
    return tokenized


def _trl(world: World, spec: RunSpec, work: str, budget: Optional[int], timeout_s: float) -> RunResult:
    out = os.path.join(work, "result.json")
    payload = {"trainer": spec.trainer, "student": world.student, "teacher": world.teacher,
               "pairs": world.pairs_file(spec.micro_batch_size), "micro_batch_size": spec.micro_batch_size,
               "steps": spec.steps, "lr": spec.lr, "beta": spec.beta, "seed": spec.seed, "max_length": spec.max_length,
               "work_dir": work, "out": out}
    spec_path = os.path.join(work, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)
    run = run_process([sys.executable, "-m", "bench.peers_trl", spec_path], child_env(), os.path.join(work, "log.txt"),
                      budget, timeout_s)
    recorded = {}
    if run.returncode == 0 and os.path.exists(out):
        with open(out, encoding="utf-8") as handle:
            recorded = json.load(handle)
    result = _result(spec, run, budget, [{k: s[k] for k in _METRICS if k in s} for s in recorded.get("steps", [])])
    result.step_seconds = recorded.get("step_seconds", [])
    tokens = recorded.get("tokens_per_step") or []
    result.tokens_per_step = tokens[0] if tokens else None
    result.sequences = recorded.get("first_step_sequences")
    return result


def _result(spec: RunSpec, run: ProcessRun, budget: Optional[int], steps: List[dict]) -> RunResult:
    if run.returncode != 0 and not run.over_budget and run.returncode != -signal.SIGKILL:
        raise AssertionError(f"{spec.name} at micro-batch {spec.micro_batch_size} failed (exit {run.returncode}):\n"
                             f"{run.log_tail}")
    fits = run.returncode == 0 and (budget is None or run.peak_rss_bytes <= budget) and len(steps) == spec.steps
    return RunResult(spec.name, spec.micro_batch_size, fits, run.peak_rss_bytes, run.wall_seconds, run.over_budget,
                     steps)


def run_training(world: World, spec: RunSpec, work: str, budget: Optional[int], timeout_s: float) -> RunResult:
    os.makedirs(work, exist_ok=True)
    return (_ours if spec.trainer == "ours" else _trl)(world, spec, work, budget, timeout_s)
