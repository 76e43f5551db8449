"""Host side of the Triton backend: launch configuration, merging split statistics, gradients.

The forward saves only per-row statistics ([rows] float32 each) between forward and backward,
and the backward recomputes the logit tiles. Why recompute rather than form the gradients in the
forward (as Liger's fused JSD does): a tiled kernel cannot normalize a tile's probabilities until
the whole row is swept, so gradients in the forward would need a second sweep anyway (the same
FLOPs as recomputing) or a [rows x vocab] buffer (Liger's Triton JSD keeps one); and the weight
gradient computed early would have to be held in float32 ([V, H], 1 GB at V=128k, H=2048) from
forward to backward. Recomputing holds nothing but the statistics, produces the weight gradient
inside backward where ZeRO-3's gradient hooks expect it, and needs the gathered LM head in
backward, which ZeRO-3 provides by re-gathering the parameter for the module's backward.

Every kernel launch is built by one function (``_forward_launch``, ``_backward_launch``) that
both the dispatch and ``launch_specializations`` (what the compile report and test compile) call,
so the compiled set cannot drift from what runs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from .sweep import DIVERGENCE_KINDS, SWEEP_KINDS, SweepGrads, SweepInputs, SweepSpec
from .tl_utils import KIND_CODES, jit_specialization
from .triton_backward import sweep_backward_kernel
from .triton_forward import (NUM_STATS, STAT_ACC, STAT_KL_STUDENT, STAT_KL_TEACHER, STAT_M_LP, STAT_M_R, STAT_M_S,
                             STAT_M_T, STAT_TARGET, STAT_Z_LP, STAT_Z_R, STAT_Z_S, STAT_Z_T, sweep_forward_kernel)



def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tiles and launch options per (kernel, input dtype[, sweep kind]) on a GPU, chosen with the compile report
# (bench/compile_report.py: registers and spills on sm_90a and sm_80) so that no specialization
# spills. Half inputs: the forward holds two to three [64, 128] float32 logit tiles at 8 warps
# (32 registers each); the backward steps H by 32, not 64, which keeps its loops within 255
# registers on sm_80 (at 64 the JSD/reverse-KL ones spill); so does ADPA's advantage forward, whose
# three [64, 128] logit tiles at H step 64 take 255 registers and spill 16 bytes on sm_80 under
# triton 3.6 (the GPU machine's; 0 under 3.9): at 32, 233 registers and no spills under either.
# float32 inputs are multiplied exactly
# (no tensor cores: FMA dots, whose operands sit in registers): smaller tiles stepping H by 16
# (at [64, 128] x 32 every float32 kernel spills, 0.5-2 KB on sm_80). ptxas caps these FMA kernels
# at 128 or 168 registers to fit more programs per SM and then spills a few dozen bytes, differently
# per kind: the backward takes [32, 64] tiles at 4 warps (at [64, 64] x 8 warps, the kinds without
# targets spill on sm_80), the forward [64, 32], except ADPA's advantage (three heads), which at
# [64, 32] spills on sm_80 and at [64, 64] spills on neither, and JSD, [32, 64] (at [64, 32] its
# first pass with targets spills 40 bytes on sm_80).
# BLOCK_N and BLOCK_V also set the backward's atomic traffic: N·V·H·(1/BLOCK_N + 1/BLOCK_V) adds.
_GPU_CONFIGS = {
    ("forward", "half"): (dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64), dict(num_warps=8, num_stages=3)),
    ("forward", "half", "advantage"): (dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32), dict(num_warps=8, num_stages=3)),
    ("backward", "half"): (dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32), dict(num_warps=8, num_stages=3)),
    ("forward", "float32"): (dict(BLOCK_N=64, BLOCK_V=32, BLOCK_H=16), dict(num_warps=8, num_stages=3)),
    ("forward", "float32", "advantage"): (dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16), dict(num_warps=8, num_stages=3)),
    ("forward", "float32", "jsd"): (dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16), dict(num_warps=8, num_stages=3)),
    ("backward", "float32"): (dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16), dict(num_warps=4, num_stages=3)),
}


def _launch_config(kernel: str, dtype: torch.dtype, kind: str, interpreter: bool):
    """(tile constexprs, launch options) of ``kernel`` ("forward" or "backward") for a sweep kind."""
    if interpreter:  # small tiles: the interpreter runs every program in numpy
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16), dict()
    key = (kernel, "half" if dtype in (torch.float16, torch.bfloat16) else "float32")
    blocks, launch = _GPU_CONFIGS.get(key + (kind,), _GPU_CONFIGS[key])
    return dict(blocks), dict(launch)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are computed exactly (no TF32 rounding); half inputs ignore this setting.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _splits(row_blocks: int, n_tiles: int, device: torch.device, interpreter: bool) -> int:
    """Vocabulary splits so that a few waves of programs cover the GPU even for few rows."""
    if interpreter or device.type != "cuda":
        return min(2, n_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, math.ceil(4 * sms / row_blocks)))


def _contig(t):
    """Contiguous and 16-byte aligned: Triton specializes each pointer on 16-byte alignment, and
    only the aligned variant vectorizes and pipelines its loads (the one the compile report checks
    for spills; the unaligned one spills). A view at an odd offset is copied once."""
    if t is None:
        return None
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _merge(m: torch.Tensor, z: torch.Tensor):
    """Merge per-split (max, Σexp) into the row's log-sum-exp, its Σexp relative to the global
    max M, and the per-split weights e^{m_k − M} that bring split accumulators to that max."""
    top = m.max(dim=0).values
    weights = torch.exp(m - top)
    total = (z * weights).sum(dim=0)
    return top + torch.log(total), total, weights


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, positional arguments and keyword arguments
    (constexprs and launch options)."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.meta)


@dataclass(frozen=True)
class _Operands:
    """Contiguous kernel operands; absent ones replaced by dummy pointers that are never
    dereferenced (their branches compile away)."""

    s_hidden: torch.Tensor
    s_weight: torch.Tensor
    bias: torch.Tensor
    t_hidden: torch.Tensor
    t_weight: torch.Tensor
    r_hidden: torch.Tensor
    r_weight: torch.Tensor
    targets: torch.Tensor
    has_bias: bool

    @staticmethod
    def of(spec: SweepSpec, inputs: SweepInputs) -> "_Operands":
        s_hidden, s_weight = _contig(inputs.student_hidden), _contig(inputs.student_weight)
        t_hidden, t_weight = _contig(inputs.teacher_hidden), _contig(inputs.teacher_weight)
        r_hidden, r_weight = _contig(inputs.ref_hidden), _contig(inputs.ref_weight)
        t_hidden, t_weight = (t_hidden, t_weight) if t_hidden is not None else (s_hidden, s_weight)
        r_hidden, r_weight = (r_hidden, r_weight) if r_hidden is not None else (s_hidden, s_weight)
        bias = _contig(inputs.student_bias)
        targets = _contig(inputs.targets) if spec.with_logps else s_weight
        return _Operands(s_hidden, s_weight, bias if bias is not None else s_weight, t_hidden, t_weight, r_hidden,
                         r_weight, targets, bias is not None)

    @property
    def rows(self) -> int:
        return self.s_hidden.shape[0]

    def heads(self):
        return (self.s_hidden, self.s_weight, self.bias, self.t_hidden, self.t_weight, self.r_hidden, self.r_weight,
                self.targets)

    def sizes(self, spec: SweepSpec):
        vocab_student, hs_size = self.s_weight.shape
        return dict(n_rows=self.rows, vocab_student=vocab_student, vocab_div=spec.vocab_size, hs_size=hs_size,
                    ht_size=self.t_hidden.shape[1], hr_size=self.r_hidden.shape[1])


def _columns(spec: SweepSpec, vocab_student: int) -> int:
    return vocab_student if spec.with_logps else spec.vocab_size


def _scalars(spec: SweepSpec):
    beta = spec.beta if spec.kind == "jsd" else 0.5
    return dict(inv_temp=1.0 / spec.temperature, inv_lp_temp=1.0 / spec.logp_temperature,
                log_beta=math.log(beta), log_one_minus_beta=math.log1p(-beta))


@dataclass(frozen=True)
class _ForwardGrid:
    blocks: dict
    launch: dict
    n_tiles: int
    row_blocks: int
    splits: int
    tiles_per_split: int

    @staticmethod
    def of(spec: SweepSpec, ops: _Operands, interpreter: bool) -> "_ForwardGrid":
        blocks, launch = _launch_config("forward", ops.s_weight.dtype, spec.kind, interpreter)
        n_tiles = triton.cdiv(_columns(spec, ops.s_weight.shape[0]), blocks["BLOCK_V"])
        row_blocks = triton.cdiv(ops.rows, blocks["BLOCK_N"])
        splits = _splits(row_blocks, n_tiles, ops.s_hidden.device, interpreter)
        tiles_per_split = triton.cdiv(n_tiles, splits)
        return _ForwardGrid(blocks, launch, n_tiles, row_blocks, triton.cdiv(n_tiles, tiles_per_split),
                            tiles_per_split)


def _forward_launch(spec: SweepSpec, ops: _Operands, grid: _ForwardGrid, pass_number: int, lse_s, lse_t,
                    stats) -> Launch:
    """Pass 1 (every kind) or JSD's pass 2 (given both normalizers; log-probs come from pass 1)."""
    scalars = _scalars(spec)
    meta = dict(KIND=KIND_CODES[spec.kind], PASS=pass_number, WITH_LOGPS=spec.with_logps and pass_number == 1,
                HAS_BIAS=ops.has_bias, DOT_PRECISION=_dot_precision(ops.s_weight.dtype), **grid.blocks, **grid.launch)
    sizes = ops.sizes(spec)
    args = ops.heads() + (lse_s, lse_t, stats, sizes["n_rows"], sizes["vocab_student"], sizes["vocab_div"],
                          sizes["hs_size"], sizes["ht_size"], sizes["hr_size"], grid.n_tiles, grid.tiles_per_split,
                          scalars["inv_temp"], scalars["inv_lp_temp"], scalars["log_beta"],
                          scalars["log_one_minus_beta"])
    return Launch(sweep_forward_kernel, (grid.row_blocks, grid.splits), args, meta)


