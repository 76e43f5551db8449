"""bf16 on the chunked backend's CUDA path, checked on CPU: the error of values and of dh, dW
against float64 when the gradients are summed across row chunks in bf16 (one rounding per chunk)
or in fp32 (one rounding, at the end).

The chunked backend runs as on CUDA (``chunked_backend.CUDA_PRECISION_ON_CPU``): bf16 hidden
states and heads, fp32 logits (the GEMM computed in fp32 on upcast operands, which is what
cuBLAS's ``out_dtype`` computes: products of two bf16 values are exact in fp32), the Triton row
kernel under the interpreter writing the bf16 d(loss)/d(logits) over them, and the dh and dW
GEMMs in bf16 (``GRAD_ACCUMULATION = "inputs"``) or adding into fp32 buffers (``"float32"``).
Chunks of 64 rows (forced, the same for every path), so N = 1,337 rows is 21 chunks; the
log-probs also in chunks of 16 and 4 (84 and 335 chunks). The interpreter's row kernel runs
CUDA's 1,024-column tiles, a chunk per program.

The reference: the naive float64 functions on the same bf16 values upcast (exact), in blocks of
rows. Floors beside the two bf16 paths: the same values as fp32 inputs (every buffer fp32), and
the float64 gradient rounded to bf16 (the least error any bf16 gradient can carry).

    python bench/bf16_accumulation.py --out bench/results     # ~30 min on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKENS = 1337  # 20 chunks of 64 rows and a ragged 57
HIDDEN = 256
CHUNK_ROWS = 64
# Llama-3-like (a power of two) and Qwen2.5's padded head: 151,936 rows, of which the first
# 151,665 (its tokenizer) are the distributions' support; log-probs use all rows, as the model's.
CONFIGS = [dict(head_rows=131072, vocab=131072), dict(head_rows=151936, vocab=151665)]
CASES = ("forward_kl_with_targets", "logprobs")
REFERENCE_ROWS = 128  # float64 logits of a block: 128 x 151,936 x 8 bytes = 156 MB per tensor
PATHS = {  # name -> (input dtype, GRAD_ACCUMULATION)
    "bf16, bf16 accumulation": (torch.bfloat16, "inputs"),
    "bf16, fp32 accumulation": (torch.bfloat16, "float32"),
    "fp32 inputs (floor)": (torch.float32, "float32"),
}
ROUNDED_REFERENCE = "float64 rounded to bf16 (floor)"
# The same N in more, smaller chunks (log-probs, V = 131,072): how each accumulation's error grows.
SWEEP_CHUNK_ROWS = (64, 16, 4)
# The memory side: the default plan at N = 8192 of the heads plan_chunks's docstring quotes.
PLAN_SHAPES = [dict(name="Gemma-2 2B, cross-entropy", kind="none", vocab=256000, hidden=2304),
               dict(name="Liger's config, forward KL + targets", kind="forward_kl", vocab=128256, hidden=2048),
               dict(name="Qwen2.5-1.5B, forward KL + targets", kind="forward_kl", vocab=151936, hidden=1536)]


def make_inputs(head_rows: int, seed: int = 0) -> dict:
    """bf16 values (every path sees the same numbers), logits of O(1-10) like a trained head's."""
    g = torch.Generator().manual_seed(seed)
    n, h = TOKENS, HIDDEN

    def normal(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).bfloat16()

    targets = torch.randint(0, head_rows, (n,), generator=g)
    targets[::7] = -100
    # A training loss: mean KL + cross-entropy (−mean log p), so every row pushes dW the same way.
    mean = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return dict(student_hidden=normal(n, h), student_weight=normal(head_rows, h, std=2.0 / math.sqrt(h)),
                teacher_hidden=normal(n, h), teacher_weight=normal(head_rows, h, std=3.0 / math.sqrt(h)),
                targets=targets, upstream=mean, upstream2=-mean)


