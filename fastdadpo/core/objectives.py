"""The training objectives, on top of the fused kernels and the per-pair losses (``losses``).

``Objective`` subclasses, one per ``objective.name``, each a frozen dataclass whose fields are its
parameters (default, meaning and source in the field's metadata, validation in ``__post_init__``)
and whose ``needs()`` says, in one value, what it needs (``step.Needs``: the models online every
step, the sequence log-prob tables cached before training, the data fields it reads, and the kernel
calls of one micro-batch, for the planner). The trainer, the precompute, the planner, the recipe
runner and the config read that and nothing else, so a new objective is its class and one
``register_objective`` call. The config's ``objective:`` section parses into exactly one of them, so a
parameter another objective uses is an error, not a silently ignored key. Called with a
micro-batch's ``StepInputs`` (the student's final hidden states and gathered LM head, the
teachers' where needed, the cached sequence log-probs) they return the loss and the metrics. One
student sweep over the vocabulary serves both the token log-probs (DPO and CE terms) and the
divergence (KD and KL terms) where an objective needs both.

Reductions are global: a token mean divides by the number of such tokens in the whole optimizer
step (all micro-batches, all ranks), a pair mean by the number of pairs, given in ``Normalizers``.
So each micro-batch returns its *contribution* to the step's loss and metrics, and contributions
add up: 2 ranks x micro-batch 1 compute exactly what 1 rank x micro-batch 2 computes.

The batch layout (pair i is sequences i and B+i) is ``fastdadpo.core.batch.Batch``'s to know; objectives
ask it for chosen, rejected and response rows and for the chosen/rejected halves of per-sequence values.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Tuple

import torch

from fastdadpo.core.losses import LOSS_TYPES, dadpo_loss, dpo_loss, loss_type_problem, sequence_logps
from fastdadpo.core.step import KernelCall, Needs, ObjectiveOutput, StepInputs
from fastdadpo.kernels import (APPROXIMATIONS, DIVERGENCE_KINDS, IGNORE_INDEX, RELEASE_TOP_K, fused_linear_advantage,
                               fused_linear_divergence, fused_linear_logprobs)


# Sources of the defaults. Zephyr = Tunstall et al. 2023 (dSFT, dDPO); ADPA = Gao, Wan et al.,
# ICLR 2025 (arXiv 2502.17927): its paper, and its authors' released training scripts (DCKD and ADPA
# at lr 5e-7, cosine, warmup 0.1, one epoch; λ_c = λ_r = 0.1; γ = 1.6).
ZEPHYR_DSFT, ZEPHYR_DDPO = "Zephyr dSFT", "Zephyr dDPO"
ADPA_RELEASE, ADPA_PAPER = "ADPA's released recipe", "the ADPA paper's DCKD"
EXACT = "the paper's formula, over the full vocabulary"
UNPUBLISHED = "no published value in our sources; tune"


# --- parameters --------------------------------------------------------------------------------------------

class ParameterError(ValueError):
    """A bad objective parameter; ``key`` names it (the config adds the section and the file)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message


def parameter(default, doc: str, source: str):
    """An objective's parameter: its default, what it means, and where the default comes from."""
    return field(default=default, metadata={"doc": doc, "source": source})


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ParameterError(key, message)