def forward(spec: SweepSpec, inputs: SweepInputs, row_grads=None):
    assert row_grads is None, "the Triton backend recomputes in backward"
    ops = _Operands.of(spec, inputs)
    n = ops.rows
    grid = _ForwardGrid.of(spec, ops, interpreting())
    stats = torch.zeros(NUM_STATS, grid.splits, n, dtype=torch.float32, device=ops.s_hidden.device)
    _forward_launch(spec, ops, grid, 1, stats, stats, stats)()  # pass 1 reads no normalizers

    saved = {}
    div = logp = None
    if spec.with_logps:
        saved["lse_lp"] = _merge(stats[int(STAT_M_LP)], stats[int(STAT_Z_LP)])[0]
        logp = stats[int(STAT_TARGET)].sum(dim=0) - saved["lse_lp"]
    if spec.has_div:
        lse_s, z_s, w_s = _merge(stats[int(STAT_M_S)], stats[int(STAT_Z_S)])
        lse_t, z_t, w_t = _merge(stats[int(STAT_M_T)], stats[int(STAT_Z_T)])
        saved.update(lse_s=lse_s, lse_t=lse_t)
        acc = stats[int(STAT_ACC)]
        if spec.kind == "forward_kl":  # E_q[t − s] − lse_t + lse_s
            div = (acc * w_t).sum(dim=0) / z_t - lse_t + lse_s
        elif spec.kind == "reverse_kl":  # E_p[s − t] − lse_s + lse_t
            div = (acc * w_s).sum(dim=0) / z_s - lse_s + lse_t
        elif spec.kind == "advantage":  # E_p[t − r] − lse_t + lse_r
            lse_r = _merge(stats[int(STAT_M_R)], stats[int(STAT_Z_R)])[0]
            saved["lse_r"] = lse_r
            div = (acc * w_s).sum(dim=0) / z_s - lse_t + lse_r
        else:  # jsd: second pass with both normalizers known
            _forward_launch(spec, ops, grid, 2, lse_s.contiguous(), lse_t.contiguous(), stats)()
            kl_teacher = stats[int(STAT_KL_TEACHER)].sum(dim=0)
            saved["kl_student"] = stats[int(STAT_KL_STUDENT)].sum(dim=0)
            div = spec.beta * kl_teacher + (1.0 - spec.beta) * saved["kl_student"]
    return div, logp, saved, None


