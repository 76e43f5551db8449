"""Results JSON (pytest-benchmark's --benchmark-json) -> a Markdown table and PNG plots.

    python bench/report.py bench/results/cpu.json [bench/results/gpu.json ...] --out bench/results/

Writes ``<out>/<name>.md`` (``--name``, default: the first JSON's stem) with, per kernel case, each
implementation's time and peak memory and the ratios ours/implementation (ours = fastdadpo with
the gradient hint; < 1 means ours is faster or smaller), the train-step comparison, the machine and
the exact command; and ``<out>/<name>_<case>.png``: time and peak memory against tokens, one
column per vocabulary. Sizes that did not run (GPU sizes on a CPU machine) are listed with empty cells.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.registry import CASES, IMPLEMENTATIONS, REFERENCE_IMPLEMENTATION, SIZES, cases_for  # noqa: E402

EMPTY = ""


def load(paths: List[str]) -> Tuple[List[dict], List[dict]]:
    """(benchmarks, runs): every benchmark with its run's metadata; one entry per JSON file."""
    benchmarks, runs = [], []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        run = {"path": path, "machine": data.get("machine_info", {}), "commit": data.get("commit_info", {}),
               "datetime": data.get("datetime"), "fastdadpo": data.get("fastdadpo", {})}
        runs.append(run)
        for bench in data.get("benchmarks", []):
            if "case" in bench.get("extra_info", {}):
                benchmarks.append(dict(bench, run=run))
    return benchmarks, runs


# --- formatting --------------------------------------------------------------------------------------------

def seconds(value: Optional[float]) -> str:
    if value is None:
        return EMPTY
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def size_bytes(value: Optional[float]) -> str:
    if value is None:
        return EMPTY
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def ratio(ours: Optional[float], theirs: Optional[float]) -> str:
    if ours is None or not theirs:
        return EMPTY
    return f"{ours / theirs:.2f}"