def _positive(objective, *keys: str) -> None:
    for key in keys:
        value = getattr(objective, key)
        _check(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")


def _non_negative(objective, *keys: str) -> None:
    for key in keys:
        value = getattr(objective, key)
        _check(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0, got {value}")


# --- objectives --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """Base of every objective: what it needs, its default learning rate, and its parameters (the
    dataclass fields of the subclass)."""

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""  # the loss, for the README's table
    default_lr: ClassVar[float] = 2e-5  # train.lr when unset
    lr_source: ClassVar[str] = ZEPHYR_DSFT
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises ``ParameterError`` naming the first bad parameter."""

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        raise NotImplementedError

    def needs(self) -> Needs:
        """What this objective needs (the one place it says so)."""
        raise NotImplementedError

    @classmethod
    def parameters(cls) -> Tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    def required_models(self) -> Tuple[str, ...]:
        """The ``model.*`` keys this objective cannot run without."""
        return self.needs().models

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


def _weights(rows: torch.Tensor, value: float) -> torch.Tensor:
    return rows.to(torch.float32) * value


def _chosen_logps_metric(inputs: StepInputs, token_logps: torch.Tensor) -> torch.Tensor:
    """Σ over pairs of the chosen sequences' log-probs, over the step's pairs."""
    sums = sequence_logps(token_logps.detach(), inputs.batch.target_sequence, inputs.batch.num_sequences)
    return inputs.batch.split_pairs(sums)[0].sum() / inputs.normalizers.pairs


def _pair_metrics(rewards: torch.Tensor, policy_logps: torch.Tensor, inputs: StepInputs) -> Dict[str, torch.Tensor]:
    """Reward metrics from per-sequence implicit rewards and policy log-probs [S]."""
    pairs = inputs.normalizers.pairs
    rewards_chosen, rewards_rejected = inputs.batch.split_pairs(rewards)
    chosen_logps, rejected_logps = inputs.batch.split_pairs(policy_logps.detach())
    margin = rewards_chosen - rewards_rejected
    return {
        "rewards/chosen": rewards_chosen.sum() / pairs,
        "rewards/rejected": rewards_rejected.sum() / pairs,
        "rewards/margin": margin.sum() / pairs,
        "rewards/accuracy": (margin > 0).float().sum() / pairs,
        "logps/chosen": chosen_logps.sum() / pairs,
        "logps/rejected": rejected_logps.sum() / pairs,
    }


@dataclass(frozen=True)
class _DivergenceTerm(Objective):
    """The per-token divergence D between the teacher's and the student's next-token distributions."""

    kind: str = parameter("forward_kl", "forward_kl = KL(π_te‖π_θ), reverse_kl = KL(π_θ‖π_te), or jsd",
                          "forward KL, the KD of Hinton et al. 2015")
    jsd_beta: float = parameter(0.5, "jsd only: the teacher's weight in the mixture m = β·π_te + (1−β)·π_θ",
                                "the symmetric JSD")
    temperature: float = parameter(1.0, "divides both models' logits", "1: logits as they are")

    def validate(self) -> None:
        super().validate()
        _check(self.kind in DIVERGENCE_KINDS, "kind", f"is {self.kind!r}; choose one of {', '.join(DIVERGENCE_KINDS)}")
        _check(math.isfinite(self.jsd_beta) and 0 < self.jsd_beta < 1, "jsd_beta",
               f"must be in (0, 1), got {self.jsd_beta}")
        _check(self.kind == "jsd" or self.jsd_beta == 0.5, "jsd_beta", f"applies to kind jsd only, not {self.kind!r}")
        _positive(self, "temperature")

    def _kernel_options(self) -> dict:
        """Further keyword arguments of its kernel calls (``_Approximation``'s)."""
        return {}

    def _divergence_call(self, rows: str) -> KernelCall:
        return KernelCall(rows, teachers=1, reduced=True, jsd=self.kind == "jsd")

    def _divergence(self, inputs: StepInputs, mask, targets, weights, logp_weights=None):
        """One sweep: ``Reduced(loss = Σ weights·D + Σ logp_weights·log π_θ(target), values = the
        per-token divergence, logps = the student's token log-probs of ``targets``)``; the log-probs
        stay per row and differentiable without ``logp_weights``."""
        return fused_linear_divergence(
            inputs.student.hidden, inputs.student.weight, inputs.teacher.hidden, inputs.teacher.weight,
            kind=self.kind, beta=self.jsd_beta, temperature=self.temperature, mask=mask, targets=targets,
            vocab_size=inputs.vocab_size, weights=weights, logp_weights=logp_weights, **self._kernel_options(),
            **inputs.student_options(), **inputs.teacher.logit_options("teacher_"))


@dataclass(frozen=True)
class _Approximation(Objective):
    """ADPA's terms exact, or by the released code's top-k formulas (the kernels' ``approximation``)."""

    approximation: str = parameter("exact", "exact (full vocabulary) or release (the released code's top-k "
                                            "formulas, its clamps included)", EXACT)
    top_k: int = parameter(RELEASE_TOP_K, "release only: the teacher's tokens kept per position", ADPA_RELEASE)

    def validate(self) -> None:
        super().validate()
        _check(self.approximation in APPROXIMATIONS, "approximation",
               f"is {self.approximation!r}; choose one of {', '.join(APPROXIMATIONS)}")
        _check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k > 0, "top_k",
               f"must be a positive integer, got {self.top_k!r}")
        _check(self.approximation == "release" or self.top_k == RELEASE_TOP_K, "top_k",
               "applies to approximation release only")

    def _kernel_options(self) -> dict:
        return dict(approximation=self.approximation, top_k=self.top_k)


