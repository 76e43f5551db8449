"""The training objectives (see ../shared/design/OBJECTIVES.md), on top of the fused kernels.

Two layers:

* ``dpo_loss`` and ``dadpo_loss``: per-pair losses from sequence log-probs, unreduced (the contract).
* ``Objective`` subclasses, one per ``objective.name``: given a micro-batch's student hidden states,
  the student's (gathered) LM head, the teacher's where needed, and the cached sequence log-probs,
  they return the loss and the metrics. One student sweep over the vocabulary serves both the token
  log-probs (DPO and CE terms) and the divergence (KD and KL terms) where an objective needs both.

Reductions are global: a token mean divides by the number of such tokens in the whole optimizer
step (all micro-batches, all ranks), a pair mean by the number of pairs, given in ``Normalizers``.
So each micro-batch returns its *contribution* to the step's loss and metrics, and contributions
add up: 2 ranks x micro-batch 1 compute exactly what 1 rank x micro-batch 2 computes.

Batch layout (``fastdadpo.data.collate``): sequences 0..B-1 are the chosen responses, B..2B-1 the
rejected ones (pair i = sequences i and B+i); ``targets`` are pre-shifted (hidden state [r, t]
predicts ``targets[r, t]``, -100 off the responses) and ``target_sequence`` says whose they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from fastdadpo.kernels import (fused_linear_advantage, fused_linear_divergence,
                               fused_linear_logprobs)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
IGNORE_INDEX = -100


# --- per-pair losses (the contract) ------------------------------------------------------------------------

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


# --- objectives --------------------------------------------------------------------------------------------

@dataclass
class Head:
    """A model's final hidden states for the micro-batch and its LM-head weight."""

    hidden: torch.Tensor
    weight: torch.Tensor


@dataclass
class Normalizers:
    """Counts over the whole optimizer step (all micro-batches, all ranks)."""

    pairs: float = 1.0
    chosen_tokens: float = 1.0
    rejected_tokens: float = 1.0

    @property
    def response_tokens(self) -> float:
        return self.chosen_tokens + self.rejected_tokens


@dataclass
class StepInputs:
    student: Head
    targets: torch.Tensor  # [R, T] pre-shifted, -100 off the responses
    target_sequence: torch.Tensor  # [R, T] sequence index of each target, -1 off the responses
    num_pairs: int  # B: sequences 0..B-1 chosen, B..2B-1 rejected (0 rejected in chosen-only batches)
    num_sequences: int
    normalizers: Normalizers
    vocab_size: int  # the shared tokenizer's vocabulary (divergences are over its rows)
    teacher: Optional[Head] = None
    teacher_reference: Optional[Head] = None
    reference_logps: Optional[torch.Tensor] = None  # [S] cached Σ log π_ref (sums)
    teacher_logps: Optional[torch.Tensor] = None  # [S] cached Σ log π_te (sums)
    response_tokens: Optional[torch.Tensor] = None  # [S]

    def chosen_rows(self) -> torch.Tensor:
        return (self.target_sequence >= 0) & (self.target_sequence < self.num_pairs)

    def rejected_rows(self) -> torch.Tensor:
        return self.target_sequence >= self.num_pairs

    def response_rows(self) -> torch.Tensor:
        return self.target_sequence >= 0


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # this micro-batch's contribution to the step's loss (differentiable)
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # contributions, detached


class Objective:
    name = ""
    needs_teacher = False  # teacher hidden states online, every step
    needs_teacher_reference = False  # ADPA's second teacher online
    needs_reference_logps = False  # cached Σ log π_ref per sequence
    needs_teacher_logps = False  # cached Σ log π_te per sequence
    uses_rejected = True  # batches carry the rejected responses

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _weights(rows: torch.Tensor, value: float) -> torch.Tensor:
    return rows.to(torch.float32) * value