def table(header: List[str], rows: List[List[str]]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


# --- kernels -----------------------------------------------------------------------------------------------

def kernel_index(benchmarks: List[dict]) -> Dict[Tuple[str, str, int], Dict[str, dict]]:
    """(case, size, tokens) -> implementation -> benchmark."""
    index: Dict[Tuple[str, str, int], Dict[str, dict]] = defaultdict(dict)
    for bench in benchmarks:
        info = bench["extra_info"]
        if info["case"] in CASES:
            index[(info["case"], info["size"], info["tokens"])][info["implementation"]] = bench
    return index


def _mean(bench: Optional[dict]) -> Optional[float]:
    return bench["stats"]["mean"] if bench else None


def _peak(bench: Optional[dict]) -> Optional[float]:
    return bench["extra_info"].get("peak_memory_bytes") if bench else None


def kernel_section(index) -> List[str]:
    lines = ["## Kernels (forward + backward)", "",
             f"ours = {IMPLEMENTATIONS[REFERENCE_IMPLEMENTATION].label}; "
             "ratios are ours / implementation: below 1, ours is faster or smaller. Time: mean over the timed "
             "rounds. Peak memory: above the inputs (see the machine notes for how it was measured). "
             "GPU sizes without a GPU run stay empty: they are never estimated from CPU figures.", ""]
    header = ["size", "tokens", "V", "H student/teacher", "dtype", "implementation", "time", "± std", "peak memory",
              "time ours/impl", "memory ours/impl"]
    for case in CASES.values():
        rows = []
        for size in SIZES.values():
            if case not in cases_for(size):
                continue
            for tokens in size.tokens:
                found = index.get((case.name, size.name, tokens))
                shape = [size.name, str(tokens), f"{size.vocab:,}", f"{size.student_hidden}/{size.teacher_hidden}",
                         str(size.dtype).replace("torch.", "")]
                if not found:
                    if size.device == "cuda":  # GPU sizes stay in the table, empty, until a GPU run fills them
                        rows.append(shape + ["not run (needs CUDA)"] + [EMPTY] * (len(header) - len(shape) - 1))
                    continue
                ours = found.get(REFERENCE_IMPLEMENTATION)
                for name, implementation in IMPLEMENTATIONS.items():
                    bench = found.get(name)
                    if bench is None:
                        continue
                    label = implementation.label if name != "cce" else bench["extra_info"].get("detail", name)
                    rows.append(shape + [label, seconds(_mean(bench)), seconds(bench["stats"]["stddev"]),
                                         size_bytes(_peak(bench)),
                                         EMPTY if name == REFERENCE_IMPLEMENTATION else ratio(_mean(ours), _mean(bench)),
                                         EMPTY if name == REFERENCE_IMPLEMENTATION else ratio(_peak(ours), _peak(bench))])
        if rows:
            lines += [f"### {case.name}: {case.loss}", ""] + table(header, rows) + [""]
    return lines


def plot_kernels(index, out_dir: str, prefix: str) -> List[str]:
    """One PNG per case with a token sweep: time and peak memory against tokens, per vocabulary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for case in CASES.values():
        # vocab -> implementation -> [(tokens, time, peak)]
        series: Dict[int, Dict[str, List[Tuple[int, float, Optional[float]]]]] = defaultdict(lambda: defaultdict(list))
        for (case_name, size_name, tokens), found in index.items():
            if case_name != case.name:
                continue
            for name, bench in found.items():
                series[SIZES[size_name].vocab][name].append((tokens, _mean(bench), _peak(bench)))
        vocabularies = sorted(v for v, by_impl in series.items()
                              if max(len({t for t, _, _ in points}) for points in by_impl.values()) >= 2)
        if not vocabularies:
            continue
        figure, axes = plt.subplots(2, len(vocabularies), figsize=(5.5 * len(vocabularies), 8), squeeze=False)
        for column, vocab in enumerate(vocabularies):
            for name in IMPLEMENTATIONS:
                points = sorted(series[vocab].get(name, []))
                if not points:
                    continue
                tokens = [p[0] for p in points]
                style = dict(marker="o", label=IMPLEMENTATIONS[name].label,
                             linewidth=2.5 if IMPLEMENTATIONS[name].ours else 1.5,
                             linestyle="--" if name == "fastdadpo-no-hint" else "-")  # it overlaps ours in memory
                axes[0][column].plot(tokens, [p[1] for p in points], **style)
                axes[1][column].plot(tokens, [(p[2] or 0) / 2**20 for p in points], **style)
            axes[0][column].set_title(f"{case.name}, V={vocab:,}")
            axes[0][column].set_ylabel("time, forward + backward (s)")
            axes[1][column].set_ylabel("peak memory above inputs (MiB)")
            for row in (0, 1):
                axes[row][column].set_xlabel("tokens")
                axes[row][column].grid(alpha=0.3)
                axes[row][column].set_ylim(bottom=0)
        axes[0][0].legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(out_dir, f"{prefix}_{case.name}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


# --- train step ----------------------------------------------------------------------------------------------

def train_section(benchmarks: List[dict]) -> List[str]:
    runs = {b["extra_info"]["implementation"]: b for b in benchmarks if b["extra_info"]["case"] == "train_step"}
    if not runs:
        return []
    any_info = next(iter(runs.values()))["extra_info"]
    budget = any_info.get("memory_budget_bytes")
    lines = ["## Train step: `fastdadpo train`, fused kernels against materialized logits", "",
             f"Objective `{any_info['objective']}`, DeepSpeed ZeRO-3, one rank on {any_info['device']}; tiny Qwen2 "
             f"models (student hidden {any_info['student_hidden']}, teacher {any_info['teacher_hidden']}) with "
             f"V={any_info['vocab']:,}, so the LM-head losses dominate. tokens/s: median over the steps after the "
             f"first, at micro-batch {any_info['micro_batch_size']}. Peak memory: {any_info['memory_method']}. "
             + (f"A micro-batch fits if the run's peak stays within {size_bytes(budget)}; " if budget else
                "A micro-batch fits if the run does not run out of GPU memory; ")
             + f"micro-batches double from 1 up to {any_info['micro_batch_cap']}.", ""]
    header = ["kernels", "FASTDADPO_KERNEL_BACKEND", "tokens/s", "peak memory", "largest micro-batch that fits",
              "run time (timed)", "first-step loss"]
    rows = []
    for name in ("fused", "naive"):
        bench = runs.get(name)
        if bench is None:
            continue
        info = bench["extra_info"]
        largest = str(info["largest_micro_batch"]) + (" (the cap)" if info.get("largest_micro_batch_capped") else "")
        tokens_per_s = info.get("tokens_per_s")
        rows.append([name, info["kernel_backend"], f"{tokens_per_s:,.0f}" if tokens_per_s else EMPTY,
                     size_bytes(info.get("peak_memory_bytes")), largest, seconds(bench["stats"]["mean"]),
                     f"{info.get('first_step_loss'):.6f}" if info.get("first_step_loss") is not None else EMPTY])
    lines += table(header, rows) + [""]
    if "fused" in runs and "naive" in runs:
        fused, naive = runs["fused"]["extra_info"], runs["naive"]["extra_info"]
        lines += [f"fused / naive: tokens/s {ratio(fused.get('tokens_per_s'), naive.get('tokens_per_s'))} "
                  f"(above 1: fused faster), peak memory "
                  f"{ratio(fused.get('peak_memory_bytes'), naive.get('peak_memory_bytes'))} (below 1: fused smaller).",
                  ""]
        probes = []
        for name in ("fused", "naive"):
            for probe in runs[name]["extra_info"].get("search", []):
                tokens_per_s = probe.get("tokens_per_s")
                probes.append([name, str(probe["micro_batch_size"]), f"{tokens_per_s:,.0f}" if tokens_per_s else EMPTY,
                               size_bytes(probe.get("peak_memory_bytes")), "yes" if probe["fits"] else "no"])
        lines += ["Micro-batch search:", ""] + table(["kernels", "micro-batch", "tokens/s", "peak memory", "fits"],
                                                     probes) + [""]
    return lines


# --- the run ---------------------------------------------------------------------------------------------------

def machine_section(runs: List[dict], memory_methods: List[str]) -> List[str]:
    lines = ["## Machine and command", ""]
    for run in runs:
        described = run["machine"].get("fastdadpo", {})
        versions = ", ".join(f"{k} {v}" for k, v in described.get("versions", {}).items())
        commit = run["commit"]
        settings = run["fastdadpo"].get("settings", {})
        lines += [f"- `{run['path']}` ({run['datetime']}, commit {commit.get('id', '?')[:10]}"
                  f"{' + uncommitted changes' if commit.get('dirty') else ''})",
                  f"  - CPU: {described.get('cpu_model', run['machine'].get('cpu', {}).get('brand_raw', '?'))}, "
                  f"{described.get('cpu_cores')} cores ({described.get('torch_threads')} torch threads), "
                  f"{described.get('memory_gib')} GiB; GPU: {described.get('gpu') or 'none'}",
                  f"  - {versions}",
                  f"  - settings: {json.dumps(settings)}",
                  f"  - command: `{run['fastdadpo'].get('command', '?')}`"]
    if memory_methods:
        lines += ["", "Peak memory measured as: " + "; ".join(memory_methods) + "."]
    return lines + [""]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    parser.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    parser.add_argument("--name", default=None, help="output name (default: the first JSON's stem)")
    parser.add_argument("--note", default=None, help="a line to put under the title (e.g. machine load)")
    args = parser.parse_args(argv)
    benchmarks, runs = load(args.results)
    name = args.name or os.path.splitext(os.path.basename(args.results[0]))[0]
    os.makedirs(args.out, exist_ok=True)
    memory_methods = sorted({b["extra_info"]["memory_method"] for b in benchmarks
                             if b["extra_info"].get("memory_method")})
    index = kernel_index(benchmarks)
    plots = plot_kernels(index, args.out, name)
    lines = [f"# fastdadpo benchmarks: {name}", ""]
    if args.note:
        lines += [args.note, ""]
    lines += machine_section(runs, memory_methods) + kernel_section(index) + train_section(benchmarks)
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    path = os.path.join(args.out, f"{name}.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    print(f"wrote {path}" + "".join(f", {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
