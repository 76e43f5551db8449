"""The peer-trainer results JSON (bench/test_peer_trainers.py) -> a Markdown table and a plot.

    python bench/peers_report.py bench/results/cpu-peers.json --out bench/results/ [--note TEXT]

Writes ``<out>/<name>.md`` (default name: the JSON's stem): per trainer at the reference
micro-batch, its peak RSS, step time, tokens/s and first-step metrics, the ratios of ours to each
TRL trainer of the same group (< 1: ours is smaller or faster), the sweep and the largest
micro-batch under the memory budget; and ``<out>/<name with _ for ->.png``: peak memory and step
time against the micro-batch, ours against TRL, one row per group (DPO, distillation).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import EMPTY, load, machine_section, ratio, seconds, size_bytes, table  # noqa: E402

GROUPS = {"dpo": "DPO (TRL DPOTrainer; fastdadpo dpo, and dadpo beside it)",
          "kd": "Distillation, forward KL (TRL GKDTrainer offline and DistillationTrainer; fastdadpo kd, and "
                "dadpo_token beside it)"}


def _group(bench: dict) -> str:
    return "dpo" if bench["extra_info"]["objective"] in ("dpo", "dadpo") else "kd"


def _number(value: Optional[float], digits: int = 6) -> str:
    return EMPTY if value is None else f"{value:.{digits}g}"


def _ours(bench: dict) -> bool:
    return bench["extra_info"]["trainer"] == "ours"


def _largest(info: dict) -> str:
    if len(info["search"]) < 2:
        return "not swept"
    if info["sweep_stopped"] == "over the memory budget":
        return str(info["largest_micro_batch"])
    return f"≥ {info['largest_micro_batch']} ({info['sweep_stopped']})"


def reference_section(benchmarks: List[dict], group: str) -> List[str]:
    rows = [b for b in benchmarks if _group(b) == group]
    theirs = [b for b in rows if not _ours(b)]
    header = ["trainer", "ZeRO", "reference / teacher", "peak RSS", "step time", "tokens/s", "first loss",
              "first logps/chosen", "first grad norm", "largest micro-batch ≤ budget"]
    header += [f"{kind} vs {b['extra_info']['implementation']}" for b in theirs for kind in ("memory", "time")]
    body = []
    for bench in rows:
        info = bench["extra_info"]
        first = info["first_step"]
        cells = [info["implementation"], EMPTY if info["zero_stage"] is None else str(info["zero_stage"]),
                 info["reference_handling"], size_bytes(info["peak_memory_bytes"]), seconds(info["step_seconds"]),
                 _number(info["tokens_per_s"], 4), _number(first.get("loss")), _number(first.get("logps/chosen")),
                 _number(first.get("grad_norm")),
                 _largest(info)]
        for other in theirs:
            peer = other["extra_info"]
            cells += ([ratio(info["peak_memory_bytes"], peer["peak_memory_bytes"]),
                       ratio(info["step_seconds"], peer["step_seconds"])] if _ours(bench) else [EMPTY, EMPTY])
        body.append(cells)
    info = rows[0]["extra_info"] if rows else {}
    return ([f"### {GROUPS[group]}", "",
             f"Micro-batch {info.get('micro_batch_size')} ({'pairs' if group == 'dpo' else 'sequences'}), "
             f"{info.get('steps')} steps, step time = median after the first step; memory budget "
             f"{size_bytes(info.get('memory_budget_bytes'))}.", ""]
            + table(header, body) + [""])


def sweep_section(benchmarks: List[dict]) -> List[str]:
    swept = [b for b in benchmarks if len(b["extra_info"]["search"]) > 1]
    sizes = sorted({run["micro_batch_size"] for b in swept for run in b["extra_info"]["search"]})
    body = []
    for bench in swept:
        by_size = {run["micro_batch_size"]: run for run in bench["extra_info"]["search"]}
        cells = [bench["extra_info"]["implementation"]]
        for size in sizes:
            run = by_size.get(size)
            if run is None:
                cells.append(EMPTY)
            elif not run["fits"]:
                cells.append(f"over budget ({size_bytes(run['peak_rss_bytes'])}"
                             f"{', killed' if run['over_budget'] else ''})")
            else:
                cells.append(f"{size_bytes(run['peak_rss_bytes'])} / {seconds(run['step_seconds'])}")
        body.append(cells + [bench["extra_info"]["sweep_stopped"]])
    return (["## Micro-batch sweep (peak RSS / step time)", ""]
            + table(["trainer"] + [str(size) for size in sizes] + ["stopped"], body) + [""])


def steps_section(benchmarks: List[dict]) -> List[str]:
    """How far runs of the same math agree at every step (the test checks the first only)."""
    lines = ["## Agreement step by step (the benchmark fails on the first step beyond tolerance)", ""]
    for math in ("dpo", "kd"):
        rows = [b for b in benchmarks if b["extra_info"]["math"] == math]
        if len(rows) < 2:
            continue
        steps = min(len(b["extra_info"]["all_steps"]) for b in rows)
        for key in ("loss", "grad_norm"):
            worst = 0.0
            for step in range(steps):
                values = [b["extra_info"]["all_steps"][step].get(key) for b in rows]
                values = [v for v in values if v is not None]
                if len(values) > 1:
                    worst = max(worst, (max(values) - min(values)) / max(abs(min(values)), 1e-12))
            lines.append(f"- {math}, {key}: largest relative spread over {len(rows)} runs and {steps} steps "
                         f"{worst:.2e}")
    return lines + [""]


def plot(benchmarks: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    swept = [b for b in benchmarks if len(b["extra_info"]["search"]) > 1]
    if not swept:
        return None
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for row, group in enumerate(("dpo", "kd")):
        for bench in (b for b in swept if _group(b) == group):
            info = bench["extra_info"]
            runs = [run for run in info["search"] if run["fits"]]
            style = "-o" if _ours(bench) else "--s"
            sizes = [run["micro_batch_size"] for run in runs]
            axes[row][0].plot(sizes, [run["peak_rss_bytes"] / 2**30 for run in runs], style,
                              label=info["implementation"])
            timed = [run for run in runs if run["step_seconds"]]
            axes[row][1].plot([run["micro_batch_size"] for run in timed], [run["step_seconds"] for run in timed],
                              style, label=info["implementation"])
            budget = info["memory_budget_bytes"] / 2**30
        axes[row][0].axhline(budget, color="grey", linewidth=0.8, linestyle=":", label="memory budget")
        for column, label in enumerate(("peak RSS (GiB)", "step time (s)")):
            axis = axes[row][column]
            axis.set_xscale("log", base=2)
            if column == 1:  # TRL's DPO step is many times ours: a log axis keeps both readable
                axis.set_yscale("log")
            axis.set_xlabel("micro-batch (pairs)" if group == "dpo" else "micro-batch (sequences)")
            axis.set_ylabel(label)
            axis.set_title(f"{'DPO' if group == 'dpo' else 'forward-KL distillation'}: {label.split(' (')[0]}")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7)
    vocab = swept[0]["extra_info"]["vocab"]
    figure.suptitle(f"fastdadpo train vs TRL, tiny Qwen2 (V={vocab:,}), fp32, CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default=None)
    parser.add_argument("--note", default="", help="a line about the conditions (e.g. a shared machine)")
    args = parser.parse_args(argv)
    benchmarks, runs = load([args.json])
    benchmarks = [b for b in benchmarks if b["extra_info"].get("case") == "peer_trainer"]
    if not benchmarks:
        print(f"{args.json}: no peer-trainer benchmarks", file=sys.stderr)
        return 1
    name = args.name or os.path.splitext(os.path.basename(args.json))[0]
    os.makedirs(args.out, exist_ok=True)
    image = plot(benchmarks, os.path.join(args.out, name.replace("-", "_") + ".png"))
    info = benchmarks[0]["extra_info"]
    versions: Dict[str, str] = info["versions"]
    lines = [f"# fastdadpo train vs TRL's trainers ({args.json})", "",
             f"Tiny Qwen2 models built offline (student hidden {info['student_hidden']}, teacher "
             f"{info['teacher_hidden']}, {info['layers']} layers) with V={info['vocab']:,} and a tokenizer that fills "
             f"the head; {info['dtype']}, lr {info['lr']}, {info['optimizer']}, β {info['beta']}, max length "
             f"{info['max_length']}; every step on the same batch; one process per run. "
             + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    if args.note:
        lines += [args.note, ""]
    for group in ("dpo", "kd"):
        lines += reference_section(benchmarks, group)
    lines += sweep_section(benchmarks) + steps_section(benchmarks)
    if image:
        lines += [f"![peak memory and step time]({os.path.basename(image)})", ""]
    lines += machine_section(runs, [info["memory_method"]])
    path = os.path.join(args.out, f"{name}.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    print(path + (f", {image}" if image else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
