"""Small Triton helpers shared by the forward and backward kernels."""
import triton
import triton.language as tl

from .sweep import SWEEP_KINDS

# A sweep kind's code (the kernels' KIND constexpr) is its position in SWEEP_KINDS; the kernels
# name the codes through the constants below, derived from that one definition.
KIND_CODES = {kind: code for code, kind in enumerate(SWEEP_KINDS)}
KIND_NONE = tl.constexpr(KIND_CODES["none"])
KIND_FORWARD_KL = tl.constexpr(KIND_CODES["forward_kl"])
KIND_REVERSE_KL = tl.constexpr(KIND_CODES["reverse_kl"])
KIND_JSD = tl.constexpr(KIND_CODES["jsd"])
KIND_ADVANTAGE = tl.constexpr(KIND_CODES["advantage"])


def jit_specialization(name: str, kernel, args: tuple, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """A launch ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)`` as Triton's JIT
    specializes it (argument types; pointers and integers flagged divisible by 16 where they are:
    that decides whether loads vectorize and pipeline), in the form ``triton.compile(ASTSource(fn,
    signature, constexprs, attrs))`` takes; for the compile report and test. ``args`` may be meta
    tensors: their data pointer (0) is aligned, as the CUDA caching allocator's are. Uses the
    JIT's own binder (Triton 3.9 internals), so the variant compiled is the one launched."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))  # divisibility rules are the same on every target
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    bound, specialization, _ = binder(*args, **constexprs)
    _, signature, constexpr_values, attrs = kernel._pack_args(backend, options, bound, specialization, None)
    return dict(name=name, fn=kernel, signature=signature, constexprs=constexpr_values, attrs=attrs, **options)


@triton.jit
def tile_logits(hidden_ptr, weight_ptr, offs_n, offs_v, n_rows, n_cols, hidden_size,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """[BLOCK_N, BLOCK_V] float32 tile of hidden[offs_n] @ weight[offs_v].T, looping over H."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_ok = offs_n < n_rows
    col_ok = offs_v < n_cols
    for h0 in range(0, hidden_size, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < hidden_size
        hid = tl.load(hidden_ptr + offs_n[:, None] * hidden_size + offs_h[None, :],
                      mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        wt = tl.load(weight_ptr + offs_v[:, None] * hidden_size + offs_h[None, :],
                     mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(hid, tl.trans(wt), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def online_lse_update(m, z, x):
    """Streaming log-sum-exp over tiles: returns the new (max, Σ exp(x − max)) and the rescale.

    Masked entries of ``x`` must be −inf. ``m`` starts at −inf and ``z`` at 0; every tile the
    kernels feed here has at least one finite entry per row, so the new max is finite.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    rescale = tl.exp(m - m_new)
    z_new = z * rescale + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
    return m_new, z_new, rescale


@triton.jit
def logaddexp(a, b):
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