def _backward_launch(spec: SweepSpec, ops: _Operands, rows: dict, grads: SweepGrads, interpreter: bool) -> Launch:
    """``rows``: the per-row float32 inputs of the backward, by kernel argument name."""
    blocks, launch = _launch_config("backward", ops.s_weight.dtype, spec.kind, interpreter)
    grid = (triton.cdiv(ops.rows, blocks["BLOCK_N"]),
            triton.cdiv(_columns(spec, ops.s_weight.shape[0]), blocks["BLOCK_V"]))
    scalars = _scalars(spec)
    sizes = ops.sizes(spec)
    row_args = tuple(rows[name] for name in ("lse_lp", "lse_s", "lse_t", "lse_r", "div_value", "kl_student", "g_div",
                                             "g_lp"))
    args = ops.heads() + row_args + (
        grads.hidden, grads.weight, grads.bias if grads.bias is not None else grads.weight,
        sizes["n_rows"], sizes["vocab_student"], sizes["vocab_div"], sizes["hs_size"], sizes["ht_size"],
        sizes["hr_size"], scalars["inv_temp"], scalars["inv_lp_temp"], spec.beta, scalars["log_beta"],
        scalars["log_one_minus_beta"])
    meta = dict(KIND=KIND_CODES[spec.kind], WITH_LOGPS=spec.with_logps, HAS_BIAS=ops.has_bias,
                DOT_PRECISION=_dot_precision(ops.s_weight.dtype), **blocks, **launch)
    return Launch(sweep_backward_kernel, grid, args, meta)