@dataclass(frozen=True)
class SFT(Objective):
    """dSFT: cross-entropy on the teacher's responses."""

    name = "sft"
    formula = "−mean_t log π_θ(y^t_t) over chosen tokens (dSFT)"

    def needs(self) -> Needs:
        return Needs(fields=("chosen",), kernel_calls=(KernelCall("chosen", reduced=True),))

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        batch = inputs.batch
        chosen = batch.chosen_rows()
        weights = _weights(chosen, -1.0 / inputs.normalizers.chosen_tokens)
        loss, logps, _ = fused_linear_logprobs(inputs.student.hidden, inputs.student.weight,
                                               torch.where(chosen, batch.targets, IGNORE_INDEX), weights=weights,
                                               **inputs.student_options())
        return ObjectiveOutput(loss, {"loss": loss.detach(), "logps/chosen": _chosen_logps_metric(inputs, logps)})


@dataclass(frozen=True)
class KD(_DivergenceTerm):
    """Token-level KD on the teacher's responses, with an optional CE term from the same sweep."""

    name = "kd"
    formula = "mean_t D(π_te‖π_θ) over chosen tokens + `ce_weight`·sft, one sweep over the vocabulary"
    ce_weight: float = parameter(0.0, "weight of the cross-entropy on the teacher's responses", UNPUBLISHED)

    def validate(self) -> None:
        super().validate()
        _non_negative(self, "ce_weight")

    def needs(self) -> Needs:
        return Needs(online=("teacher",), fields=("chosen",), kernel_calls=(self._divergence_call("chosen"),))

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        batch, norm = inputs.batch, inputs.normalizers
        chosen = batch.chosen_rows()
        div_weights = _weights(chosen, 1.0 / norm.chosen_tokens)
        logp_weights = _weights(chosen, -self.ce_weight / norm.chosen_tokens)
        loss, div, logps = self._divergence(inputs, chosen, torch.where(chosen, batch.targets, IGNORE_INDEX),
                                            div_weights, logp_weights)
        divergence = (div * div_weights).sum()
        cross_entropy = -(logps * _weights(chosen, 1.0 / norm.chosen_tokens)).sum()
        return ObjectiveOutput(loss, {"loss": loss.detach(), "kd/divergence": divergence.detach(),
                                      "sft/ce": cross_entropy.detach(),
                                      "logps/chosen": _chosen_logps_metric(inputs, logps)})


@dataclass(frozen=True)
class _Preference(Objective):
    """A pairwise preference loss on sequence log-probs, with the reference's cached."""

    default_lr = 5e-7
    lr_source = ZEPHYR_DDPO
    average_logps: bool = parameter(False, "length-normalized sequence log-probs (divided by response length)",
                                    "off, as in DPO, Rafailov et al. 2023")

    def needs(self) -> Needs:
        # Per-token log-probs of both responses (DPO's per-token gradient depends on each pair's margin).
        return Needs(cached=("reference",), kernel_calls=(KernelCall("both"),))

    def _per_sequence(self, inputs: StepInputs, sums: torch.Tensor) -> torch.Tensor:
        if self.average_logps:
            return sums / inputs.batch.response_tokens.clamp(min=1).to(sums.dtype)
        return sums

    def _pair_loss(self, inputs: StepInputs, policy: torch.Tensor):
        """Per-pair losses [B] and per-sequence implicit rewards [S] (detached)."""
        raise NotImplementedError

    def _token_terms(self, inputs: StepInputs):
        """Token log-probs, plus any token-level loss term and its metrics from the same sweep."""
        logps = fused_linear_logprobs(inputs.student.hidden, inputs.student.weight, inputs.batch.targets,
                                      **inputs.student_options())
        return logps, None, {}

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        token_logps, token_loss, metrics = self._token_terms(inputs)
        batch = inputs.batch
        policy = self._per_sequence(inputs, sequence_logps(token_logps, batch.target_sequence, batch.num_sequences))
        losses, rewards = self._pair_loss(inputs, policy)
        loss = losses.sum() / inputs.normalizers.pairs
        metrics.update(_pair_metrics(rewards, policy, inputs))
        if token_loss is not None:
            loss = loss + token_loss
        metrics["loss"] = loss.detach()
        return ObjectiveOutput(loss, metrics)


