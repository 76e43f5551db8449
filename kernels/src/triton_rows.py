"""The chunked backend's one Triton kernel: everything row-wise about a chunk of logits, in one launch.

The logit chunks come from cuBLAS (``chunked_backend``); this kernel takes ``BLOCK_R`` rows per
program (one on CUDA) and sweeps them in ``BLOCK_V``-column tiles:

1. statistics: the log-normalizers (log-prob logits over the student's whole head at
   ``inv_lp_temp``; student, teacher and reference over the first ``n_div`` columns at ``inv_temp``),
   the target's logit and the kind's accumulator, all streamed relative to a running max
   (forward KL Σ e^{t−m_t}(t − s); reverse KL Σ e^{s−m_s}(s − t); advantage Σ e^{s−m_s}(t − r));
2. JSD only: KL(teacher‖m) and KL(student‖m), which need both normalizers first;
3. with ``WITH_GRAD``: d(Σ g·out)/d(raw student logit) for the row weights g, written over the
   student's logits (the host hands a pointer that aliases them: the gradient needs no buffer).

d/d(student logit), per output, before the 1/T of the logit scale:
  log-prob       g·(onehot(target) − softmax)
  forward KL     g·(p − q)
  reverse KL     g·p·(log p − log q − KL(p‖q))
  JSD(β)         g·(1−β)·p·(log p − log m − KL(p‖m))
  advantage      g·p·(a − A),  a = log p_t − log p_r,  A = Σ p·a

``LSE_GIVEN`` (log-prob rows only): the normalizer is the one a forward sweep stored, so the
backward sweep is the gradient pass alone.

Soft caps and logit scales: the buffers hold each head's raw outputs x; every load maps them to
the model's logits z = cap·tanh(scale·x/cap) (cap 0: z = scale·x), and the gradient pass
multiplies d/dz by dz/dx = scale·(1 − (z/cap)²). The cap is a runtime scalar, not a constexpr:
an uncapped head pays one uniform branch per tile and the compiled set does not double.
"""
import triton
import triton.language as tl

from .tl_utils import KIND_ADVANTAGE, KIND_CODES, KIND_FORWARD_KL, KIND_JSD, KIND_NONE, KIND_REVERSE_KL, logaddexp

# CUDA launch configuration. One row per program: a chunk of R rows is R programs, several resident
# per SM, so the work spreads evenly whatever R. 1024 columns over 8 warps is 4 fp32 values per
# thread per tile, one 16-byte load each: every pass stays under 60 registers, and the resident
# programs keep enough loads in flight to stream at HBM bandwidth (the kernel is memory-bound: two
# or three reads of each logit and one write). At 2048 columns ptxas spills 4 bytes in the
# advantage kernel on sm_90a (the compile report).
BLOCK_R = 1
BLOCK_V = 1024
NUM_WARPS = 8
NUM_STAGES = 2
# Under TRITON_INTERPRET=1 (numpy, one program at a time): many rows per program, and tiles small
# enough that the tests' vocabularies span several of them.
INTERPRETER_BLOCK_R = 16
INTERPRETER_BLOCK_V = 32


