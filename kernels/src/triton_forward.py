"""Forward sweep: per-row online statistics over vocabulary tiles, never the full row.

Grid: (row blocks, vocabulary splits). Each program walks its split's tiles, computing the
student (and teacher, reference) logit tiles from the hidden rows and head weights, and keeps
streaming log-sum-exp statistics plus one kind-specific accumulator, all relative to the running
max so that nothing overflows. The host merges the splits (``triton_backend.merge_stats``).

Statistics written per (split, row), in the order of ``STATS`` below:
  logp:        max and sum of exp of the log-prob logits, the target's logit
  divergence:  student max/sum, teacher max/sum, the kind accumulator, reference max/sum,
               and for JSD's second pass the two KL(·‖m) sums.
The accumulators: forward KL Σ e^{t−m_t}(t − s); reverse KL Σ e^{s−m_s}(s − t);
advantage Σ e^{s−m_s}(t − r). JSD needs both normalizers before log m exists, so it takes a
second pass (PASS=2) that is given them.
"""
import triton
import triton.language as tl

from .tl_utils import (KIND_ADVANTAGE, KIND_FORWARD_KL, KIND_NONE, KIND_REVERSE_KL, logaddexp,
                       online_lse_update, tile_logits)

# The [NUM_STATS, splits, rows] statistics buffer holds one row per name, in this order; the kernel
# and the host (``int(STAT_X)``) index it through the STAT_* constants, derived from this tuple.
STATS = ("m_lp", "z_lp", "target",  # log-probs: max, Σexp, the target's logit
         "m_s", "z_s", "m_t", "z_t", "acc", "m_r", "z_r",  # divergence: normalizers, the kind accumulator
         "kl_teacher", "kl_student")  # JSD's second pass
NUM_STATS = len(STATS)
STAT_M_LP = tl.constexpr(STATS.index("m_lp"))
STAT_Z_LP = tl.constexpr(STATS.index("z_lp"))
STAT_TARGET = tl.constexpr(STATS.index("target"))
STAT_M_S = tl.constexpr(STATS.index("m_s"))
STAT_Z_S = tl.constexpr(STATS.index("z_s"))
STAT_M_T = tl.constexpr(STATS.index("m_t"))
STAT_Z_T = tl.constexpr(STATS.index("z_t"))
STAT_ACC = tl.constexpr(STATS.index("acc"))
STAT_M_R = tl.constexpr(STATS.index("m_r"))
STAT_Z_R = tl.constexpr(STATS.index("z_r"))
STAT_KL_TEACHER = tl.constexpr(STATS.index("kl_teacher"))
STAT_KL_STUDENT = tl.constexpr(STATS.index("kl_student"))


@triton.jit
def _store(stats_ptr, stat: tl.constexpr, pid_k, n_splits, n_rows, offs_n, row_ok, value):
    tl.store(stats_ptr + (stat * n_splits + pid_k) * n_rows + offs_n, value, mask=row_ok)


