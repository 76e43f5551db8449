"""``fastdadpo plan --device cpu`` against measured peak memory: tiny and small Qwen2 students
trained with ``fastdadpo train`` on 1 and 2 gloo ranks, ZeRO 0/2/3 (and FSDP2 with ``--cases``), with
and without activation checkpointing; per rank, the peak resident set size during the training steps.

    python bench/plan_check.py [--out bench/results/plan-vs-measured.md] [--quick]

How peaks are measured and the baseline separated:

* Each case is a real ``fastdadpo train`` run under torchrun, its workers started through this file
  (``--worker``), which runs the trainer in-process and records, per rank, ``VmHWM`` (peak RSS, from
  /proc/self/status) over the training steps only: the high-water mark is reset (``5`` written to
  /proc/self/clear_refs) just before the first optimizer step, so setup transients (model loading,
  DeepSpeed's flattening copies) and the final export, which the planner does not plan, are not in
  it. The whole-process peak (ru_maxrss) is recorded beside it. ``final/`` is not exported (nothing
  is measured after the steps).
* The process baseline (python + torch + transformers + DeepSpeed + gloo, the tokenizer, the data,
  allocator caches) is what a run of the same setting with the *tiny* model (≈30k parameters, whose
  planned memory is under 1 MiB) holds at its peak. The memory attributed to a model is
  measured(small) − measured(tiny), set against planned(small) − planned(tiny). The import-only
  resident size (the worker's RSS after importing everything, before the trainer starts) is
  reported too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# The small student: tens of millions of parameters, the vocabulary wide enough that the LM-head
# terms (embedding, head, kernels' dW) are a real share, as in LLMs.
SMALL = dict(vocab_size=32768, hidden_size=512, layers=6, heads=8, kv_heads=4, intermediate_size=1536)
TINY = dict(vocab_size=None, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=96)
MAX_LENGTH, PROMPT_LENGTH, MICRO_BATCH, STEPS = 128, 16, 2, 2
# (ranks, ZeRO stage, activation checkpointing)
# Each of 1 and 2 ranks, ZeRO 0, 2 and 3, checkpointing off and on, in as few runs as the shared
# 2-core machine allows (a run is a minute or two there).
CASES = [(1, 0, False), (1, 0, True), (2, 0, False), (2, 2, False), (2, 3, False), (2, 3, True)]
QUICK_CASES = [(1, 0, False), (2, 3, False)]


# --- the worker: one rank of a measured run -------------------------------------------------------------------

def _vm_hwm_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _vm_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(config_path: str, out_prefix: str) -> int:
    import deepspeed  # noqa: F401  (imported before measuring the import baseline)
    import transformers  # noqa: F401

    from fastdadpo.base.collectives import barrier, teardown
    from fastdadpo.commands import train as trainer
    from fastdadpo.commands.config import load_config
    from fastdadpo.engine.deepspeed.engine import DeepSpeedStudent
    from fastdadpo.engine.fsdp2.engine import FSDP2Student

    record = {"rank": int(os.environ.get("RANK", 0)), "import_rss_bytes": _vm_rss_bytes()}
    original_step = trainer.Trainer._optimizer_step

    def measured_step(self, step, stop):
        if "reset" not in record:
            record["setup_peak_bytes"] = _vm_hwm_bytes()
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                    handle.write("5")
                record["reset"] = "VmHWM reset before the first step"
            except OSError as exc:
                record["reset"] = f"could not reset VmHWM ({exc}): the peak includes setup"
        return original_step(self, step, stop)

    def no_export(student, tokenizer, output_dir, *args, **kwargs):
        record["steps_peak_bytes"] = _vm_hwm_bytes()
        return os.path.join(output_dir, "final (not exported by bench/plan_check.py)")

    trainer.Trainer._optimizer_step = measured_step
    DeepSpeedStudent.export = FSDP2Student.export = no_export
    try:
        trainer.train(load_config(config_path))
        barrier()
    finally:
        teardown()
    record["process_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(f"{out_prefix}.rank{record['rank']}.json", "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    return 0


# --- the driver ------------------------------------------------------------------------------------------------

def build_world(root: str) -> dict:
    """Offline: the synthetic tokenizer, the tiny and the small student, and preference pairs long
    enough that every sequence is cut to MAX_LENGTH (short prompts, long responses), so that the
    planner's worst case (every sequence max_length tokens, nearly all of them response tokens) is
    what the runs really hold."""
    from fastdadpo.demo.synthetic import WORDS, build_tokenizer, save_model_dir, task_corpus, tiny_causal_lm

    tokenizer = build_tokenizer(task_corpus(400, seed=0), vocab_size=320)
    paths = {}
    for name, shape in (("tiny", TINY), ("small", SMALL)):
        shape = dict(shape)
        vocab = shape.pop("vocab_size") or len(tokenizer)
        model = tiny_causal_lm(vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               hidden_size=shape["hidden_size"], layers=shape["layers"], heads=shape["heads"],
                               kv_heads=shape["kv_heads"], intermediate_size=shape["intermediate_size"],
                               max_positions=MAX_LENGTH * 2, seed=1)
        paths[name] = save_model_dir(model, tokenizer, os.path.join(root, name))
        paths[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        del model
    rng = random.Random(0)
    rows = [{"prompt": "Repeat: " + " ".join(rng.sample(WORDS, 3)),
             "chosen": " ".join(rng.choice(WORDS) for _ in range(MAX_LENGTH)),
             "rejected": " ".join(rng.choice(WORDS) for _ in range(MAX_LENGTH))} for _ in range(16)]
    paths["train"] = os.path.join(root, "train.jsonl")
    with open(paths["train"], "w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def write_config(root: str, world: dict, model: str, ranks: int, stage: int, checkpointing: bool) -> str:
    import yaml

    name = f"{model}-r{ranks}-z{stage}{'-ckpt' if checkpointing else ''}"
    config = {
        "model": {"student": world[model], "dtype": "fp32"},
        "data": {"train": world["train"], "max_length": MAX_LENGTH, "max_prompt_length": PROMPT_LENGTH,
                 "cache_dir": os.path.join(root, "cache")},
        "objective": {"name": "dpo"},
        "train": {"micro_batch_size": MICRO_BATCH, "grad_accum": 1, "lr": 1e-4, "max_steps": STEPS,
                  "warmup_ratio": 0.0, "output_dir": os.path.join(root, "runs", name), "seed": 3,
                  "gradient_checkpointing": checkpointing},
        **({"engine": "fsdp2"} if stage == "fsdp2" else {"deepspeed": {"zero_stage": stage}}),
    }
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(config: str, ranks: int, out_prefix: str) -> dict:
    # A fixed mmap threshold: glibc then serves every allocation of 128 KiB or more with its own
    # mapping and returns it to the kernel when freed, so RSS follows the live tensors (as
    # max_memory_allocated does on a GPU) instead of what the heap kept from freed ones (glibc's
    # default raises the threshold up to 32 MiB after frees and keeps the pages).
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="131072")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", os.path.abspath(__file__), "--worker",
               config, out_prefix]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    records = []
    for rank in range(ranks):
        with open(f"{out_prefix}.rank{rank}.json", encoding="utf-8") as handle:
            records.append(json.load(handle))
    headline = next((line.split("[fastdadpo] ", 1)[1] for line in result.stdout.splitlines()
                     if line.startswith("[fastdadpo] plan:")), "")
    return {"ranks": records, "seconds": time.perf_counter() - started, "headline": headline}


def planned(config_path: str, ranks: int) -> dict:
    from fastdadpo.commands.config import load_config
    from fastdadpo.commands.plan import make_report

    report = make_report(load_config(config_path), config_path=config_path, gpus=ranks, nodes=1, memory_gb=1e6,
                         device="cpu")
    return {"peak": report.plan.peak_bytes, "phase": report.plan.peak_phase,
            "terms": {t.name: t.bytes for t in report.plan.terms}}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def render(rows: list, world: dict, command: str, load: str, seconds: float) -> str:

    lines = [
        "# `fastdadpo plan --device cpu` against measured peak memory (CPU, host memory)",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min wall).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; shared with other "
        f"agents while it ran (load average {load}), which changes times, not memory.",
        "",
        f"Students: the tiny Qwen2 ({world['tiny_params']:,} parameters: the baseline) and a small Qwen2 "
        f"({world['small_params'] / 1e6:.1f}M parameters: hidden {SMALL['hidden_size']}, {SMALL['layers']} layers, "
        f"{SMALL['heads']} heads ({SMALL['kv_heads']} KV), MLP {SMALL['intermediate_size']}, vocabulary "
        f"{SMALL['vocab_size']:,}); objective dpo (chosen + rejected), fp32, micro-batch {MICRO_BATCH}, every sequence "
        f"{MAX_LENGTH} tokens, {STEPS} optimizer steps, torch AdamW.",
        "",
        "Measured: per rank, the peak RSS over the training steps (VmHWM reset before the first step), minus the same "
        "figure of the tiny-model run of the same setting (the process baseline: python, torch, transformers, "
        "DeepSpeed, gloo, tokenizer, data). Planned: `fastdadpo plan --device cpu` of the small config minus that of "
        "the tiny one (under 1 MiB). Error = (planned − measured) / measured.",
        "",
        "| ranks | ZeRO | checkpointing | rank | baseline MiB (tiny run) | small run MiB | measured MiB | planned MiB | "
        "error | planned peak phase | whole-process peak MiB (setup included) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for rank, (tiny, small) in enumerate(zip(row["tiny"]["ranks"], row["small"]["ranks"])):
            measured = small["steps_peak_bytes"] - tiny["steps_peak_bytes"]
            plan_bytes = row["planned_small"]["peak"] - row["planned_tiny"]["peak"]
            error = (plan_bytes - measured) / measured if measured > 0 else float("nan")
            row.setdefault("errors", []).append(error)
            lines.append(f"| {row['ranks']} | {row['stage']} | {'on' if row['checkpointing'] else 'off'} | {rank} | "
                         f"{_mib(tiny['steps_peak_bytes'])} | {_mib(small['steps_peak_bytes'])} | {_mib(measured)} | "
                         f"{_mib(plan_bytes)} | {error:+.1%} | {row['planned_small']['phase']} | "
                         f"{_mib(small['process_peak_bytes'])} |")
    imports = [r["import_rss_bytes"] for row in rows for r in row["tiny"]["ranks"]]
    lines += ["", f"Import-only resident size of a worker (python + torch + transformers + DeepSpeed, before the "
                  f"trainer starts): {_mib(min(imports))}–{_mib(max(imports))} MiB.", "",
              "Planned terms of the small student (MiB per rank):", "",
              "| ranks | ZeRO | checkpointing | " + " | ".join(rows[0]["planned_small"]["terms"]) + " |",
              "|---|---|---|" + "---|" * len(rows[0]["planned_small"]["terms"])]
    for row in rows:
        lines.append(f"| {row['ranks']} | {row['stage']} | {'on' if row['checkpointing'] else 'off'} | "
                     + " | ".join(_mib(v) for v in row["planned_small"]["terms"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT_PREFIX"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "plan-vs-measured.md"))
    parser.add_argument("--json", default=None, help="also write the raw figures here (default: beside --out)")
    parser.add_argument("--root", default=None, help="working directory (default: a fresh temporary one)")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_CASES}")
    parser.add_argument("--cases", default=None, help="RANKS,STAGE,CKPT;... (e.g. 1,0,0;2,3,1; STAGE fsdp2: "
                                                      "engine fsdp2): only these")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    import tempfile

    started = time.perf_counter()
    root = args.root or tempfile.mkdtemp(prefix="plan_check_")
    world = build_world(root)
    rows, measured_runs = [], {}
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        cases = [case.split(",") for case in args.cases.split(";")]
        cases = [(int(r), z if z == "fsdp2" else int(z), bool(int(c))) for r, z, c in cases]
    for ranks, stage, checkpointing in cases:
        row = {"ranks": ranks, "stage": stage, "checkpointing": checkpointing}
        for model in ("tiny", "small"):
            # The tiny baseline once per (ranks, stage): checkpointing moves its peak by well under 1 MiB.
            config = write_config(root, world, model, ranks, stage, checkpointing and model == "small")
            key = (model, ranks, stage, checkpointing and model == "small")
            if key not in measured_runs:
                measured_runs[key] = measure(config, ranks, os.path.join(root, os.path.basename(config)[:-5]))
            row[model] = measured_runs[key]
            row[f"planned_{model}"] = planned(config, ranks)
        print(f"ranks {ranks} ZeRO {stage} checkpointing {checkpointing}: "
              + ", ".join(f"rank {r['rank']} {_mib(s['steps_peak_bytes'] - r['steps_peak_bytes'])} MiB measured"
                          for r, s in zip(row["tiny"]["ranks"], row["small"]["ranks"]))
              + f", {_mib(row['planned_small']['peak'] - row['planned_tiny']['peak'])} MiB planned "
              f"({row['small']['seconds']:.0f} s)", flush=True)
        rows.append(row)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python bench/plan_check.py" + (" --quick" if args.quick else "") + \
        (f" --cases '{args.cases}'" if args.cases else "")
    text = render(rows, world, command, load, time.perf_counter() - started)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)
    with open(args.json or os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as handle:
        json.dump({"rows": rows, "world": {k: v for k, v in world.items() if k.endswith("_params")},
                   "command": command, "load_average": load}, handle, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