@triton.jit
def _online_lse(m, z, x):
    """Streaming log-sum-exp over one [rows, BLOCK_V] tile (masked entries −inf, ≥ 1 finite per
    row): new max, new Σ exp(x − max), and the factor rescaling older accumulators to the new max."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    rescale = tl.exp(m - m_new)
    return m_new, z * rescale + tl.sum(tl.exp(x - m_new[:, None]), axis=1), rescale


@triton.jit
def _tanh(u):
    # From exp alone (the interpreter has no libdevice): saturates to ±1, never NaN.
    return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0


@triton.jit
def _model_logits(x, scale, cap):
    """z = cap·tanh(scale·x/cap), or scale·x where cap is 0."""
    z = x * scale
    if cap > 0:
        z = cap * _tanh(z / cap)
    return z


@triton.jit
def row_sweep_kernel(
    s_ptr, s_stride, t_ptr, t_stride, r_ptr, r_stride, grad_ptr, grad_stride,
    targets_ptr, g_div_ptr, g_lp_ptr, div_ptr, logp_ptr, lse_lp_ptr,
    n_rows, n_student, n_div, inv_temp, inv_lp_temp, beta, log_beta, log_one_minus_beta,
    s_scale, s_cap, t_scale, t_cap, r_scale, r_cap,
    KIND: tl.constexpr, WITH_LOGPS: tl.constexpr, WITH_GRAD: tl.constexpr, LSE_GIVEN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    s_rows = s_ptr + rows[:, None] * s_stride
    t_rows = t_ptr + rows[:, None] * t_stride
    r_rows = r_ptr + rows[:, None] * r_stride
    cols = tl.arange(0, BLOCK_V)[None, :]
    neg_inf = float("-inf")
    zero = tl.zeros((BLOCK_R,), dtype=tl.float32)

    m_lp = zero + neg_inf
    z_lp = zero
    target_logit = zero
    m_s = zero + neg_inf
    z_s = zero
    m_t = zero + neg_inf
    z_t = zero
    m_r = zero + neg_inf
    z_r = zero
    acc = zero
    kl_student = zero
    tgt = rows
    if WITH_LOGPS:
        tgt = tl.load(targets_ptr + rows, mask=row_ok, other=0)

    # --- pass 1: statistics --------------------------------------------------------------------------
    # Rows past the chunk load zeros (finite statistics, never stored); columns past a head are −inf.
    if not LSE_GIVEN:
        for v0 in range(0, n_student, BLOCK_V):
            offs = v0 + cols
            in_row = offs < n_student
            s_logit = _model_logits(tl.load(s_rows + offs, mask=row_ok[:, None] & in_row, other=0.0).to(tl.float32),
                                  s_scale, s_cap)
            if WITH_LOGPS:
                lp = tl.where(in_row, s_logit * inv_lp_temp, neg_inf)
                m_lp, z_lp, _ = _online_lse(m_lp, z_lp, lp)
                target_logit += tl.sum(tl.where(offs == tgt[:, None], s_logit, 0.0), axis=1)
            if KIND != KIND_NONE:
                if v0 < n_div:
                    ok = offs < n_div
                    load_ok = row_ok[:, None] & ok
                    # "safe" copies are 0 where masked (for differences), the others −inf (for exp).
                    s_safe = tl.where(ok, s_logit * inv_temp, 0.0)
                    t_safe = _model_logits(tl.load(t_rows + offs, mask=load_ok, other=0.0).to(tl.float32), t_scale,
                                           t_cap) * inv_temp
                    s = tl.where(ok, s_safe, neg_inf)
                    t = tl.where(ok, t_safe, neg_inf)
                    m_s, z_s, rescale_s = _online_lse(m_s, z_s, s)
                    m_t, z_t, rescale_t = _online_lse(m_t, z_t, t)
                    if KIND == KIND_FORWARD_KL:
                        acc = acc * rescale_t + tl.sum(tl.exp(t - m_t[:, None]) * (t_safe - s_safe), axis=1)
                    elif KIND == KIND_REVERSE_KL:
                        acc = acc * rescale_s + tl.sum(tl.exp(s - m_s[:, None]) * (s_safe - t_safe), axis=1)
                    elif KIND == KIND_ADVANTAGE:
                        r_safe = _model_logits(tl.load(r_rows + offs, mask=load_ok, other=0.0).to(tl.float32),
                                               r_scale, r_cap) * inv_temp
                        m_r, z_r, _ = _online_lse(m_r, z_r, tl.where(ok, r_safe, neg_inf))
                        acc = acc * rescale_s + tl.sum(tl.exp(s - m_s[:, None]) * (t_safe - r_safe), axis=1)

    lse_lp = zero
    if WITH_LOGPS:
        if LSE_GIVEN:
            lse_lp = tl.load(lse_lp_ptr + rows, mask=row_ok, other=0.0)
        else:
            lse_lp = m_lp + tl.log(z_lp)
            tl.store(lse_lp_ptr + rows, lse_lp, mask=row_ok)
            tl.store(logp_ptr + rows, target_logit * inv_lp_temp - lse_lp, mask=row_ok)

    lse_s = zero
    lse_t = zero
    lse_r = zero
    if KIND != KIND_NONE:
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
    if KIND == KIND_ADVANTAGE:
        lse_r = m_r + tl.log(z_r)
    div = zero
    if KIND == KIND_FORWARD_KL:  # E_q[t − s] − lse_t + lse_s
        div = acc / z_t - lse_t + lse_s
    elif KIND == KIND_REVERSE_KL:  # E_p[s − t] − lse_s + lse_t
        div = acc / z_s - lse_s + lse_t
    elif KIND == KIND_ADVANTAGE:  # E_p[t − r] − lse_t + lse_r
        div = acc / z_s - lse_t + lse_r
    elif KIND == KIND_JSD:
        # --- pass 2 (JSD): both normalizers known ------------------------------------------------------
        kl_teacher = zero
        for v0 in range(0, n_div, BLOCK_V):
            offs = v0 + cols
            ok = offs < n_div
            load_ok = row_ok[:, None] & ok
            log_p = (_model_logits(tl.load(s_rows + offs, mask=load_ok, other=0.0).to(tl.float32), s_scale, s_cap)
                     * inv_temp - lse_s[:, None])
            log_q = (_model_logits(tl.load(t_rows + offs, mask=load_ok, other=0.0).to(tl.float32), t_scale, t_cap)
                     * inv_temp - lse_t[:, None])
            log_m = logaddexp(log_beta + log_q, log_one_minus_beta + log_p)
            kl_teacher += tl.sum(tl.where(ok, tl.exp(log_q) * (log_q - log_m), 0.0), axis=1)
            kl_student += tl.sum(tl.where(ok, tl.exp(log_p) * (log_p - log_m), 0.0), axis=1)
        div = beta * kl_teacher + (1.0 - beta) * kl_student
    if KIND != KIND_NONE:
        tl.store(div_ptr + rows, div, mask=row_ok)

    # --- pass 3: d(Σ g·out)/d(raw student logits), over the student's logits ---------------------------
    if WITH_GRAD:
        grad_rows = grad_ptr + rows[:, None] * grad_stride
        g_lp = zero
        g_div = zero
        # The scale's share of dz/dx folded into the row weights.
        if WITH_LOGPS:
            g_lp = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0) * (inv_lp_temp * s_scale)
        if KIND != KIND_NONE:
            g_div = tl.load(g_div_ptr + rows, mask=row_ok, other=0.0) * (inv_temp * s_scale)
        for v0 in range(0, n_student, BLOCK_V):
            offs = v0 + cols
            in_row = offs < n_student
            store_ok = row_ok[:, None] & in_row
            s_logit = _model_logits(tl.load(s_rows + offs, mask=store_ok, other=0.0).to(tl.float32), s_scale, s_cap)
            grad = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
            if WITH_LOGPS:
                probs = tl.where(in_row, tl.exp(s_logit * inv_lp_temp - lse_lp[:, None]), 0.0)
                grad = g_lp[:, None] * (tl.where(offs == tgt[:, None], 1.0, 0.0) - probs)
            if KIND != KIND_NONE:
                if v0 < n_div:
                    ok = offs < n_div
                    log_p = s_logit * inv_temp - lse_s[:, None]
                    p = tl.where(ok, tl.exp(log_p), 0.0)
                    log_q = (_model_logits(tl.load(t_rows + offs, mask=row_ok[:, None] & ok, other=0.0).to(tl.float32),
                                           t_scale, t_cap) * inv_temp - lse_t[:, None])
                    if KIND == KIND_FORWARD_KL:
                        d = p - tl.where(ok, tl.exp(log_q), 0.0)
                    elif KIND == KIND_REVERSE_KL:
                        d = p * (log_p - log_q - div[:, None])
                    elif KIND == KIND_JSD:
                        log_m = logaddexp(log_beta + log_q, log_one_minus_beta + log_p)
                        d = (1.0 - beta) * p * (log_p - log_m - kl_student[:, None])
                    else:  # KIND_ADVANTAGE
                        log_r = (_model_logits(tl.load(r_rows + offs, mask=row_ok[:, None] & ok, other=0.0)
                                               .to(tl.float32), r_scale, r_cap) * inv_temp - lse_r[:, None])
                        d = p * ((log_q - log_r) - div[:, None])
                    grad += tl.where(ok, g_div[:, None] * d, 0.0)
            if s_cap > 0:  # the soft cap's share of dz/dx: 1 − tanh²
                th = s_logit / s_cap
                grad = grad * (1.0 - th * th)
            # The gradient may be a narrower dtype written over the same rows' wider logits: this
            # tile's stores land on logits of this and earlier tiles, so every thread's loads of
            # them must be done before any thread stores.
            tl.debug_barrier()
            tl.store(grad_rows + offs, grad.to(grad_ptr.dtype.element_ty), mask=store_ok)


# --- launches: built by one function for the dispatch and for the compile report ------------------------

def launch(logits, teacher, ref, grad, targets, g_div, g_lp, div, logp, lse_lp, n_rows: int, n_student: int,
           n_div: int, scalars: dict, *, kind: str, with_logps: bool, with_grad: bool, lse_given: bool,
           interpreted: bool = False):
    """(positional arguments, constexprs, launch options) of one ``row_sweep_kernel`` launch over
    a chunk: [rows, C] logit buffers (``teacher``/``ref`` stand in with ``logits`` when absent),
    the gradient view written over the logits, and per-row vectors of the chunk's rows."""
    args = (logits, logits.stride(0), teacher, teacher.stride(0), ref, ref.stride(0), grad, grad.stride(0),
            targets, g_div, g_lp, div, logp, lse_lp, n_rows, n_student, n_div, scalars["inv_temp"],
            scalars["inv_lp_temp"], scalars["beta"], scalars["log_beta"], scalars["log_one_minus_beta"],
            *(float(scalars.get(name, default)) for name, default in (
                ("s_scale", 1.0), ("s_cap", 0.0), ("t_scale", 1.0), ("t_cap", 0.0), ("r_scale", 1.0), ("r_cap", 0.0))))
    constexprs = dict(KIND=KIND_CODES[kind], WITH_LOGPS=with_logps, WITH_GRAD=with_grad, LSE_GIVEN=lse_given,
                      BLOCK_R=INTERPRETER_BLOCK_R if interpreted else BLOCK_R,
                      BLOCK_V=INTERPRETER_BLOCK_V if interpreted else BLOCK_V)
    options = {} if interpreted else dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return args, constexprs, options


