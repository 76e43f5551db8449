"""Backward sweep: recompute each logit tile, form d(loss)/d(logits) for it, and push it straight
into the hidden-state and weight gradients; the tile is never written to memory.

Grid: (row blocks, vocabulary tiles). Each program owns one [BLOCK_N, BLOCK_V] tile, so the
gradients of its rows (dh) and of its vocabulary rows (dW) receive contributions from many
programs: both are float32 buffers updated with atomic adds (as Cut Cross-Entropy does). The
per-row statistics the forward saved (log-normalizers, the divergence itself) make every tile
independent of the others.

d(loss)/d(student logit), per output, for upstream gradients g (before the 1/T of the logit scale):
  log-prob       g·(onehot(target) − softmax)
  forward KL     g·(p − q)
  reverse KL     g·p·(log p − log q − KL(p‖q))
  JSD(β)         g·(1−β)·p·(log p − log m − KL(p‖m))
  advantage      g·p·(a − A),  a = log p_t − log p_r,  A = Σ p·a
"""
import triton
import triton.language as tl

from .tl_utils import (KIND_FORWARD_KL, KIND_JSD, KIND_NONE, KIND_REVERSE_KL, logaddexp,
                       tile_logits)


@triton.jit
def sweep_backward_kernel(
    s_hidden, s_weight, s_bias, t_hidden, t_weight, r_hidden, r_weight, targets,
    lse_lp, lse_s, lse_t, lse_r, div_value, kl_student, g_div, g_lp,
    grad_hidden, grad_weight, grad_bias,
    n_rows, vocab_student, vocab_div, hs_size, ht_size, hr_size,
    inv_temp, inv_lp_temp, beta, log_beta, log_one_minus_beta,
    KIND: tl.constexpr, WITH_LOGPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < n_rows
    col_ok = offs_v < vocab_student

    s_raw = tile_logits(s_hidden, s_weight, offs_n, offs_v, n_rows, vocab_student, hs_size,
                        BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    if HAS_BIAS:
        s_raw += tl.load(s_bias + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    grad_logits = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)

    if WITH_LOGPS:
        g = tl.load(g_lp + offs_n, mask=row_ok, other=0.0)
        lse = tl.load(lse_lp + offs_n, mask=row_ok, other=0.0)
        tgt = tl.load(targets + offs_n, mask=row_ok, other=-1)
        probs = tl.where(col_ok[None, :], tl.exp(s_raw * inv_lp_temp - lse[:, None]), 0.0)
        onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
        grad_logits += (g * inv_lp_temp)[:, None] * (onehot - probs)

    if KIND != KIND_NONE:
        if pid_v * BLOCK_V < vocab_div:
            div_ok = (offs_v < vocab_div)[None, :]
            g = tl.load(g_div + offs_n, mask=row_ok, other=0.0)
            log_p = tl.where(div_ok, s_raw * inv_temp, 0.0) - tl.load(lse_s + offs_n, mask=row_ok, other=0.0)[:, None]
            p = tl.where(div_ok, tl.exp(log_p), 0.0)
            t_raw = tile_logits(t_hidden, t_weight, offs_n, offs_v, n_rows, vocab_div, ht_size,
                                BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            log_q = tl.where(div_ok, t_raw * inv_temp, 0.0) - tl.load(lse_t + offs_n, mask=row_ok, other=0.0)[:, None]
            if KIND == KIND_FORWARD_KL:
                d = p - tl.where(div_ok, tl.exp(log_q), 0.0)
            elif KIND == KIND_REVERSE_KL:
                kl = tl.load(div_value + offs_n, mask=row_ok, other=0.0)
                d = p * (log_p - log_q - kl[:, None])
            elif KIND == KIND_JSD:
                kl = tl.load(kl_student + offs_n, mask=row_ok, other=0.0)
                log_m = logaddexp(log_beta + log_q, log_one_minus_beta + log_p)
                d = (1.0 - beta) * p * (log_p - log_m - kl[:, None])
            else:  # KIND_ADVANTAGE
                adv = tl.load(div_value + offs_n, mask=row_ok, other=0.0)
                r_raw = tile_logits(r_hidden, r_weight, offs_n, offs_v, n_rows, vocab_div, hr_size,
                                    BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
                log_r = tl.where(div_ok, r_raw * inv_temp, 0.0) - tl.load(lse_r + offs_n, mask=row_ok, other=0.0)[:, None]
                d = p * ((log_q - log_r) - adv[:, None])
            grad_logits += tl.where(div_ok, (g * inv_temp)[:, None] * d, 0.0)

    if HAS_BIAS:  # before the H loops, so that the float32 tile is dead during them
        tl.atomic_add(grad_bias + offs_v, tl.sum(grad_logits, axis=0), mask=col_ok)
    grad_lo = grad_logits.to(s_weight.dtype.element_ty)
    # Two loops over H rather than one: each holds one layout of the gradient tile (as is, and
    # transposed) and one accumulator, which keeps the kernel within the register file on sm_80.
    for h0 in range(0, hs_size, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < hs_size
        w = tl.load(s_weight + offs_v[:, None] * hs_size + offs_h[None, :], mask=col_ok[:, None] & h_ok[None, :],
                    other=0.0)
        tl.atomic_add(grad_hidden + offs_n[:, None] * hs_size + offs_h[None, :],
                      tl.dot(grad_lo, w, input_precision=DOT_PRECISION), mask=row_ok[:, None] & h_ok[None, :])
    grad_lo_t = tl.trans(grad_lo)
    for h0 in range(0, hs_size, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < hs_size
        hid = tl.load(s_hidden + offs_n[:, None] * hs_size + offs_h[None, :], mask=row_ok[:, None] & h_ok[None, :],
                      other=0.0)
        tl.atomic_add(grad_weight + offs_v[:, None] * hs_size + offs_h[None, :],
                      tl.dot(grad_lo_t, hid, input_precision=DOT_PRECISION), mask=col_ok[:, None] & h_ok[None, :])