@triton.jit
def sweep_forward_kernel(
    s_hidden, s_weight, s_bias, t_hidden, t_weight, r_hidden, r_weight, targets, lse_s_in, lse_t_in, stats,
    n_rows, vocab_student, vocab_div, hs_size, ht_size, hr_size, n_tiles, tiles_per_split,
    inv_temp, inv_lp_temp, log_beta, log_one_minus_beta,
    KIND: tl.constexpr, PASS: tl.constexpr, WITH_LOGPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    neg_inf = float("-inf")
    zeros = tl.zeros((BLOCK_N,), dtype=tl.float32)

    m_lp = zeros + neg_inf
    z_lp = zeros
    target_logit = zeros
    m_s = zeros + neg_inf
    z_s = zeros
    m_t = zeros + neg_inf
    z_t = zeros
    m_r = zeros + neg_inf
    z_r = zeros
    acc = zeros
    kl_student = zeros
    if WITH_LOGPS:
        tgt = tl.load(targets + offs_n, mask=row_ok, other=-1)
    if PASS == 2:
        lse_s = tl.load(lse_s_in + offs_n, mask=row_ok, other=0.0)
        lse_t = tl.load(lse_t_in + offs_n, mask=row_ok, other=0.0)

    tile_start = pid_k * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, n_tiles)
    for tile in range(tile_start, tile_end):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        s_raw = tile_logits(s_hidden, s_weight, offs_n, offs_v, n_rows, vocab_student, hs_size,
                            BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        if HAS_BIAS:
            s_raw += tl.load(s_bias + offs_v, mask=offs_v < vocab_student, other=0.0).to(tl.float32)[None, :]
        if WITH_LOGPS:
            lp = tl.where((offs_v < vocab_student)[None, :], s_raw * inv_lp_temp, neg_inf)
            m_lp, z_lp, _ = online_lse_update(m_lp, z_lp, lp)
            target_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], lp, 0.0), axis=1)
        if KIND != KIND_NONE:
            if tile * BLOCK_V < vocab_div:
                div_ok = (offs_v < vocab_div)[None, :]
                # "safe" copies are 0 where masked (for differences), the others −inf (for exp).
                s_safe = tl.where(div_ok, s_raw * inv_temp, 0.0)
                s = tl.where(div_ok, s_safe, neg_inf)
                t_safe = tl.where(div_ok, tile_logits(t_hidden, t_weight, offs_n, offs_v, n_rows, vocab_div, ht_size,
                                                      BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION) * inv_temp, 0.0)
                t = tl.where(div_ok, t_safe, neg_inf)
                if PASS == 1:
                    m_s, z_s, rescale_s = online_lse_update(m_s, z_s, s)
                    m_t, z_t, rescale_t = online_lse_update(m_t, z_t, t)
                    if KIND == KIND_FORWARD_KL:
                        acc = acc * rescale_t + tl.sum(tl.exp(t - m_t[:, None]) * (t_safe - s_safe), axis=1)
                    elif KIND == KIND_REVERSE_KL:
                        acc = acc * rescale_s + tl.sum(tl.exp(s - m_s[:, None]) * (s_safe - t_safe), axis=1)
                    elif KIND == KIND_ADVANTAGE:
                        r_safe = tl.where(div_ok, tile_logits(r_hidden, r_weight, offs_n, offs_v, n_rows, vocab_div,
                                                              hr_size, BLOCK_N, BLOCK_V, BLOCK_H,
                                                              DOT_PRECISION) * inv_temp, 0.0)
                        m_r, z_r, _ = online_lse_update(m_r, z_r, tl.where(div_ok, r_safe, neg_inf))
                        acc = acc * rescale_s + tl.sum(tl.exp(s - m_s[:, None]) * (t_safe - r_safe), axis=1)
                else:  # JSD, second pass: both normalizers known.
                    log_p = s_safe - lse_s[:, None]
                    log_q = t_safe - lse_t[:, None]
                    log_m = logaddexp(log_beta + log_q, log_one_minus_beta + log_p)
                    acc += tl.sum(tl.where(div_ok, tl.exp(log_q) * (log_q - log_m), 0.0), axis=1)
                    kl_student += tl.sum(tl.where(div_ok, tl.exp(log_p) * (log_p - log_m), 0.0), axis=1)

    if WITH_LOGPS:
        _store(stats, STAT_M_LP, pid_k, n_splits, n_rows, offs_n, row_ok, m_lp)
        _store(stats, STAT_Z_LP, pid_k, n_splits, n_rows, offs_n, row_ok, z_lp)
        _store(stats, STAT_TARGET, pid_k, n_splits, n_rows, offs_n, row_ok, target_logit)
    if KIND != KIND_NONE:
        if PASS == 1:
            _store(stats, STAT_M_S, pid_k, n_splits, n_rows, offs_n, row_ok, m_s)
            _store(stats, STAT_Z_S, pid_k, n_splits, n_rows, offs_n, row_ok, z_s)
            _store(stats, STAT_M_T, pid_k, n_splits, n_rows, offs_n, row_ok, m_t)
            _store(stats, STAT_Z_T, pid_k, n_splits, n_rows, offs_n, row_ok, z_t)
            _store(stats, STAT_ACC, pid_k, n_splits, n_rows, offs_n, row_ok, acc)
            if KIND == KIND_ADVANTAGE:
                _store(stats, STAT_M_R, pid_k, n_splits, n_rows, offs_n, row_ok, m_r)
                _store(stats, STAT_Z_R, pid_k, n_splits, n_rows, offs_n, row_ok, z_r)
        else:
            _store(stats, STAT_KL_TEACHER, pid_k, n_splits, n_rows, offs_n, row_ok, acc)
            _store(stats, STAT_KL_STUDENT, pid_k, n_splits, n_rows, offs_n, row_ok, kl_student)
