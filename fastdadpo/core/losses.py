"""Per-pair preference losses from sequence log-probs, unreduced (the contract the objectives and
users build on), and the per-sequence sums they take."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


# TRL 1.16's DPO loss types that are a formula on the margin h alone (its nca_pair, bco_pair's running
# mean, sppo_hard, aot's batch sort and apo_* need more than h, and are not offered).
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop")
SMOOTHED = ("sigmoid", "robust", "exo_pair")  # the loss types label_smoothing ε enters
DISCOPOP_TAU = 0.05  # DiscoPOP's modulation temperature τ: TRL's default discopop_tau


def loss_type_problem(loss_type: str, label_smoothing: float) -> Optional[Tuple[str, str]]:
    """(key, what is wrong) for the first bad one of these two settings, else None."""
    if loss_type not in LOSS_TYPES:
        return "loss_type", f"is {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}"
    if not (math.isfinite(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        return "label_smoothing", f"must be in [0, 0.5), got {label_smoothing}"
    if label_smoothing and loss_type not in SMOOTHED:
        return "label_smoothing", f"applies to loss_type {', '.join(SMOOTHED)}, not {loss_type!r}"
    if loss_type == "exo_pair" and not label_smoothing:
        return "label_smoothing", "must be > 0 for loss_type exo_pair (its target is (1−ε, ε); EXO suggests 1e-3)"
    return None


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """dDPO per pair, with h = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)] and z = β·h:
    ``sigmoid`` −(1−ε)·log σ(z) − ε·log σ(−z); ``ipo`` (h − 1/(2β))²; ``hinge`` relu(1 − z); ``robust``
    (−(1−ε)·log σ(z) + ε·log σ(−z)) / (1 − 2ε); ``exo_pair`` σ(z)·(log σ(z) − log(1−ε)) + σ(−z)·(log σ(−z)
    − log ε), ε > 0; ``discopop`` −log σ(z)·(1 − m) + e^(−z)·m, m = σ(z/τ), τ = ``DISCOPOP_TAU``."""
    _check_beta(beta, "beta")
    problem = loss_type_problem(loss_type, label_smoothing)
    if problem is not None:
        raise ValueError(" ".join(problem))
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    z, eps = beta * h, label_smoothing
    if loss_type == "sigmoid":
        return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    if loss_type == "robust":
        return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    if loss_type == "exo_pair":
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    modulation = torch.sigmoid(z / DISCOPOP_TAU)
    # e^(−z)·m as one exponent: finite where e^(−z) alone overflows (m is then ~0).
    return -F.logsigmoid(z) * (1.0 - modulation) + torch.exp(F.logsigmoid(z / DISCOPOP_TAU) - z)


def dadpo_margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 teacher_chosen_logps, teacher_rejected_logps, *, beta1: float, beta2: float) -> torch.Tensor:
    """(β1+β2)·[log π(y_c) − log π(y_r)] − β1·[log π_ref(y_c) − log π_ref(y_r)] − β2·[log π_te(y_c) − log π_te(y_r)]"""
    return ((beta1 + beta2) * (policy_chosen_logps - policy_rejected_logps)
            - beta1 * (reference_chosen_logps - reference_rejected_logps)
            - beta2 * (teacher_chosen_logps - teacher_rejected_logps))


def dadpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               teacher_chosen_logps, teacher_rejected_logps, *, beta1: float, beta2: float) -> torch.Tensor:
    """daDPO per pair: −log σ(margin), the Bradley–Terry loss of the optimum of
    E[r] − β1·KL(π‖π_ref) − β2·KL(π‖π_te). With β2 = 0 it is dDPO's sigmoid loss with β = β1."""
    _check_beta(beta1, "beta1")
    if not beta2 >= 0:
        raise ValueError(f"beta2 must be >= 0, got {beta2}")
    return -F.logsigmoid(dadpo_margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                      reference_rejected_logps, teacher_chosen_logps, teacher_rejected_logps,
                                      beta1=beta1, beta2=beta2))


def _check_beta(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def sequence_logps(token_logps: torch.Tensor, target_sequence: torch.Tensor, num_sequences: int,
                   response_tokens: Optional[torch.Tensor] = None, average: bool = False) -> torch.Tensor:
    """Σ_t log π(y_t) per sequence (token log-probs must be 0 off the responses); with
    ``average``, divided by each sequence's number of response tokens (the length-normalized variant)."""
    flat_sequence = target_sequence.reshape(-1)
    on_response = flat_sequence >= 0
    sums = token_logps.new_zeros(num_sequences, dtype=torch.float32).index_add(
        0, flat_sequence[on_response], token_logps.reshape(-1)[on_response].float())
    if average:
        if response_tokens is None:
            response_tokens = torch.bincount(flat_sequence[on_response], minlength=num_sequences)
        sums = sums / response_tokens.clamp(min=1).to(sums.dtype)
    return sums