def backward(spec: SweepSpec, inputs: SweepInputs, saved: dict, div, grad_div, grad_logp) -> SweepGrads:
    ops = _Operands.of(spec, inputs)
    n = ops.rows
    vocab_student, hs_size = ops.s_weight.shape
    device = ops.s_hidden.device
    grads = SweepGrads(torch.zeros(n, hs_size, dtype=torch.float32, device=device),
                       torch.zeros(vocab_student, hs_size, dtype=torch.float32, device=device),
                       torch.zeros(vocab_student, dtype=torch.float32, device=device) if ops.has_bias else None)
    zeros = torch.zeros(n, dtype=torch.float32, device=device)

    def row(value):
        return zeros if value is None else value.float().contiguous()

    rows = dict(lse_lp=row(saved.get("lse_lp")), lse_s=row(saved.get("lse_s")), lse_t=row(saved.get("lse_t")),
                lse_r=row(saved.get("lse_r")), div_value=row(div), kl_student=row(saved.get("kl_student")),
                g_div=row(grad_div), g_lp=row(grad_logp))
    _backward_launch(spec, ops, rows, grads, interpreting())()
    return grads


# --- what the dispatch can launch, for the compile report and test ------------------------------------------

# The shapes the specializations are taken at: Liger's benchmark config (hidden sizes and
# vocabulary multiples of 16, as every real model's are), and a row count that is not, as the
# rows left after dropping masked positions usually are. Triton specializes integer arguments on
# divisibility by 16, so these choose which variant of each kernel is compiled.
SPECIALIZATION_SHAPES = dict(rows=8191, student_hidden=2048, teacher_hidden=4096, vocab=128256)
SPECIALIZATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _sweep_variants():
    """Every SweepSpec shape the public API can ask of this backend: log-probs alone (with or
    without a bias), each divergence with or without targets, the advantage (no targets)."""
    for kind in SWEEP_KINDS:
        with_logps = (True,) if kind == "none" else (False, True) if kind in DIVERGENCE_KINDS else (False,)
        for logps in with_logps:
            for bias in ((False, True) if kind == "none" else (False,)):
                yield SweepSpec(kind=kind, vocab_size=0 if kind == "none" else SPECIALIZATION_SHAPES["vocab"],
                                with_logps=logps), bias


