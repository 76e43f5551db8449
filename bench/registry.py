"""What the kernel benchmarks run, in one place: the sizes, the cases (which loss is computed), the
implementations (who computes it) and the inputs they all share.

Equal work: every implementation of a case computes the same scalar loss from the same inputs and
backpropagates it into the student's hidden states and LM head; ``reference_loss`` is that loss
from the materialized reference, evaluated block by block so that it fits anywhere, and the
benchmark checks each implementation against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch

from fastdadpo.kernels import IGNORE_INDEX

DPO_BETA = 0.1
# Standard deviation of the random logits. Real LM heads give peaked distributions; 2 keeps the
# softmax away from uniform without making every row one-hot.
LOGIT_STD = 2.0


# --- sizes -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    name: str
    source: str  # where these shapes come from
    vocab: int
    student_hidden: int
    teacher_hidden: int
    tokens: Tuple[int, ...]  # one benchmark per token count
    device: str  # "cpu", "cuda", or "auto" (CUDA when there is a GPU, else CPU)
    dtype: torch.dtype
    sequence_length: int  # DPO case: tokens = 2·pairs·sequence_length
    cases: Optional[Tuple[str, ...]] = None  # None: every case
    quick: bool = False  # the quick (CI) mode runs these, and only these


# Token sweeps exist for the plots (memory and time against tokens); two cases are enough to show it.
SWEEP_CASES = ("forward_kl", "logprobs")

SIZES: Dict[str, Size] = {s.name: s for s in (
    Size("tiny", "quick mode: every path, in seconds", 2048, 64, 128, (256,), "auto", torch.float32, 64, quick=True),
    Size("cpu-anchor", "our CPU anchor (fp32, N=4096, V=65,536, student H=256, teacher H=512)",
         65536, 256, 512, (4096,), "cpu", torch.float32, 512),
    Size("cpu-v64k", "the CPU anchor's shapes at fewer tokens (plots)", 65536, 256, 512, (1024, 2048), "cpu",
         torch.float32, 512, cases=SWEEP_CASES),
    Size("cpu-v32k", "the CPU anchor with half its vocabulary (plots)", 32768, 256, 512, (1024, 2048, 4096), "cpu",
         torch.float32, 512, cases=SWEEP_CASES),
    Size("liger", "Liger-Kernel's chunked JSD benchmark (student H=2048, teacher H=4096, V=128,256)", 128256, 2048,
         4096, (1024, 2048, 4096, 8192), "cuda", torch.bfloat16, 512),
    Size("cce", "Cut Cross-Entropy's paper: Gemma-2 2B (V=256,000, H=2304); teacher Gemma-2 9B (H=3584)", 256000,
         2304, 3584, (8192,), "cuda", torch.bfloat16, 512),
    Size("qwen2.5-7b-1.5b", "Qwen2.5-7B teacher (H=3584) into Qwen2.5-1.5B (H=1536), V=151,936", 151936, 1536, 3584,
         (1024, 4096, 8192, 16384), "cuda", torch.bfloat16, 512),
)}


def size_device(size: Size) -> torch.device:
    if size.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(size.device)


# --- cases -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    family: str  # divergence | kd | nll | dpo | advantage: how per-token outputs become the loss
    loss: str  # the loss, in words (for the report)
    kind: Optional[str] = None  # divergence kind
    jsd_beta: float = 0.5

    @property
    def needs_teacher(self) -> bool:
        return self.family in ("divergence", "kd", "advantage")

    @property
    def needs_reference_teacher(self) -> bool:
        return self.family == "advantage"


CASES: Dict[str, Case] = {c.name: c for c in (
    Case("forward_kl", "divergence", "mean_t KL(teacher‖student)", kind="forward_kl"),
    Case("reverse_kl", "divergence", "mean_t KL(student‖teacher)", kind="reverse_kl"),
    Case("jsd", "divergence", "mean_t JSD_β, β=0.5", kind="jsd"),
    Case("kd_with_targets", "kd", "mean_t KL(teacher‖student) − mean_t log p_s(target), one sweep for both",
         kind="forward_kl"),
    Case("logprobs", "nll", "−mean_t log p_s(target) (cross-entropy)"),
    Case("dpo", "dpo", f"sigmoid DPO (β={DPO_BETA}) over summed token log-probs, cached reference log-probs"),
    Case("advantage", "advantage", "mean_t ADPA advantage Σ_a p_s(a)·(log p_t(a) − log p_r(a))"),
)}


def cases_for(size: Size):
    return [CASES[name] for name in (size.cases or tuple(CASES))]


# --- inputs ------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Final hidden states and LM heads. The student's two are the leaves every implementation
    differentiates; the DPO case lays tokens out as [2·pairs, sequence_length] (chosen, then rejected)."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    targets: torch.Tensor
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    ref_hidden: Optional[torch.Tensor] = None
    ref_weight: Optional[torch.Tensor] = None

    def clear_grads(self) -> None:
        """Between rounds: every round allocates its gradients afresh, as a training step does."""
        self.student_hidden.grad = None
        self.student_weight.grad = None

    def rows(self, index: slice) -> "Inputs":
        """The same inputs for a block of rows (tokens, or sequences in the DPO layout)."""
        take = (lambda t: None if t is None else t[index])
        return replace(self, student_hidden=self.student_hidden[index], targets=self.targets[index],
                       teacher_hidden=take(self.teacher_hidden), ref_hidden=take(self.ref_hidden))


def make_inputs(case: Case, size: Size, tokens: int, device: torch.device) -> Inputs:
    """Deterministic inputs: every implementation (and every fresh memory-probe process) sees the same."""
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, device=device) * std).to(size.dtype)

    def head(hidden):
        return normal(size.vocab, hidden, std=LOGIT_STD / math.sqrt(hidden))

    lead = (tokens,)
    if case.family == "dpo":
        if tokens % (2 * size.sequence_length):
            raise ValueError(f"{size.name}: {tokens} tokens are not whole pairs of {size.sequence_length}-token sequences")
        lead = (tokens // size.sequence_length, size.sequence_length)
    inputs = Inputs(student_hidden=normal(*lead, size.student_hidden).requires_grad_(),
                    student_weight=head(size.student_hidden).requires_grad_(),
                    targets=torch.randint(0, size.vocab, lead, generator=generator, device=device))
    if case.needs_teacher:
        inputs.teacher_hidden, inputs.teacher_weight = normal(*lead, size.teacher_hidden), head(size.teacher_hidden)
    if case.needs_reference_teacher:
        inputs.ref_hidden, inputs.ref_weight = normal(*lead, size.teacher_hidden), head(size.teacher_hidden)
    return inputs


# --- from per-token outputs to the loss (shared by ours, the reference and its compiled version) -------------

def case_loss(case: Case, div: Optional[torch.Tensor], logp: Optional[torch.Tensor]) -> torch.Tensor:
    """The case's scalar loss from per-token divergences (or advantages) and target log-probs."""
    if case.family in ("divergence", "advantage"):
        return div.mean()
    if case.family == "kd":
        return div.mean() - logp.mean()
    if case.family == "nll":
        return -logp.mean()
    if case.family == "dpo":
        from fastdadpo.core.losses import dpo_loss

        sequence_logps = logp.sum(-1)
        pairs = sequence_logps.shape[0] // 2
        cached_reference = torch.zeros_like(sequence_logps[:pairs])  # the trainer caches them: no work here
        return dpo_loss(sequence_logps[:pairs], sequence_logps[pairs:], cached_reference, cached_reference,
                        beta=DPO_BETA).mean()
    raise ValueError(f"unknown case family {case.family!r}")