def _call(fn_case: str, t: dict, vocab: int, h, w, impl: str, **kwargs):
    """(div or None, logp, loss) of one case, loss = Σ u·div + Σ u2·logp reduced in the call
    (``weights=``: the gradients formed in the forward sweep, as KD and CE run)."""
    from fastdadpo.kernels import fused_linear_divergence, fused_linear_logprobs

    if fn_case == "logprobs":
        out = fused_linear_logprobs(h, w, t["targets"], impl=impl, weights=t["upstream2"].float(), **kwargs)
        return None, out.values, out.loss
    out = fused_linear_divergence(h, w, t["teacher_hidden"].to(h.dtype), t["teacher_weight"].to(h.dtype),
                                  kind="forward_kl", targets=t["targets"], vocab_size=vocab, impl=impl,
                                  weights=t["upstream"].float(), logp_weights=t["upstream2"].float(), **kwargs)
    return out.values, out.logps, out.loss


def _loss(div, logp, t):
    return sum((o.double() * u).sum() for o, u in ((div, t["upstream"]), (logp, t["upstream2"])) if o is not None)


def reference(fn_case: str, t: dict, vocab: int) -> dict:
    """Float64 values and gradients of Σ u·div + Σ u2·logp, block by block of rows."""
    from fastdadpo.kernels import naive_linear_divergence, naive_linear_logprobs

    weight = t["student_weight"].double().requires_grad_()
    teacher_weight = t["teacher_weight"].double()
    divs, logps, hidden_grads = [], [], []
    for start in range(0, TOKENS, REFERENCE_ROWS):
        rows = slice(start, start + REFERENCE_ROWS)
        h = t["student_hidden"][rows].double().requires_grad_()
        div = None
        if fn_case == "logprobs":
            logp = naive_linear_logprobs(h, weight, t["targets"][rows])
        else:
            div, logp = naive_linear_divergence(h, weight, t["teacher_hidden"][rows].double(), teacher_weight,
                                                kind="forward_kl", vocab_size=vocab, targets=t["targets"][rows])
        block = {k: v[rows] for k, v in t.items() if k.startswith("upstream")}
        _loss(div, logp, block).backward()
        divs.append(None if div is None else div.detach())
        logps.append(logp.detach())
        hidden_grads.append(h.grad)
    return dict(div=None if divs[0] is None else torch.cat(divs), logp=torch.cat(logps),
                d_hidden=torch.cat(hidden_grads), d_weight=weight.grad)


def force_chunk_rows(rows: int) -> None:
    """Chunks of exactly ``rows`` rows for every path alike: the budget rule gives fp32 accumulators
    chunks as large as their final cast (no peak added), the bf16 ones the floor of a tiny budget."""
    from fastdadpo.kernels import chunk_plan, chunked_backend, triton_rows

    rule = getattr(chunked_backend.plan_chunks, "rule", chunked_backend.plan_chunks)  # not a forced one

    def forced(*args, **kwargs):
        return dataclasses.replace(rule(*args, **kwargs), rows_per_chunk=rows)

    forced.rule = rule
    chunked_backend.plan_chunks = forced
    triton_rows.INTERPRETER_BLOCK_R = rows  # one program per chunk (the interpreter runs them one at a time)


def run_path(fn_case: str, t: dict, vocab: int, dtype: torch.dtype, accumulation: str) -> dict:
    from fastdadpo.kernels import chunk_plan, chunked_backend

    default, chunk_plan.GRAD_ACCUMULATION = chunk_plan.GRAD_ACCUMULATION, accumulation
    h = t["student_hidden"].to(dtype).clone().requires_grad_()
    w = t["student_weight"].to(dtype).clone().requires_grad_()
    started = time.perf_counter()
    try:
        div, logp, loss = _call(fn_case, t, vocab, h, w, "chunked_triton")
        loss.backward()
    finally:
        chunk_plan.GRAD_ACCUMULATION = default
    return dict(div=None if div is None else div.detach(), logp=logp.detach(), d_hidden=h.grad, d_weight=w.grad,
                seconds=time.perf_counter() - started)


def _value_error(actual, expected):
    return None if expected is None else float((actual.double() - expected).abs().max())


