"""The suite's options (command line, or environment for CI), resolved once per pytest run."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from bench.memory import MemoryBaseline
from bench.registry import SIZES

_KEY = pytest.StashKey["BenchSettings"]()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _percent(text: str) -> float:
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def add_options(parser) -> None:
    group = parser.getgroup("fastdadpo bench")
    group.addoption("--bench-quick", action="store_true", default=_env_flag("FASTDADPO_BENCH_QUICK"),
                    help="CI smoke run: tiny sizes, one round, torch.compile off, a short train step "
                         "(also FASTDADPO_BENCH_QUICK=1)")
    group.addoption("--bench-sizes", default=os.environ.get("FASTDADPO_BENCH_SIZES", ""),
                    help=f"comma-separated sizes to run (default: every non-quick size): {', '.join(SIZES)}")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per benchmark (default: 3 on CPU, 10 on GPU, 1 in quick mode)")
    group.addoption("--bench-warmup", type=int, default=None,
                    help="untimed warm-up rounds (default 1, 0 in quick mode); torch.compile and Liger compile "
                         "on the first call, so keep at least 1 for timings")
    group.addoption("--memory-baseline", default=None, metavar="PATH",
                    help="fail a benchmark whose peak memory exceeds its value in this JSON by more than "
                         "--memory-tolerance")
    group.addoption("--memory-tolerance", default="10%", help="allowed growth over --memory-baseline (default 10%%)")
    group.addoption("--memory-baseline-save", default=None, metavar="PATH",
                    help="write (merge) this run's peak memory per benchmark into this JSON")
    group.addoption("--train-memory-budget", type=float,
                    default=float(os.environ.get("FASTDADPO_BENCH_MEMORY_BUDGET_GB", "4")),
                    help="CPU train step: a micro-batch fits if the run's peak RSS stays within this many GiB "
                         "(default 4; also FASTDADPO_BENCH_MEMORY_BUDGET_GB)")
    group.addoption("--train-max-micro-batch", type=int,
                    default=int(os.environ.get("FASTDADPO_BENCH_MAX_MICRO_BATCH", "0")) or None,
                    help="stop the micro-batch doubling here (default 256 on CPU, 4096 on GPU; "
                         "also FASTDADPO_BENCH_MAX_MICRO_BATCH)")
    group.addoption("--peers-run-seconds", type=float,
                    default=float(os.environ.get("FASTDADPO_BENCH_PEERS_RUN_SECONDS", "300")),
                    help="peer-trainer sweep: skip the next micro-batch of a trainer whose run there would take "
                         "longer than this, estimated from its last run (default 300; also "
                         "FASTDADPO_BENCH_PEERS_RUN_SECONDS)")


@dataclass
class BenchSettings:
    quick: bool
    sizes: Tuple[str, ...]
    rounds: int
    warmup_rounds: int
    memory_baseline: MemoryBaseline
    train_memory_budget_bytes: int
    train_max_micro_batch: int
    peers_run_seconds: float

    @property
    def compile_enabled(self) -> bool:
        return not self.quick

    @staticmethod
    def of(config) -> "BenchSettings":
        settings = config.stash.get(_KEY, None)
        if settings is None:
            settings = config.stash[_KEY] = BenchSettings._resolve(config)
        return settings

    @staticmethod
    def _resolve(config) -> "BenchSettings":
        quick = bool(config.getoption("bench_quick"))
        requested = tuple(name.strip() for name in config.getoption("bench_sizes").split(",") if name.strip())
        unknown = [name for name in requested if name not in SIZES]
        if unknown:
            raise pytest.UsageError(f"--bench-sizes: unknown size(s) {', '.join(unknown)}; known: {', '.join(SIZES)}")
        sizes = requested or tuple(name for name, size in SIZES.items() if size.quick == quick)
        gpu = torch.cuda.is_available()
        rounds = config.getoption("bench_rounds") or (1 if quick else 10 if gpu else 3)
        warmup = config.getoption("bench_warmup")
        if warmup is None:
            warmup = 0 if quick else 1
        baseline = MemoryBaseline(config.getoption("memory_baseline"), _percent(config.getoption("memory_tolerance")),
                                  config.getoption("memory_baseline_save"))
        max_micro_batch = config.getoption("train_max_micro_batch") or (2 if quick else 4096 if gpu else 256)
        return BenchSettings(quick=quick, sizes=sizes, rounds=rounds, warmup_rounds=warmup, memory_baseline=baseline,
                             train_memory_budget_bytes=int(config.getoption("train_memory_budget") * 2**30),
                             train_max_micro_batch=max_micro_batch,
                             peers_run_seconds=config.getoption("peers_run_seconds"))

    def describe(self) -> dict:
        return {"quick": self.quick, "sizes": list(self.sizes), "rounds": self.rounds,
                "warmup_rounds": self.warmup_rounds, "compile_enabled": self.compile_enabled,
                "train_memory_budget_gib": self.train_memory_budget_bytes / 2**30,
                "train_max_micro_batch": self.train_max_micro_batch, "peers_run_seconds": self.peers_run_seconds}


def settings_or_none(config) -> Optional[BenchSettings]:
    return config.stash.get(_KEY, None)