@dataclass(frozen=True)
class DPO(_Preference):
    """dDPO (Zephyr) on cached reference log-probs."""

    name = "dpo"
    formula = ("dDPO: −log σ(β·h), h = [log π_θ(y^t) − log π_ref(y^t)] − [log π_θ(y^s) − log π_ref(y^s)]; "
               "`loss_type` `ipo` (h − 1/(2β))², `hinge` relu(1 − β·h), `robust`, `exo_pair`, `discopop` (TRL's); "
               "`label_smoothing` ε: −(1−ε)·log σ(β·h) − ε·log σ(−β·h)")
    beta: float = parameter(0.1, "the KL weight β (inverse temperature of the implicit reward)", ZEPHYR_DDPO)
    loss_type: str = parameter("sigmoid", ", ".join(LOSS_TYPES) + " (TRL 1.16's, on h)", "sigmoid, as in DPO")
    label_smoothing: float = parameter(0.0, "sigmoid, robust, exo_pair: the assumed share ε of flipped preferences",
                                       "off, as in DPO")

    def validate(self) -> None:
        super().validate()
        _positive(self, "beta")
        problem = loss_type_problem(self.loss_type, self.label_smoothing)
        _check(problem is None, *(problem or ("", "")))

    def _pair_loss(self, inputs: StepInputs, policy: torch.Tensor):
        split = inputs.batch.split_pairs
        reference = self._per_sequence(inputs, inputs.reference_logps)
        losses = dpo_loss(*split(policy), *split(reference), beta=self.beta, loss_type=self.loss_type,
                          label_smoothing=self.label_smoothing)
        return losses, self.beta * (policy - reference).detach()


@dataclass(frozen=True)
class DaDPO(_Preference):
    """daDPO: DPO whose per-pair target margin comes from the teacher's cached sequence log-probs."""

    name = "dadpo"
    formula = ("−log σ((β1+β2)·[log π_θ(y^t) − log π_θ(y^s)] − β1·[log π_ref(y^t) − log π_ref(y^s)] "
               "− β2·[log π_te(y^t) − log π_te(y^s)]); β2 = 0 is exactly dDPO")
    beta1: float = parameter(0.1, "weight of KL(π‖π_ref); dDPO's β when beta2 = 0", ZEPHYR_DDPO + "'s β")
    beta2: float = parameter(0.1, "weight of KL(π‖π_te), the teacher's distribution", UNPUBLISHED)

    def validate(self) -> None:
        super().validate()
        _positive(self, "beta1")
        _non_negative(self, "beta2")

    def needs(self) -> Needs:
        return Needs(cached=("reference", "teacher"), kernel_calls=(KernelCall("both"),))

    def _pair_loss(self, inputs: StepInputs, policy: torch.Tensor):
        split = inputs.batch.split_pairs
        reference = self._per_sequence(inputs, inputs.reference_logps)
        teacher = self._per_sequence(inputs, inputs.teacher_logps)
        losses = dadpo_loss(*split(policy), *split(reference), *split(teacher), beta1=self.beta1, beta2=self.beta2)
        # Per-sequence implicit reward (β1+β2)·log π − β1·log π_ref − β2·log π_te: chosen − rejected is the margin.
        rewards = (self.beta1 + self.beta2) * policy - self.beta1 * reference - self.beta2 * teacher
        return losses, rewards.detach()