def reduction_weights(case: Case, targets: torch.Tensor):
    """(weights, logp_weights) of the case's loss = Σ w·out, fastdadpo's reduced call.
    None for DPO, whose gradient per token depends on the pair's margin (no fixed weighting)."""
    if case.family == "dpo":
        return None
    mean = torch.full(targets.shape, 1.0 / targets.numel(), device=targets.device)
    return {"divergence": (mean, None), "advantage": (mean, None), "kd": (mean, -mean),
            "nll": (None, -mean)}[case.family]


def fused_per_token(case: Case, t: Inputs, backend: str, reduced: bool):
    """fastdadpo's fused kernels: (divergence or advantage, target log-probs) per token, or, with
    ``reduced`` where the case's loss is a weighted sum of them (every case but DPO), the kernels'
    ``Reduced`` result, whose ``loss`` is the case's loss with its gradient formed in the sweep."""
    from fastdadpo.kernels import fused_linear_advantage, fused_linear_divergence, fused_linear_logprobs

    weights = reduction_weights(case, t.targets) if reduced else None
    div_weights, logp_weights = weights or (None, None)
    if case.family == "divergence":
        out = fused_linear_divergence(t.student_hidden, t.student_weight, t.teacher_hidden, t.teacher_weight,
                                      kind=case.kind, beta=case.jsd_beta, weights=div_weights, impl=backend)
        return out if weights else (out, None)
    if case.family == "kd":
        return fused_linear_divergence(t.student_hidden, t.student_weight, t.teacher_hidden, t.teacher_weight,
                                       kind=case.kind, beta=case.jsd_beta, targets=t.targets, ignore_index=IGNORE_INDEX,
                                       weights=div_weights, logp_weights=logp_weights, impl=backend)
    if case.family in ("nll", "dpo"):
        out = fused_linear_logprobs(t.student_hidden, t.student_weight, t.targets, ignore_index=IGNORE_INDEX,
                                    weights=logp_weights, impl=backend)
        return out if weights else (None, out)
    if case.family == "advantage":
        out = fused_linear_advantage(t.student_hidden, t.student_weight, t.teacher_hidden, t.teacher_weight,
                                     t.ref_hidden, t.ref_weight, weights=div_weights, impl=backend)
        return out if weights else (out, None)
    raise ValueError(f"unknown case family {case.family!r}")