def _meta_inputs(spec: SweepSpec, bias: bool, dtype: torch.dtype) -> SweepInputs:
    shape = SPECIALIZATION_SHAPES

    def empty(*size, dt=dtype):
        return torch.empty(*size, dtype=dt, device="meta")

    n, hs, ht, vocab = shape["rows"], shape["student_hidden"], shape["teacher_hidden"], shape["vocab"]
    teacher = spec.needs_teacher
    return SweepInputs(empty(n, hs), empty(vocab, hs), empty(vocab) if bias else None,
                       empty(n, ht) if teacher else None, empty(vocab, ht) if teacher else None,
                       empty(n, ht) if spec.needs_ref else None, empty(vocab, ht) if spec.needs_ref else None,
                       empty(n, dt=torch.int64) if spec.with_logps else None)


def _as_specialization(name: str, launch: Launch) -> dict:
    meta = dict(launch.meta)
    options = {key: meta.pop(key) for key in ("num_warps", "num_stages")}
    return jit_specialization(name, launch.kernel, launch.args, meta, **options)


def launch_specializations():
    """Every (kernel, constexprs, launch options) the dispatch launches on a GPU, built by the
    same functions the dispatch calls."""
    found = []
    for dtype in SPECIALIZATION_DTYPES:
        dtype_name = str(dtype).replace("torch.", "")
        for spec, bias in _sweep_variants():
            ops = _Operands.of(spec, _meta_inputs(spec, bias, dtype))
            label = spec.kind + (" +targets" if spec.with_logps and spec.kind != "none" else "") + \
                (" +bias" if bias else "")
            grid = _ForwardGrid.of(spec, ops, interpreter=False)
            n = ops.rows
            row = torch.empty(n, dtype=torch.float32, device="meta")
            stats = torch.empty(NUM_STATS, grid.splits, n, dtype=torch.float32, device="meta")
            found.append(_as_specialization(f"forward pass 1 {label} {dtype_name}",
                                            _forward_launch(spec, ops, grid, 1, stats, stats, stats)))
            if spec.kind == "jsd":
                found.append(_as_specialization(f"forward pass 2 {label} {dtype_name}",
                                                _forward_launch(spec, ops, grid, 2, row, row, stats)))
            vocab_student, hs = ops.s_weight.shape
            grads = SweepGrads(torch.empty(n, hs, dtype=torch.float32, device="meta"),
                               torch.empty(vocab_student, hs, dtype=torch.float32, device="meta"),
                               torch.empty(vocab_student, dtype=torch.float32, device="meta") if bias else None)
            rows = {name: row for name in ("lse_lp", "lse_s", "lse_t", "lse_r", "div_value", "kl_student", "g_div",
                                           "g_lp")}
            found.append(_as_specialization(f"backward {label} {dtype_name}",
                                            _backward_launch(spec, ops, rows, grads, interpreter=False)))
    unique = {}
    for spec in found:  # JSD's pass 2 is the same kernel with or without targets: compile it once
        key = (spec["fn"], tuple(spec["signature"].items()), tuple(spec["constexprs"].items()),
               tuple((k, str(v)) for k, v in spec["attrs"].items()), spec["num_warps"], spec["num_stages"])
        unique.setdefault(key, spec)
    return list(unique.values())
