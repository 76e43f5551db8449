"""Per-pair preference losses from sequence log-probs, unreduced (the contract the objectives and
users build on), and the per-sequence sums they take."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """dDPO per pair, with h = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)]:
    ``sigmoid`` −(1−ε)·log σ(β·h) − ε·log σ(−β·h); ``ipo`` (h − 1/(2β))²; ``hinge`` relu(1 − β·h)."""
    _check_beta(beta, "beta")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type!r}")
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    return torch.relu(1.0 - beta * h)


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
