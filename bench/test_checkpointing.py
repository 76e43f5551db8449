"""Activation checkpointing (``train.gradient_checkpointing``): peak memory and step time of an
``sft`` step at long sequences, with and without it, in real `fastdadpo train` processes (ZeRO-3,
one rank). The vocabulary is small here on purpose: the fused kernels already keep the LM head's
share small, so what is left at 2,048 tokens is the decoder's activations, which checkpointing
trades for one more forward.

On CPU the peak is the trainer's ``peak_mem_gb`` (ru_maxrss of the whole process, ~0.9 GiB of which
is Python, torch and DeepSpeed); the difference between the two runs is the activations saved.
Both runs train the same step: their first losses must agree.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from bench.settings import BenchSettings

RUN_TIMEOUT_S = 1800
MODEL = dict(hidden_size=256, layers=8, heads=8, kv_heads=4, intermediate_size=1024, seed=1)


@pytest.fixture(scope="module")
def long_world(tmp_path_factory, request):
    """A student that takes 2,048 positions and chosen responses that fill them (quick: 128)."""
    from fastdadpo.demo.synthetic import WORDS, build_tokenizer, save_model_dir, task_corpus, tiny_causal_lm

    quick = BenchSettings.of(request.config).quick
    length, shape = (96, dict(MODEL, hidden_size=64, layers=2, intermediate_size=128)) if quick else (2048, MODEL)
    root = tmp_path_factory.mktemp("long_world")
    tokenizer = build_tokenizer(task_corpus(300, seed=0), vocab_size=384)
    model = tiny_causal_lm(len(tokenizer), max_positions=length, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, **shape)
    rng = random.Random(0)
    rows = [{"prompt": "repeat: " + " ".join(rng.sample(WORDS, 4)),
             "chosen": " ".join(rng.choice(WORDS) for _ in range(length))} for _ in range(4)]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return dict(student=save_model_dir(model, tokenizer, str(root / "student")), train=str(train), length=length,
                shape=shape)


def _run(world: dict, out_dir: str, checkpointing: bool, steps: int) -> dict:
    config = {"model": {"student": world["student"]},
              "data": {"train": world["train"], "max_length": world["length"], "max_prompt_length": 32,
                       "cache_dir": os.path.join(out_dir, "cache")},
              "objective": {"name": "sft"},
              "train": {"micro_batch_size": 1, "max_steps": steps, "warmup_ratio": 0.0, "seed": 7,
                        "output_dir": os.path.join(out_dir, "run"), "gradient_checkpointing": checkpointing},
              "deepspeed": {"zero_stage": 3}}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "train", path], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with open(os.path.join(out_dir, "run", "metrics.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    steady = rows[1:] or rows
    return {"first_step_loss": rows[0]["loss"], "peak_memory_bytes": int(max(r["peak_mem_gb"] for r in rows) * 2**30),
            "tokens_per_s": sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2], "steps": len(rows)}


_runs: dict = {}


@pytest.mark.train
@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["off", "on"])
def test_activation_checkpointing(benchmark, checkpointing, long_world, tmp_path, request):
    settings = BenchSettings.of(request.config)
    steps = 2 if settings.quick else 3
    benchmark.group = f"sft step, {long_world['length']} tokens, activation checkpointing"
    run = benchmark.pedantic(_run, args=(long_world, str(tmp_path), checkpointing, steps), rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(case="activation_checkpointing",
                                implementation=f"checkpointing {'on' if checkpointing else 'off'}",
                                sequence_tokens=long_world["length"], model=long_world["shape"],
                                memory_method="trainer peak_mem_gb (ru_maxrss on CPU, max_memory_allocated on CUDA)",
                                **run)
    _runs[checkpointing] = run
    if len(_runs) == 2:
        assert _runs[True]["first_step_loss"] == pytest.approx(_runs[False]["first_step_loss"], rel=1e-5), _runs