def fused_loss(case: Case, t: Inputs, backend: str, reduced: bool) -> torch.Tensor:
    """The case's loss from fastdadpo's kernels, reduced in the sweep or from per-token outputs."""
    out = fused_per_token(case, t, backend, reduced)
    return out.loss if hasattr(out, "loss") else case_loss(case, *out)


def naive_per_token(case: Case, student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None,
                    ref_hidden=None, ref_weight=None):
    """The materialized reference (fastdadpo.kernels.naive_*): [tokens x vocab] logits and autograd.
    Tensors as arguments, not an ``Inputs``, so that torch.compile sees plain tensor inputs."""
    from fastdadpo.kernels import naive_linear_advantage, naive_linear_divergence, naive_linear_logprobs

    if case.family == "divergence":
        return naive_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind=case.kind,
                                       beta=case.jsd_beta), None
    if case.family == "kd":
        return naive_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind=case.kind,
                                       beta=case.jsd_beta, targets=targets, ignore_index=IGNORE_INDEX)
    if case.family in ("nll", "dpo"):
        return None, naive_linear_logprobs(student_hidden, student_weight, targets, ignore_index=IGNORE_INDEX)
    if case.family == "advantage":
        return naive_linear_advantage(student_hidden, student_weight, teacher_hidden, teacher_weight, ref_hidden,
                                      ref_weight), None
    raise ValueError(f"unknown case family {case.family!r}")


def _naive_arguments(t: Inputs):
    return (t.student_hidden, t.student_weight, t.targets, t.teacher_hidden, t.teacher_weight, t.ref_hidden,
            t.ref_weight)


# Rows per block of the reference: about this many bytes of float32 logits per block.
_REFERENCE_BLOCK_BYTES = 256 * 2**20