def _pair_metrics(prefix_reward: torch.Tensor, chosen_logps, rejected_logps, num_pairs: int,
                  pairs: float) -> Dict[str, torch.Tensor]:
    """Reward metrics from per-sequence implicit rewards [S] (chosen first, then rejected)."""
    rewards_chosen, rewards_rejected = prefix_reward[:num_pairs], prefix_reward[num_pairs:2 * num_pairs]
    margin = rewards_chosen - rewards_rejected
    return {
        "rewards/chosen": rewards_chosen.sum() / pairs,
        "rewards/rejected": rewards_rejected.sum() / pairs,
        "rewards/margin": margin.sum() / pairs,
        "rewards/accuracy": (margin > 0).float().sum() / pairs,
        "logps/chosen": chosen_logps.sum() / pairs,
        "logps/rejected": rejected_logps.sum() / pairs,
    }


class SFT(Objective):
    """dSFT: −mean_t log π_θ(y^t_t) over the chosen (teacher) responses."""

    name = "sft"
    uses_rejected = False

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        chosen = inputs.chosen_rows()
        weights = _weights(chosen, -1.0 / inputs.normalizers.chosen_tokens)
        logps = fused_linear_logprobs(inputs.student.hidden, inputs.student.weight,
                                      torch.where(chosen, inputs.targets, IGNORE_INDEX), grad_weights=weights)
        loss = (logps * weights).sum()
        sums = sequence_logps(logps.detach(), inputs.target_sequence, inputs.num_sequences)
        pairs = inputs.normalizers.pairs
        return ObjectiveOutput(loss, {"loss": loss.detach(), "logps/chosen": sums[:inputs.num_pairs].sum() / pairs})


class KD(Objective):
    """Token-level KD: mean_t D(π_te‖π_θ) over the chosen responses + λ_ce·sft, one sweep."""

    name = "kd"
    needs_teacher = True
    uses_rejected = False

    def __init__(self, kind: str = "forward_kl", jsd_beta: float = 0.5, temperature: float = 1.0,
                 ce_weight: float = 0.0):
        self.kind, self.jsd_beta, self.temperature, self.ce_weight = kind, jsd_beta, temperature, ce_weight

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        chosen = inputs.chosen_rows()
        norm = inputs.normalizers
        div_weights = _weights(chosen, 1.0 / norm.chosen_tokens)
        logp_weights = _weights(chosen, -self.ce_weight / norm.chosen_tokens)
        div, logps = fused_linear_divergence(
            inputs.student.hidden, inputs.student.weight, inputs.teacher.hidden, inputs.teacher.weight,
            kind=self.kind, beta=self.jsd_beta, temperature=self.temperature, mask=chosen,
            targets=torch.where(chosen, inputs.targets, IGNORE_INDEX), vocab_size=inputs.vocab_size,
            grad_weights=div_weights, logp_grad_weights=logp_weights)
        divergence = (div * div_weights).sum()
        cross_entropy = -(logps * _weights(chosen, 1.0 / norm.chosen_tokens)).sum()
        loss = divergence + self.ce_weight * cross_entropy
        sums = sequence_logps(logps.detach(), inputs.target_sequence, inputs.num_sequences)
        return ObjectiveOutput(loss, {"loss": loss.detach(), "kd/divergence": divergence.detach(),
                                      "sft/ce": cross_entropy.detach(),
                                      "logps/chosen": sums[:inputs.num_pairs].sum() / norm.pairs})