def _grad_error(actual, expected, rows=None) -> dict:
    diff = actual.double() - expected
    out = dict(dtype=str(actual.dtype).replace("torch.", ""), max_abs=float(diff.abs().max()),
               rel_frobenius=float(diff.norm() / expected.norm()), max_abs_expected=float(expected.abs().max()))
    if rows is not None:
        out["rel_frobenius_untargeted"] = float(diff[rows].norm() / expected[rows].norm())
    return out


def errors(result: dict, ref: dict, untargeted: torch.Tensor) -> dict:
    return dict(div_max_abs=_value_error(result["div"], ref["div"]) if result["div"] is not None else None,
                logp_max_abs=_value_error(result["logp"], ref["logp"]),
                d_hidden=_grad_error(result["d_hidden"], ref["d_hidden"]),
                d_weight=_grad_error(result["d_weight"], ref["d_weight"], untargeted))


def machine() -> dict:
    model = ""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "")
    except OSError:
        pass
    import triton

    return dict(cpu=model, nproc=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__, date=datetime.date.today().isoformat())


def chunk_sweep() -> list:
    """dW's error, log-probs at V = 131,072, as the same rows go in more, smaller chunks."""
    config = CONFIGS[0]
    t = make_inputs(config["head_rows"])
    untargeted = torch.ones(config["head_rows"], dtype=torch.bool)
    untargeted[t["targets"][t["targets"] >= 0]] = False
    ref = reference("logprobs", t, config["vocab"])
    rows = []
    for chunk_rows in SWEEP_CHUNK_ROWS:
        force_chunk_rows(chunk_rows)
        for name in ("bf16, bf16 accumulation", "bf16, fp32 accumulation"):
            result = run_path("logprobs", t, config["vocab"], *PATHS[name])
            rows.append(dict(rows_per_chunk=chunk_rows, chunks=-(-TOKENS // chunk_rows), path=name,
                             seconds=round(result["seconds"], 1),
                             d_hidden=_grad_error(result["d_hidden"], ref["d_hidden"]),
                             d_weight=_grad_error(result["d_weight"], ref["d_weight"], untargeted)))
            print(json.dumps(rows[-1]), flush=True)
    force_chunk_rows(CHUNK_ROWS)
    return rows


def memory_plans() -> list:
    """Per head (N = 8192, bf16, default budget): what each accumulation's plan takes, and which one
    ``plan_chunks`` picks (fp32 only where the budget holds it)."""
    import torch

    from fastdadpo.kernels import chunk_plan, chunked_backend
    from fastdadpo.kernels.sweep import SweepSpec

    rows = []
    budget = chunk_plan.budget_bytes(chunk_plan.DEFAULT_CHUNK_BUDGET_MB["cuda"])
    for shape in PLAN_SHAPES:
        spec = SweepSpec(kind=shape["kind"], vocab_size=0 if shape["kind"] == "none" else shape["vocab"],
                         with_logps=True)
        chosen = chunked_backend.plan_chunks(spec, 8192, shape["vocab"], shape["hidden"], budget).grad_dtype
        for accumulation, dtype in (("inputs", torch.bfloat16), ("float32", torch.float32)):
            plan = chunk_plan._plan_for(spec, 8192, shape["vocab"], shape["hidden"], budget, torch.bfloat16,
                                             torch.float32, False, dtype)
            rows.append(dict(shape, accumulation=accumulation, rows_per_chunk=plan.rows_per_chunk,
                             chunks=-(-8192 // plan.rows_per_chunk), peak_bytes=plan.peak_bytes,
                             budget_bytes=plan.budget_bytes, chosen=dtype == chosen))
    return rows


def measure() -> dict:
    from fastdadpo.kernels import chunk_plan, chunked_backend, triton_rows

    plans = memory_plans()
    chunked_backend.CUDA_PRECISION_ON_CPU = True
    triton_rows.INTERPRETER_BLOCK_V = triton_rows.BLOCK_V  # CUDA's tile width
    force_chunk_rows(CHUNK_ROWS)
    rows = []
    for config in CONFIGS:
        t = make_inputs(config["head_rows"])
        # The head rows no token targets: their gradient is the softmax's dense part alone, a sum
        # over every chunk (a targeted row's is dominated by the one-hot term of its few rows).
        untargeted = torch.ones(config["head_rows"], dtype=torch.bool)
        untargeted[t["targets"][t["targets"] >= 0]] = False
        for fn_case in CASES:
            ref = reference(fn_case, t, config["vocab"])
            common = dict(config, case=fn_case, tokens=TOKENS, hidden=HIDDEN, rows_per_chunk=CHUNK_ROWS,
                          chunks=-(-TOKENS // CHUNK_ROWS))
            for name, (dtype, accumulation) in PATHS.items():
                result = run_path(fn_case, t, config["vocab"], dtype, accumulation)
                rows.append(dict(common, path=name, seconds=round(result["seconds"], 1),
                                 **errors(result, ref, untargeted)))
                print(json.dumps(rows[-1]), flush=True)
            # The float64 gradients rounded to bf16: the floor of the gradients only.
            floor = errors(dict(ref, d_hidden=ref["d_hidden"].bfloat16(), d_weight=ref["d_weight"].bfloat16()),
                           ref, untargeted)
            floor.update(div_max_abs=None, logp_max_abs=None)
            rows.append(dict(common, path=ROUNDED_REFERENCE, seconds=None, **floor))
            del ref
        del t
    return dict(command="python bench/bf16_accumulation.py --out bench/results", machine=machine(), rows=rows,
                chunk_sweep=chunk_sweep(), memory_plans=plans, chunk_rows=CHUNK_ROWS, tokens=TOKENS,
                hidden=HIDDEN, default_grad_accumulation=chunk_plan.GRAD_ACCUMULATION)


def _fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}e}"


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# bf16 on the chunked backend's CUDA path, on CPU: dh and dW accumulated in bf16 or fp32",
        "",
        f"N = {data['tokens']:,} tokens in {-(-data['tokens'] // data['chunk_rows'])} row chunks of "
        f"{data['chunk_rows']} (the last ragged), H = {data['hidden']} (student and teacher), bf16 hidden states "
        "and heads. Loss: mean forward KL(teacher‖student) − mean log p(target) (`forward_kl_with_targets`, "
        "one call returning both), or −mean log p alone (`logprobs`); every 7th target ignored; the weights "
        "reduced in the call (`weights=`: gradients formed in the forward sweep, as KD and CE run). The "
        "chunked backend as on CUDA (`CUDA_PRECISION_ON_CPU`): fp32 logits from the bf16 operands, the Triton "
        "row kernel (interpreted, 1,024-column tiles) writing the bf16 d(loss)/d(logits) over them, then "
        "dh = G·W and dW += Gᵀ·X per chunk into bf16 buffers (`GRAD_ACCUMULATION = \"inputs\"`: one rounding "
        "per chunk) or fp32 ones (`\"float32\"`: cast to bf16 once, at the end). Errors against the naive "
        "float64 functions on the same bf16 values. Floors: the same values as fp32 inputs (fp32 all "
        "through), and the float64 gradient rounded to bf16 (what any bf16 gradient carries).",
        "",
        "\"untargeted\": the head rows no token targets (most of them), whose gradient is the softmax's dense "
        "part summed over every chunk; a targeted row's is dominated by the one-hot term of its few tokens, "
        "added in one chunk.",
        "",
        "| head rows / vocab | case | path | div max abs | logp max abs | dh max abs | dh rel Frobenius | "
        "dW max abs | dW rel Frobenius | dW rel Frobenius, untargeted rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        vocab = f"{r['head_rows']:,}" + ("" if r["vocab"] == r["head_rows"] else f" / {r['vocab']:,}")
        dw = r["d_weight"]
        lines.append(f"| {vocab} | {r['case']} | {r['path']} | {_fmt(r['div_max_abs'])} | {_fmt(r['logp_max_abs'])} | "
                     f"{_fmt(r['d_hidden']['max_abs'])} | {_fmt(r['d_hidden']['rel_frobenius'])} | "
                     f"{_fmt(dw['max_abs'])} | {_fmt(dw['rel_frobenius'])} | {_fmt(dw['rel_frobenius_untargeted'])} |")
    by = {(r["head_rows"], r["case"], r["path"]): r["d_weight"] for r in data["rows"]}

    def ratios(metric):
        values = [by[(k[0], k[1], "bf16, bf16 accumulation")][metric] / by[k][metric]
                  for k in by if k[2] == "bf16, fp32 accumulation"]
        return f"{min(values):.1f}x to {max(values):.1f}x"

    lines += [
        "",
        f"dW's relative error, bf16 accumulation over fp32 accumulation: {ratios('rel_frobenius')} (whole head), "
        f"{ratios('rel_frobenius_untargeted')} (untargeted rows). dh is the same both ways: each row's dh is one "
        "chunk's GEMM, rounded once.",
        "",
        f"## More chunks (`logprobs`, V = {CONFIGS[0]['head_rows']:,}, the same {data['tokens']:,} rows)",
        "",
        "| rows per chunk | chunks | path | dh rel Frobenius | dW rel Frobenius | dW rel Frobenius, untargeted rows |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["chunk_sweep"]:
        dh, dw = r["d_hidden"], r["d_weight"]
        lines.append(f"| {r['rows_per_chunk']} | {r['chunks']} | {r['path']} | {_fmt(dh['rel_frobenius'])} | "
                     f"{_fmt(dw['rel_frobenius'])} | {_fmt(dw['rel_frobenius_untargeted'])} |")
    lines += [
        "",
        "## What fp32 accumulation costs in memory",
        "",
        "`plan_chunks` at N = 8,192 bf16 tokens and the default budget "
        f"({data['memory_plans'][0]['budget_bytes'] / 1e9:.3f} GB): the fp32 accumulators take (N + V)·H·4 bytes "
        "instead of (N + V)·H·2, and their cast to bf16 at the end (N + V)·H·2 more, once the chunk buffers are "
        "freed. The budget is the call's contract: fp32 is chosen where its plan fits the budget, else the "
        "inputs' dtype (a larger `chunk_budget_mb` buys fp32 back).",
        "",
        "| head | accumulation | rows per chunk | chunks | peak above the inputs | chosen at this budget |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["memory_plans"]:
        lines.append(f"| {r['name']}: V = {r['vocab']:,}, H = {r['hidden']:,} | {r['accumulation']} | "
                     f"{r['rows_per_chunk']} | {r['chunks']} | {r['peak_bytes'] / 1e9:.2f} GB | "
                     f"{'yes' if r.get('chosen') else 'no'} |")
    lines += [
        "",
        f"Default: `GRAD_ACCUMULATION = \"{data['default_grad_accumulation']}\"`, within the budget "
        "(kernels/src/chunked_backend.py, which gives the reasons). The error tables above were measured with the "
        "accumulation forced either way (small N, where fp32 fits).",
        "",
        f"Machine: {m['cpu']}, {m['nproc']} cores; Python {m['python']}, torch {m['torch']}, triton {m['triton']}; "
        f"{m['date']}. Times (JSON) are the interpreter's on CPU and say nothing about the GPU.",
        "",
        "Command:",
        "",
        f"    {data['command']}",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--replan", action="store_true",
                        help="keep the measured errors of OUT/cpu-bf16-accumulation.json, recompute only the memory "
                             "plans (after a change to the chunk rule) and rewrite both files")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.replan:
        with open(os.path.join(args.out, "cpu-bf16-accumulation.json")) as handle:
            data = json.load(handle)
        data["memory_plans"] = memory_plans()
    else:
        data = measure()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu-bf16-accumulation.json"), "w") as handle:
        json.dump(data, handle, indent=1)
    with open(os.path.join(args.out, "cpu-bf16-accumulation.md"), "w") as handle:
        handle.write(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