@dataclass(frozen=True)
class DaDPOToken(DPO, _DivergenceTerm):
    """Our token-level variant: dDPO plus the per-token divergence to the teacher on both responses,
    one sweep. Not a method of the daDPO paper or of any other source we have."""

    name = "dadpo_token"
    formula = ("ours, a token-level variant: dDPO + α·mean_t D(π_te‖π_θ) over chosen and rejected response "
               "tokens, one sweep")
    alpha: float = parameter(0.1, "weight of the token-level divergence", UNPUBLISHED)

    def validate(self) -> None:
        super().validate()
        _non_negative(self, "alpha")

    def needs(self) -> Needs:
        # The divergence reduced in the sweep, DPO's log-probs per token, from one call.
        return Needs(online=("teacher",), cached=("reference",), kernel_calls=(self._divergence_call("both"),))

    def _token_terms(self, inputs: StepInputs):
        responses = inputs.batch.response_rows()
        token_mean = _weights(responses, 1.0 / inputs.normalizers.response_tokens)
        divergence, _, logps = self._divergence(inputs, responses, inputs.batch.targets, token_mean)
        return logps, self.alpha * divergence, {"kd/divergence": divergence.detach()}


@dataclass(frozen=True)
class DCKD(_Approximation, _DivergenceTerm):
    """Dual-constrained KD (ADPA paper): sft plus the divergence on both responses, one sweep;
    exact, or the released code's top-k KL (``approximation: release``, forward_kl only)."""

    name = "dckd"
    formula = ("sft + λ_c·mean_t KL(π_te‖π_θ) on chosen + λ_r·mean_t KL on rejected, one sweep; `approximation` "
               "`release`: the released code's KL, Σ_{a∈K∪rest} q̃·log(q̃/p̃), K the teacher's `top_k` tokens, "
               "rest their complement's mass, probabilities clamped to [1e-8, 1−1e-8]")
    default_lr = 5e-7
    lr_source = ADPA_RELEASE
    kind: str = parameter("forward_kl", "forward_kl = KL(π_te‖π_θ), reverse_kl = KL(π_θ‖π_te), or jsd",
                          ADPA_PAPER + ": KL(π_te‖π_θ)")
    lambda_chosen: float = parameter(0.1, "weight λ_c of the divergence on the chosen responses", ADPA_RELEASE)
    lambda_rejected: float = parameter(0.1, "weight λ_r of the divergence on the rejected responses", ADPA_RELEASE)

    def validate(self) -> None:
        super().validate()
        _non_negative(self, "lambda_chosen", "lambda_rejected")
        _check(self.approximation == "exact" or self.kind == "forward_kl", "approximation",
               f"release is the released code's forward_kl only, not kind {self.kind!r}")

    def needs(self) -> Needs:
        return Needs(online=("teacher",), kernel_calls=(self._divergence_call("both"),))

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        batch, norm = inputs.batch, inputs.normalizers
        chosen, rejected = batch.chosen_rows(), batch.rejected_rows()
        per_rejected = 1.0 / max(norm.rejected_tokens, 1.0)
        div_weights = (_weights(chosen, self.lambda_chosen / norm.chosen_tokens)
                       + _weights(rejected, self.lambda_rejected * per_rejected))
        ce_weights = _weights(chosen, -1.0 / norm.chosen_tokens)
        loss, div, logps = self._divergence(inputs, chosen | rejected,
                                            torch.where(chosen, batch.targets, IGNORE_INDEX), div_weights, ce_weights)
        sft = (logps * ce_weights).sum()
        kl_chosen = (div * _weights(chosen, 1.0 / norm.chosen_tokens)).sum()
        kl_rejected = (div * _weights(rejected, per_rejected)).sum()
        pooled = (kl_chosen * norm.chosen_tokens + kl_rejected * norm.rejected_tokens) / norm.response_tokens
        return ObjectiveOutput(loss, {"loss": loss.detach(), "sft/ce": sft.detach(), "kd/divergence": pooled.detach(),
                                      "kd/divergence_chosen": kl_chosen.detach(),
                                      "kd/divergence_rejected": kl_rejected.detach(),
                                      "logps/chosen": _chosen_logps_metric(inputs, logps)})