def specialization_flags():
    """Every (kind, with_logps, with_grad, lse_given) combination ``chunked_backend`` launches."""
    flags = []
    for kind in KIND_CODES:
        logps_options = (True,) if kind == "none" else (False,) if kind == "advantage" else (False, True)
        for with_logps in logps_options:
            for with_grad in (False, True):
                flags.append((kind, with_logps, with_grad, False))
                if kind == "none" and with_grad:
                    flags.append((kind, with_logps, with_grad, True))
    return flags


# A representative chunk for the report: Liger's vocabulary (128,256, a multiple of 16 like every
# real head, which Triton specializes on) and a ragged row count.
_REPORT_ROWS, _REPORT_VOCAB = 885, 128256


def launch_specializations():
    """One dict per kernel specialization the chunked backend can launch on CUDA: ``name``, ``fn``
    (the @triton.jit function), ``signature`` (argument → type string, as
    ``triton.compiler.ASTSource`` takes it), ``constexprs``, ``num_warps``, ``num_stages`` and,
    where Triton's binder is available, ``attrs`` (the divisibility it specializes on).

    Built by ``launch`` on meta tensors, as the dispatch builds its launches. The logits are float32
    (cuBLAS writes them in fp32); the dtype named is the inputs', the gradient's, written over them.
    """
    import torch

    try:
        from .tl_utils import jit_specialization
    except ImportError:  # an older tile-fused module: types without divisibility attributes
        jit_specialization = None
    if not hasattr(row_sweep_kernel, "params"):  # imported under TRITON_INTERPRET=1: no JIT binder
        jit_specialization = None
    rows, vocab = _REPORT_ROWS, _REPORT_VOCAB
    meta = dict(device="meta")
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        for kind, with_logps, with_grad, lse_given in specialization_flags():
            logits = torch.empty(rows, vocab, dtype=torch.float32, **meta)
            # The gradient over the logits: same buffer (fp32) or a strided half-width view of it.
            grad = logits if dtype == torch.float32 else torch.empty(rows, 2 * vocab, dtype=dtype, **meta)[:, :vocab]
            vector = torch.empty(rows, dtype=torch.float32, **meta)
            targets = torch.empty(rows, dtype=torch.int64, **meta)
            scalars = dict(inv_temp=1.0 / 1.7, inv_lp_temp=1.0, beta=0.5, log_beta=-0.69, log_one_minus_beta=-0.69,
                           s_scale=1.0, s_cap=30.0, t_scale=1.0, t_cap=30.0, r_scale=1.0, r_cap=30.0)
            args, constexprs, options = launch(
                logits, logits, logits, grad, targets, vector, vector, vector, vector, vector, rows, vocab, vocab,
                scalars, kind=kind, with_logps=with_logps, with_grad=with_grad, lse_given=lse_given)
            tags = [kind] + (["targets"] if with_logps and kind != "none" else []) + \
                (["grad"] if with_grad else []) + (["lse_given"] if lse_given else []) + [dtype_name]
            name = "row_sweep[" + ",".join(tags) + "]"
            if jit_specialization is not None:
                specs.append(jit_specialization(name, row_sweep_kernel, args, constexprs, **options))
                continue
            signature = {arg: _type_string(value) for arg, value in zip(row_sweep_kernel.arg_names, args)}
            signature.update({key: "constexpr" for key in constexprs})
            specs.append(dict(name=name, fn=row_sweep_kernel, signature=signature, constexprs=constexprs, **options))
    return specs


def _type_string(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                      torch.int64: "i64"}[value.dtype]
    return "fp32" if isinstance(value, float) else "i32"