@torch.no_grad()
def reference_loss(case: Case, t: Inputs) -> float:
    """The case's loss from the materialized reference, block by block (same math, bounded memory)."""
    vocab = t.student_weight.shape[0]
    tokens_per_row = t.targets[0].numel()
    rows_per_block = max(1, _REFERENCE_BLOCK_BYTES // (4 * vocab * tokens_per_row))
    divs, logps = [], []
    for start in range(0, t.targets.shape[0], rows_per_block):
        div, logp = naive_per_token(case, *_naive_arguments(t.rows(slice(start, start + rows_per_block))))
        divs.append(div)
        logps.append(logp)
    join = (lambda parts: None if parts[0] is None else torch.cat(parts))
    return float(case_loss(case, join(divs), join(logps)))


def agreement_tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(rtol, atol) for "computes the same loss": wide enough for summation order and bf16 logits,
    narrow enough to catch different math (a β convention, a sum instead of a mean)."""
    return (1e-3, 1e-4) if dtype in (torch.float32, torch.float64) else (5e-2, 1e-2)


# --- implementations ---------------------------------------------------------------------------------------

LossFn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Implementation:
    name: str
    label: str
    families: FrozenSet[str]
    build: Callable[[Case, Inputs, torch.device], LossFn]  # returns a closure computing the scalar loss
    ours: bool = False
    compiles: bool = False  # the first call compiles (torch.compile): warm up before measuring
    module: Optional[str] = None  # a package it needs
    backend: Optional[str] = None  # ours: a kernel backend pinned (None: the device's default)

    def detail(self, device: torch.device) -> str:
        """What exactly runs, for the results."""
        if self.name.startswith("fastdadpo"):
            return f"fastdadpo.kernels, {self.backend or fastdadpo_backend(device)} backend"
        if self.name == "cce":
            # CCE's own default and published setting: its backward skips gradient entries below a
            # threshold (an approximation fastdadpo does not make); stated so the row is read as such.
            return (f"cut_cross_entropy.linear_cross_entropy(impl={cce_impl(device)!r}, filter_eps='high' "
                    f"(its default: small gradient entries skipped))")
        return self.label


def fastdadpo_backend(device: torch.device) -> str:
    # Pinned, so that FASTDADPO_KERNEL_BACKEND in the environment cannot turn "ours" into the reference:
    # the default of fastdadpo.kernels on each device.
    return "chunked"


def cce_impl(device: torch.device) -> str:
    # CCE's own kernel is Triton on CUDA only; on CPU its torch_compile implementation (compiled
    # materialized logits) is what runs.
    return "cce" if device.type == "cuda" else "torch_compile"


def _build_fastdadpo(reduced: bool, pinned: Optional[str] = None, frozen_head: bool = False):
    def build(case: Case, t: Inputs, device: torch.device) -> LossFn:
        if pinned is not None and device.type != "cuda":
            import pytest

            # On CPU the pinned chunked backend is the default (the `fastdadpo` row), and the
            # tile-fused kernels run only under Triton's interpreter, far too slow to benchmark.
            pytest.skip(f"the {pinned} backend's own row is measured on CUDA only (on CPU: the fastdadpo row)"
                        if pinned == "chunked" else f"the {pinned} backend is benchmarked on CUDA only")
        if frozen_head:  # a LoRA student's head: no weight gradient wanted (the kernels form no dW)
            t.student_weight.requires_grad_(False)
        backend = pinned or fastdadpo_backend(device)
        return lambda: fused_loss(case, t, backend, reduced)

    return build


def _build_naive(case: Case, t: Inputs, device: torch.device) -> LossFn:
    return lambda: case_loss(case, *naive_per_token(case, *_naive_arguments(t)))


def _build_naive_compiled(case: Case, t: Inputs, device: torch.device) -> LossFn:
    def loss(*tensors):
        return case_loss(case, *naive_per_token(case, *tensors))

    compiled = torch.compile(loss, dynamic=False)
    return lambda: compiled(*_naive_arguments(t))


# Liger's beta is the teacher's weight in the mixture: 0 is KL(teacher‖student), 1 is KL(student‖teacher).
_LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def _build_liger(case: Case, t: Inputs, device: torch.device) -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearJSDLoss

    if case.family == "dpo":
        dpo = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=DPO_BETA, compiled=True, use_ref_model=False,
                                      average_log_prob=False, loss_type="sigmoid")
        return lambda: dpo(t.student_weight, t.student_hidden, t.targets)[0]
    # Its hard loss is the mean cross-entropy on true_labels: weight 1 for the case with targets, else 0.
    # It masks rows whose label is ignore_index, so the labels are the real targets.
    jsd = LigerFusedLinearJSDLoss(weight_hard_loss=1.0 if case.family == "kd" else 0.0, weight_soft_loss=1.0,
                                  beta=_LIGER_BETA.get(case.kind, case.jsd_beta), ignore_index=IGNORE_INDEX,
                                  temperature=1.0, compiled=True)
    return lambda: jsd(t.student_hidden, t.student_weight, t.teacher_hidden, t.teacher_weight, t.targets)


def _build_cce(case: Case, t: Inputs, device: torch.device) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    impl = cce_impl(device)
    return lambda: linear_cross_entropy(t.student_hidden, t.student_weight, t.targets, ignore_index=IGNORE_INDEX,
                                        reduction="none", impl=impl).mean()


_ALL = frozenset({"divergence", "kd", "nll", "dpo", "advantage"})

IMPLEMENTATIONS: Dict[str, Implementation] = {i.name: i for i in (
    # "ours" = fastdadpo with its loss reduced in the sweep (weights=) where it is a weighted sum (not DPO).
    Implementation("fastdadpo", "fastdadpo (weights=: gradient in the sweep)", _ALL, _build_fastdadpo(reduced=True), ours=True),
    Implementation("fastdadpo-no-hint", "fastdadpo (per-row outputs: recompute in backward)", _ALL - {"dpo"},
                   _build_fastdadpo(reduced=False), ours=True),
    # Both CUDA designs side by side (GPU sizes only): the chunked default and the tile-fused kernels.
    Implementation("fastdadpo-chunked", "ours (chunked)", _ALL, _build_fastdadpo(reduced=True, pinned="chunked"),
                   ours=True, backend="chunked"),
    Implementation("fastdadpo-tile-fused", "ours (tile-fused)", _ALL, _build_fastdadpo(reduced=True, pinned="triton"),
                   ours=True, backend="triton"),
    # Not equal work: the student's head frozen (a LoRA student), so no weight gradient; beside
    # "fastdadpo" it shows what skipping the dW GEMM and its [V, H] buffer saves.
    Implementation("fastdadpo-frozen-head", "fastdadpo, frozen LM head (no dW)", frozenset({"kd", "nll"}),
                   _build_fastdadpo(reduced=True, frozen_head=True), ours=True),
    Implementation("naive", "naive torch (materialized logits)", _ALL, _build_naive),
    Implementation("naive-compiled", "torch.compile(naive)", _ALL, _build_naive_compiled, compiles=True),
    Implementation("liger", "Liger-Kernel chunked loss", frozenset({"divergence", "kd", "dpo"}), _build_liger,
                   compiles=True, module="liger_kernel"),
    Implementation("cce", "Cut Cross-Entropy", frozenset({"nll"}), _build_cce, compiles=True,
                   module="cut_cross_entropy"),
)}

REFERENCE_IMPLEMENTATION = "fastdadpo"  # the "ours" of the ratio columns


def implementations_for(case: Case):
    return [impl for impl in IMPLEMENTATIONS.values() if case.family in impl.families]


def missing_module(impl: Implementation) -> Optional[str]:
    if impl.module is None:
        return None
    import importlib.util

    return None if importlib.util.find_spec(impl.module) else impl.module