class DPO(Objective):
    """dDPO (Zephyr) on cached reference log-probs."""

    name = "dpo"
    needs_reference_logps = True

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 average_logps: bool = False):
        self.beta, self.loss_type, self.label_smoothing, self.average_logps = beta, loss_type, label_smoothing, \
            average_logps

    def _policy_logps(self, inputs: StepInputs, token_logps: torch.Tensor):
        return sequence_logps(token_logps, inputs.target_sequence, inputs.num_sequences, inputs.response_tokens,
                              average=self.average_logps)

    def _reference(self, inputs: StepInputs, cached: torch.Tensor) -> torch.Tensor:
        if self.average_logps:
            return cached / inputs.response_tokens.clamp(min=1).to(cached.dtype)
        return cached

    def _pair_loss(self, inputs: StepInputs, policy: torch.Tensor):
        """Per-pair loss and per-sequence implicit rewards."""
        b = inputs.num_pairs
        reference = self._reference(inputs, inputs.reference_logps)
        losses = dpo_loss(policy[:b], policy[b:], reference[:b], reference[b:], beta=self.beta,
                          loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        return losses, self.beta * (policy - reference).detach()

    def _token_terms(self, inputs: StepInputs):
        """Token log-probs, plus any token-level loss term and its metrics from the same sweep."""
        logps = fused_linear_logprobs(inputs.student.hidden, inputs.student.weight, inputs.targets)
        return logps, None, {}

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        token_logps, token_loss, metrics = self._token_terms(inputs)
        policy = self._policy_logps(inputs, token_logps)
        losses, rewards = self._pair_loss(inputs, policy)
        loss = losses.sum() / inputs.normalizers.pairs
        metrics.update(_pair_metrics(rewards, policy[:inputs.num_pairs].detach(),
                                     policy[inputs.num_pairs:].detach(), inputs.num_pairs, inputs.normalizers.pairs))
        if token_loss is not None:
            loss = loss + token_loss
        metrics["loss"] = loss.detach()
        return ObjectiveOutput(loss, metrics)


class DaDPO(DPO):
    """daDPO: DPO whose per-pair target margin comes from the teacher's cached sequence log-probs."""

    name = "dadpo"
    needs_teacher_logps = True

    def __init__(self, beta1: float = 0.1, beta2: float = 0.1, average_logps: bool = False):
        super().__init__(beta=beta1, average_logps=average_logps)
        self.beta1, self.beta2 = beta1, beta2

    def _pair_loss(self, inputs: StepInputs, policy: torch.Tensor):
        b = inputs.num_pairs
        reference = self._reference(inputs, inputs.reference_logps)
        teacher = self._reference(inputs, inputs.teacher_logps)
        losses = dadpo_loss(policy[:b], policy[b:], reference[:b], reference[b:], teacher[:b], teacher[b:],
                            beta1=self.beta1, beta2=self.beta2)
        # Per-sequence implicit reward (β1+β2)·log π − β1·log π_ref − β2·log π_te: chosen − rejected is the margin.
        rewards = (self.beta1 + self.beta2) * policy - self.beta1 * reference - self.beta2 * teacher
        return losses, rewards.detach()


class DaDPOToken(DPO):
    """dDPO + α·mean_t D(π_te‖π_θ) over the response tokens of chosen and rejected, one sweep."""

    name = "dadpo_token"
    needs_teacher = True

    def __init__(self, beta: float = 0.1, alpha: float = 0.1, kind: str = "forward_kl", jsd_beta: float = 0.5,
                 temperature: float = 1.0, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 average_logps: bool = False):
        super().__init__(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         average_logps=average_logps)
        self.alpha, self.kind, self.jsd_beta, self.temperature = alpha, kind, jsd_beta, temperature

    def _token_terms(self, inputs: StepInputs):
        responses = inputs.response_rows()
        token_mean = _weights(responses, 1.0 / inputs.normalizers.response_tokens)
        div, logps = fused_linear_divergence(
            inputs.student.hidden, inputs.student.weight, inputs.teacher.hidden, inputs.teacher.weight,
            kind=self.kind, beta=self.jsd_beta, temperature=self.temperature, mask=responses,
            targets=inputs.targets, vocab_size=inputs.vocab_size, grad_weights=token_mean)
        divergence = (div * token_mean).sum()
        return logps, self.alpha * divergence, {"kd/divergence": divergence.detach()}


class DCKD(Objective):
    """Dual-constrained KD (ADPA paper): sft + λ_c·mean KL(π_te‖π_θ)|chosen + λ_r·mean KL|rejected, one sweep."""

    name = "dckd"
    needs_teacher = True

    def __init__(self, lambda_chosen: float = 0.1, lambda_rejected: float = 0.1, kind: str = "forward_kl",
                 jsd_beta: float = 0.5, temperature: float = 1.0):
        self.lambda_chosen, self.lambda_rejected = lambda_chosen, lambda_rejected
        self.kind, self.jsd_beta, self.temperature = kind, jsd_beta, temperature

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        norm = inputs.normalizers
        chosen, rejected = inputs.chosen_rows(), inputs.rejected_rows()
        div_weights = (_weights(chosen, self.lambda_chosen / norm.chosen_tokens)
                       + _weights(rejected, self.lambda_rejected / max(norm.rejected_tokens, 1.0)))
        ce_weights = _weights(chosen, -1.0 / norm.chosen_tokens)
        div, logps = fused_linear_divergence(
            inputs.student.hidden, inputs.student.weight, inputs.teacher.hidden, inputs.teacher.weight,
            kind=self.kind, beta=self.jsd_beta, temperature=self.temperature, mask=chosen | rejected,
            targets=torch.where(chosen, inputs.targets, IGNORE_INDEX), vocab_size=inputs.vocab_size,
            grad_weights=div_weights, logp_grad_weights=ce_weights)
        sft = (logps * ce_weights).sum()
        kl_chosen = (div * _weights(chosen, 1.0 / norm.chosen_tokens)).sum()
        kl_rejected = (div * _weights(rejected, 1.0 / max(norm.rejected_tokens, 1.0))).sum()
        loss = sft + self.lambda_chosen * kl_chosen + self.lambda_rejected * kl_rejected
        sums = sequence_logps(logps.detach(), inputs.target_sequence, inputs.num_sequences)
        return ObjectiveOutput(loss, {"loss": loss.detach(), "sft/ce": sft.detach(),
                                      "kd/divergence": (kl_chosen * norm.chosen_tokens
                                                        + kl_rejected * norm.rejected_tokens).detach()
                                      / norm.response_tokens,
                                      "kd/divergence_chosen": kl_chosen.detach(),
                                      "kd/divergence_rejected": kl_rejected.detach(),
                                      "logps/chosen": sums[:inputs.num_pairs].sum() / norm.pairs})


class ADPA(Objective):
    """ADPA: sft on the chosen responses − γ·mean over the student's own response (the rejected
    field) of Σ_a π_θ(a|s_t)·[log π_te(a|s_t) − log π_te_ref(a|s_t)]."""

    name = "adpa"
    needs_teacher = True
    needs_teacher_reference = True

    def __init__(self, gamma: float = 1.6, temperature: float = 1.0):
        self.gamma, self.temperature = gamma, temperature

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        norm = inputs.normalizers
        chosen, rejected = inputs.chosen_rows(), inputs.rejected_rows()
        ce_weights = _weights(chosen, -1.0 / norm.chosen_tokens)
        adv_weights = _weights(rejected, -self.gamma / max(norm.rejected_tokens, 1.0))
        logps = fused_linear_logprobs(inputs.student.hidden, inputs.student.weight,
                                      torch.where(chosen, inputs.targets, IGNORE_INDEX), grad_weights=ce_weights)
        advantage = fused_linear_advantage(
            inputs.student.hidden, inputs.student.weight, inputs.teacher.hidden, inputs.teacher.weight,
            inputs.teacher_reference.hidden, inputs.teacher_reference.weight, temperature=self.temperature,
            mask=rejected, vocab_size=inputs.vocab_size, grad_weights=adv_weights)
        sft = (logps * ce_weights).sum()
        mean_advantage = (advantage * _weights(rejected, 1.0 / max(norm.rejected_tokens, 1.0))).sum()
        loss = sft - self.gamma * mean_advantage
        sums = sequence_logps(logps.detach(), inputs.target_sequence, inputs.num_sequences)
        return ObjectiveOutput(loss, {"loss": loss.detach(), "sft/ce": sft.detach(),
                                      "adpa/advantage": mean_advantage.detach(),
                                      "logps/chosen": sums[:inputs.num_pairs].sum() / norm.pairs})


OBJECTIVES = {cls.name: cls for cls in (SFT, KD, DPO, DaDPO, DaDPOToken, DCKD, ADPA)}