@dataclass(frozen=True)
class ADPA(_Approximation):
    """ADPA: sft on the chosen responses minus the teacher's advantage over its reference, in
    expectation under the student, on the student's own responses (the rejected field). Exact over
    the full vocabulary, or the released code's top-k formula (``approximation: release``)."""

    name = "adpa"
    formula = ("sft − γ·mean over the student's own response (`rejected`) of "
               "Σ_a π_θ(a\\|s_t)·[log π_te(a\\|s_t) − log π_te_ref(a\\|s_t)], exact over the full vocabulary; "
               "`approximation` `release`: the released code's Σ_{a∈K} clamp(π_θ)·clamp(log π_te − log π̃_te_ref) "
               "+ clamp(1 − Σ_K π_θ)·1e-8, K the teacher's `top_k` tokens, π̃_te_ref the smallest kept π_te "
               "where a is not in the reference's own top_k, clamps to [1e-8, 1−1e-8]")
    default_lr = 5e-7
    lr_source = ADPA_RELEASE
    gamma: float = parameter(1.6, "weight γ of the advantage term", ADPA_RELEASE)
    temperature: float = parameter(1.0, "divides the three models' logits", "1: logits as they are")

    def validate(self) -> None:
        super().validate()
        _non_negative(self, "gamma")
        _positive(self, "temperature")

    def needs(self) -> Needs:
        # sft on the chosen responses; the advantage over the student's own (the rejected field).
        return Needs(online=("teacher", "teacher_reference"), kernel_calls=(
            KernelCall("chosen", reduced=True), KernelCall("rejected", with_logps=False, teachers=2, reduced=True)))

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        batch, norm = inputs.batch, inputs.normalizers
        chosen, rejected = batch.chosen_rows(), batch.rejected_rows()
        per_rejected = 1.0 / max(norm.rejected_tokens, 1.0)
        ce_weights = _weights(chosen, -1.0 / norm.chosen_tokens)
        sft, logps, _ = fused_linear_logprobs(inputs.student.hidden, inputs.student.weight,
                                              torch.where(chosen, batch.targets, IGNORE_INDEX), weights=ce_weights,
                                              **inputs.student_options())
        advantage_term, advantage, _ = fused_linear_advantage(
            inputs.student.hidden, inputs.student.weight, inputs.teacher.hidden, inputs.teacher.weight,
            inputs.teacher_reference.hidden, inputs.teacher_reference.weight, temperature=self.temperature,
            mask=rejected, vocab_size=inputs.vocab_size, weights=_weights(rejected, -self.gamma * per_rejected),
            **self._kernel_options(), **inputs.student_options(), **inputs.teacher.logit_options("teacher_"),
            **inputs.teacher_reference.logit_options("ref_"))
        mean_advantage = (advantage * _weights(rejected, per_rejected)).sum()
        loss = sft + advantage_term
        return ObjectiveOutput(loss, {"loss": loss.detach(), "sft/ce": sft.detach(),
                                      "adpa/advantage": mean_advantage.detach(),
                                      "logps/chosen": _chosen_logps_metric(inputs, logps)})


OBJECTIVES: Dict[str, type] = {}
DEFAULT_OBJECTIVE = "dadpo"


def register_objective(cls: type) -> type:
    """Make ``cls`` selectable as ``objective.name: <cls.name>`` (a decorator too). Its parameters
    are its dataclass fields (``parameter(...)``), its needs its ``needs()``."""
    if not (isinstance(cls, type) and issubclass(cls, Objective) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass subclass of Objective")
    if not cls.name or cls.name in OBJECTIVES:
        raise ValueError(f"objective name {cls.name!r} is empty or taken ({', '.join(OBJECTIVES)})")
    if cls.needs is Objective.needs:
        raise TypeError(f"objective {cls.name!r} does not say what it needs (define needs())")
    OBJECTIVES[cls.name] = cls
    return cls


for _objective in (SFT, KD, DPO, DaDPO, DaDPOToken, DCKD, ADPA):
    register_objective(_objective)


def objective_table() -> str:
    """The README's table of objectives, generated from their declarations so the two cannot drift."""
    lines = ["| name | loss | parameters (default, source) |", "|---|---|---|"]
    for cls in OBJECTIVES.values():
        described = [f"`{f.name}` {_shown(f.default)} ({f.metadata['source']})" for f in cls.parameters()]
        described.append(f"lr {_shown(cls.default_lr)} ({cls.lr_source})")
        lines.append(f"| `{cls.name}` | {cls.formula} | {'; '.join(described)} |")
    return "\n".join(lines)


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}".replace("e-0", "e-") if isinstance(value, float) else str(value)
