"""Results JSON (pytest-benchmark's --benchmark-json) -> a Markdown table and PNG plots.

    python bench/report.py bench/results/cpu.json [bench/results/gpu.json ...] --out bench/results/

Writes ``<out>/<name>.md`` (``--name``, default: the first JSON's stem) with, per kernel case, each
implementation's time and peak memory and the ratios ours/implementation (ours = fastdadpo with
reduced in the call (`weights=`); < 1 means ours is faster or smaller), the train-step comparison, the machine and
the exact command; and ``<out>/<name>_<case>.png``: time and peak memory against tokens, one
column per vocabulary. Sizes that did not run (GPU sizes on a CPU machine) are listed with empty cells.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
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


# --- roofline model --------------------------------------------------------------------------------------------

# The floor a design cannot beat on an H100/H200: its matmul FLOPs at the bf16 rate these machines
# sustain, or its HBM traffic at their bandwidth, whichever is longer. A model, not a measurement.
PEAK_FLOPS = 790e12  # bf16 dense tensor-core FLOP/s sustained by cuBLAS on an H100/H200
PEAK_BYTES = 4.8e12  # HBM3e bytes/s (H200; an H100 SXM has 3.35e12)


@dataclass(frozen=True)
class Shape:
    """One kernel call: N tokens, vocabulary V, student / frozen hidden sizes, element bytes.
    ``frozen`` is the number of frozen heads swept (teacher; teacher and reference for ADPA's
    advantage; none for log-probs), all of hidden size ``ht``."""

    n: int
    v: int
    hs: int
    ht: int
    frozen: int
    elem: int  # bytes per element of the inputs (2 for bf16)

    @property
    def f(self) -> float:  # FLOPs of one [N, H] x [H, V] GEMM per unit of H: F = 2·N·V
        return 2.0 * self.n * self.v

    @property
    def hf(self) -> int:  # summed hidden size of the frozen heads
        return self.frozen * self.ht

    @property
    def student_head(self) -> float:
        return self.v * self.hs * self.elem

    @property
    def frozen_heads(self) -> float:
        return self.v * self.hf * self.elem

    @property
    def rows(self) -> float:  # every hidden state, student and frozen
        return self.n * (self.hs + self.hf) * self.elem


def _formula(shape: Shape, student: int, frozen: int) -> str:
    """"F·(a·Hs + b·Ht)" for this shape (b counts every frozen head: ADPA's teacher and reference)."""
    b = frozen * shape.frozen
    terms = [f"{student}·Hs"] + ([f"{'' if b == 1 else f'{b}·'}Ht"] if b else [])
    return f"F·({' + '.join(terms)})" if b else f"F·{terms[0]}"


def _chunks(shape: Shape, rows_per_chunk: int) -> int:
    return -(-shape.n // max(1, min(shape.n, rows_per_chunk)))


def _ours_plan(shape: Shape, kind: str, with_logps: bool):
    """Our chunked backend's plan at its default budget (None without a chunked backend in this tree)."""
    try:
        import torch

        from fastdadpo.kernels import chunk_plan, chunked_backend
        from fastdadpo.kernels.sweep import SweepSpec
    except ImportError:
        return None
    spec = SweepSpec(kind=kind, vocab_size=shape.v if kind != "none" else 0, with_logps=with_logps)
    return chunk_plan.plan_chunks(spec, shape.n, shape.v, shape.hs, chunk_plan.budget_bytes(None),
                                       input_dtype=torch.bfloat16 if shape.elem == 2 else torch.float32)


def _chunked_bytes(shape: Shape, chunks: int, logit_elem: int, grad_elem: int, passes: int,
                   acc_elem: Optional[int] = None) -> float:
    """A row-chunked design: per chunk, a GEMM per head writes its logits (re-reading that head),
    one row-wise pass reads them and writes the gradient over the student's, and the two gradient
    GEMMs read it (dh = G·W re-reads the student head; dW += Gᵀ·X reads and writes dW).
    ``passes``: 1 when the gradient is formed in the forward, 2 when the backward recomputes.
    ``acc_elem``: bytes per element of the dW and dh accumulators (default ``grad_elem``)."""
    acc_elem = grad_elem if acc_elem is None else acc_elem
    heads = 1 + shape.frozen
    nv = shape.n * shape.v
    logits = passes * nv * logit_elem * 2 * heads + nv * grad_elem * 3
    weights = chunks * (passes * (shape.student_head + shape.frozen_heads) + shape.student_head
                        + 2 * shape.v * shape.hs * acc_elem)
    hidden = passes * shape.rows + 2 * shape.n * shape.hs * acc_elem
    return logits + weights + hidden


def _tile_fused_bytes(shape: Shape, passes: int) -> float:
    """Tile-fused kernels: logits never leave the chip; every operand read once per pass (a lower
    bound: tiles re-read across row blocks are assumed to hit L2), fp32 gradients written once.
    The backward's atomic adds (N·V·Hs·(1/BLOCK_N + 1/BLOCK_V), ~5e10 at Liger's config) go to
    L2 and are not counted here."""
    operands = shape.rows + shape.student_head + shape.frozen_heads
    return passes * operands + 4 * (shape.n + shape.v) * shape.hs


# implementation family -> (FLOPs in units of F·H, HBM bytes, why), per (shape, kind, with_logps, reduced).
# kind "none" = log-probs only; reduced = the loss reduced in the call (weights=: gradient formed in the forward).
def _model_chunked(shape, kind, with_logps, reduced):
    # Our chunked backend's own plan at its default budget (without one in this tree: 1,024-row chunks
    # whose accumulators are in the inputs' dtype).
    plan = _ours_plan(shape, kind, with_logps)
    chunks = _chunks(shape, 1024 if plan is None else plan.rows_per_chunk)
    accumulator_elem = shape.elem if plan is None else plan.grad_dtype.itemsize
    if reduced:
        flops = 3 * shape.hs + shape.hf
        why = "reduced: each head's logits once, gradient formed in the same sweep, two gradient GEMMs"
    else:
        flops = 4 * shape.hs + 2 * shape.hf
        why = "per token: the backward recomputes every head's logits (log-probs: the student's only)"
    return flops, _chunked_bytes(shape, chunks, 4, shape.elem, 1 if reduced else 2, accumulator_elem), \
        f"{_formula(shape, 3, 1) if reduced else _formula(shape, 4, 2)}: {why}; {chunks} chunks (its budget rule), " \
        "fp32 logits"


def _model_tile_fused(shape, kind, with_logps, reduced):
    passes = 2 if kind == "jsd" else 1  # JSD needs both normalizers before log m: a second forward pass
    flops = (passes + 1) * (shape.hs + shape.hf) + 2 * shape.hs
    text = _formula(shape, passes + 3, passes + 1)
    return flops, _tile_fused_bytes(shape, passes + 1), \
        f"{text}: forward sweep{'s' if passes == 2 else ''} and a backward that recomputes every head " \
        "(reduced outputs are not formed early), gradients through atomics"


def _model_naive(shape, kind, with_logps, reduced, compiled=False):
    heads = 1 + shape.frozen
    nv = shape.n * shape.v
    # fp32 logits (it upcasts); eager: per head the GEMM output, log_softmax (read, write), the
    # divergence's elementwise ops (~5 passes), and as many again in the student's backward;
    # compiled: one write per head, one fused read of all, the gradient written once, read twice.
    passes = (8 * heads + 8) if not compiled else (2 * heads + 3)
    flops = 3 * shape.hs + shape.hf
    return flops, nv * 4 * passes + shape.rows + shape.student_head + shape.frozen_heads, \
        f"{_formula(shape, 3, 1)}: autograd on materialized fp32 logits (~{'8 passes per head + 8' if not compiled else '2 per head + 3'} " \
        "over N×V); its GEMMs run in fp32 (inputs upcast), so the bf16 FLOP floor is out of its reach"


def _model_liger(shape, kind, with_logps, reduced):
    chunks = _chunks(shape, 1024)  # its fused-linear chunked losses' default chunk of rows
    return 3 * shape.hs + shape.hf, _chunked_bytes(shape, chunks, shape.elem, shape.elem, 1) + \
        2 * shape.n * shape.v * 4 * (1 + shape.frozen), \
        f"{_formula(shape, 3, 1)}: row chunks on cuBLAS, each chunk's gradient formed in its forward (torch.func), " \
        "logits in the input dtype upcast to fp32 once per head"


def _model_cce(shape, kind, with_logps, reduced):
    operands = shape.n * shape.hs * shape.elem + shape.student_head
    return 4 * shape.hs, 2 * operands + 2 * shape.elem * (shape.n + shape.v) * shape.hs, \
        "F·4·Hs: tiled log-sum-exp forward, backward recomputes the logits (an upper bound: its gradient " \
        "filter skips tiles)"


ROOFLINE_MODELS = {
    "chunked": _model_chunked,
    "tile-fused": _model_tile_fused,
    "naive": _model_naive,
    "naive-compiled": lambda *a: _model_naive(*a, compiled=True),
    "liger": _model_liger,
    "cce": _model_cce,
}


def design_of(implementation: str) -> Optional[str]:
    """Which design a bench implementation runs on a GPU (None: no model for it)."""
    if implementation.startswith("fastdadpo"):
        if "tile" in implementation or "triton" in implementation:
            return "tile-fused"
        import torch

        from bench import registry

        backend = registry.fastdadpo_backend(torch.device("cuda"))
        return "tile-fused" if backend == "triton" else "chunked"
    return implementation if implementation in ROOFLINE_MODELS else None


def design_roofline(design: str, case, size, tokens: int, reduced: bool) -> Tuple[float, float, float, str]:
    """(FLOPs, HBM bytes, floor seconds, why) of one design on one case and size."""
    frozen = 2 if case.family == "advantage" else 1 if case.needs_teacher else 0
    elem = 2 if str(size.dtype) in ("torch.bfloat16", "torch.float16") else 4
    shape = Shape(tokens, size.vocab, size.student_hidden, size.teacher_hidden, frozen, elem)
    kind = case.kind or ("advantage" if case.family == "advantage" else "none")
    with_logps = case.family in ("kd", "nll", "dpo")
    units, hbm, why = ROOFLINE_MODELS[design](shape, kind, with_logps, reduced and case.family != "dpo")
    flops = units * shape.f
    return flops, hbm, max(flops / PEAK_FLOPS, hbm / PEAK_BYTES), why


def roofline(case, size, tokens: int, implementation: str) -> Optional[Tuple[float, float, float, str]]:
    """The model of one bench implementation (None: no model for it). DPO is never reduced."""
    design = design_of(implementation)
    if design is None:
        return None
    return design_roofline(design, case, size, tokens, reduced="no-hint" not in implementation)


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


def _model_cells(case, size, tokens: int, implementation: str) -> List[str]:
    if size.device != "cuda":  # the roofline is an H100/H200 model: CPU sizes get none
        return [EMPTY] * 3
    model = roofline(case, size, tokens, implementation)
    if model is None:
        return [EMPTY] * 3
    flops, hbm, floor, _ = model
    return [f"{flops / 1e12:.1f} T", f"{hbm / 1e9:.1f} GB", seconds(floor)]


def kernel_section(index) -> List[str]:
    lines = ["## Kernels (forward + backward)", "",
             f"ours = {IMPLEMENTATIONS[REFERENCE_IMPLEMENTATION].label}; "
             "ratios are ours / implementation: below 1, ours is faster or smaller. Time: mean over the timed "
             "rounds. Peak memory: above the inputs (see the machine notes for how it was measured). "
             "GPU sizes without a GPU run stay empty: they are never estimated from CPU figures.", "",
             f"The last three columns are a **model, not a measurement** (GPU sizes only): each design's matmul "
             f"FLOPs and HBM bytes, and its floor time, the larger of FLOPs at {PEAK_FLOPS / 1e12:.0f} TFLOP/s "
             f"(bf16) and bytes at {PEAK_BYTES / 1e12:.1f} TB/s; see \"Roofline model\" below for each formula.", ""]
    header = ["size", "tokens", "V", "H student/teacher", "dtype", "implementation", "time", "± std", "peak memory",
              "time ours/impl", "memory ours/impl", "model FLOPs", "model HBM bytes", "model floor"]
    for case in CASES.values():
        rows = []
        for size in SIZES.values():
            if case not in cases_for(size):
                continue
            for tokens in size.tokens:
                found = index.get((case.name, size.name, tokens)) or {}
                shape = [size.name, str(tokens), f"{size.vocab:,}", f"{size.student_hidden}/{size.teacher_hidden}",
                         str(size.dtype).replace("torch.", "")]
                if not found and size.device != "cuda":
                    continue
                ours = found.get(REFERENCE_IMPLEMENTATION)
                for name, implementation in IMPLEMENTATIONS.items():
                    if case.family not in implementation.families:
                        continue
                    bench = found.get(name)
                    model = _model_cells(case, size, tokens, name)
                    if bench is None:
                        if size.device == "cuda":  # GPU sizes stay in the table, empty, until a GPU run fills them
                            rows.append(shape + [implementation.label, "not run (needs CUDA)"]
                                        + [EMPTY] * 4 + model)
                        continue
                    label = implementation.label if name != "cce" else bench["extra_info"].get("detail", name)
                    rows.append(shape + [label, seconds(_mean(bench)), seconds(bench["stats"]["stddev"]),
                                         size_bytes(_peak(bench)),
                                         EMPTY if name == REFERENCE_IMPLEMENTATION else ratio(_mean(ours), _mean(bench)),
                                         EMPTY if name == REFERENCE_IMPLEMENTATION else ratio(_peak(ours), _peak(bench))]
                                + model)
        if rows:
            lines += [f"### {case.name}: {case.loss}", ""] + table(header, rows) + [""]
    return lines + roofline_section()


def roofline_section() -> List[str]:
    """The model behind the roofline columns: one line per design, at Liger's config."""
    liger = SIZES.get("liger")
    lines = ["## Roofline model", "",
             "F = 2·N·V (one [N, H] x [H, V] GEMM per unit of H); Hs, Ht the student's and teacher's hidden "
             "sizes. HBM bytes count compulsory traffic from each design's structure (stated per row); L2 "
             "traffic (re-read tiles, atomics) is not counted. Example: Liger's config, N = 8192, forward KL "
             "(log-probs for the log-prob designs).", "",
             "| design | implementations | FLOPs | HBM bytes | floor | formula and why |", "|---|---|---|---|---|---|"]
    if liger is None:
        return []
    by_design = defaultdict(list)
    for name in IMPLEMENTATIONS:
        design = design_of(name)
        if design is not None:
            by_design[design].append(name)
    for design in ROOFLINE_MODELS:
        case = CASES["logprobs"] if design == "cce" else CASES["forward_kl"]
        for reduced in ((True, False) if design == "chunked" else (True,)):
            flops, hbm, floor, why = design_roofline(design, case, liger, 8192, reduced)
            names = ", ".join(by_design.get(design, [])) or "(none benchmarked)"
            lines.append(f"| {design}{'' if reduced or design != 'chunked' else ' (no reduced)'} | {names} | "
                         f"{flops / 1e12:.1f} T | {hbm / 1e9:.1f} GB | {seconds(floor)} | {why} |")
    return lines + [""]


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
                             linestyle="--" if name == "fastdadpo-no-reduced" else "-")  # it overlaps ours in memory
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
             f"Objective `{any_info['objective']}`, one rank on {any_info['device']}, DeepSpeed ZeRO-3 unless the "
             f"engine column says FSDP2; tiny Qwen2 "
             f"models (student hidden {any_info['student_hidden']}, teacher {any_info['teacher_hidden']}) with "
             f"V={any_info['vocab']:,}, so the LM-head losses dominate. tokens/s: median over the steps after the "
             f"first, at micro-batch {any_info['micro_batch_size']}. Peak memory: {any_info['memory_method']}. "
             + (f"A micro-batch fits if the run's peak stays within {size_bytes(budget)}; " if budget else
                "A micro-batch fits if the run does not run out of GPU memory; ")
             + f"micro-batches double from 1 up to {any_info['micro_batch_cap']}.", ""]
    header = ["kernels", "FASTDADPO_KERNEL_BACKEND", "engine", "tokens/s", "peak memory",
              "largest micro-batch that fits", "run time (timed)", "first-step loss"]
    rows = []
    names = ["fused", "naive"] + sorted(name for name in runs if name not in ("fused", "naive"))
    for name in names:
        bench = runs.get(name)
        if bench is None:
            continue
        info = bench["extra_info"]
        largest = str(info["largest_micro_batch"]) + (" (the cap)" if info.get("largest_micro_batch_capped") else "")
        tokens_per_s = info.get("tokens_per_s")
        rows.append([name, info["kernel_backend"], info.get("engine", "deepspeed"),
                     f"{tokens_per_s:,.0f}" if tokens_per_s else EMPTY,
                     size_bytes(info.get("peak_memory_bytes")), largest, seconds(bench["stats"]["mean"]),
                     f"{info.get('first_step_loss'):.6f}" if info.get("first_step_loss") is not None else EMPTY])
    lines += table(header, rows) + [""]
    if "fused" in runs and "naive" in runs:
        fused, naive = runs["fused"]["extra_info"], runs["naive"]["extra_info"]
        lines += [f"fused / naive: tokens/s {ratio(fused.get('tokens_per_s'), naive.get('tokens_per_s'))} "
                  f"(above 1: fused faster), peak memory "
                  f"{ratio(fused.get('peak_memory_bytes'), naive.get('peak_memory_bytes'))} (below 1: fused smaller).",
                  ""]
        if "fused-fsdp2" in runs:
            fsdp2 = runs["fused-fsdp2"]["extra_info"]
            lines += [f"FSDP2 / DeepSpeed ZeRO-3 (fused kernels): tokens/s "
                      f"{ratio(fsdp2.get('tokens_per_s'), fused.get('tokens_per_s'))}, peak memory "
                      f"{ratio(fsdp2.get('peak_memory_bytes'), fused.get('peak_memory_bytes'))}.", ""]
        probes = []
        for name in names:
            for probe in runs.get(name, {"extra_info": {}})["extra_info"].get("search", []):
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
