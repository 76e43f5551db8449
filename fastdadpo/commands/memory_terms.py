"""The memory terms of one training step per rank: one small function per term (each says where its
bytes come from) over a model's ``Architecture`` and the ``Setting`` a plan is made for, and
``build_plan``, which adds them up into the phases of a step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from fastdadpo.commands.architectures import Architecture
from fastdadpo.kernels.chunk_plan import ChunkPlan, budget_bytes, plan_chunks
from fastdadpo.kernels.sweep import SweepSpec

# DeepSpeed's ZeRO defaults (deepspeed.runtime.zero.config), used unless deepspeed.extra sets them.
DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size, elements
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size, elements
DS_MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters, elements
DS_PERSISTENCE = 100_000  # stage3_param_persistence_threshold, elements: smaller parameters stay gathered
# Architectures Liger's RMSNorm/SwiGLU patches apply to (model.liger_kernels auto, on CUDA).
LIGER_ARCHS = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "phi3")


@dataclass(frozen=True)
class Setting:
    """Everything the terms depend on besides the architectures."""

    ranks: int = 1  # gpus x nodes: ZeRO shards over all of them
    device: str = "gpu"  # gpu | cpu (host memory, the chunked-torch kernels)
    dtype_bytes: int = 2  # model.dtype: 2 for bf16/fp16, 4 for fp32
    zero_stage: int = 3
    engine: str = "deepspeed"  # or fsdp2 (planned as stage 3 where they agree; see each term)
    offload_optimizer: bool = False  # deepspeed.extra zero_optimization.offload_optimizer.device cpu|nvme
    offload_param: bool = False  # ... offload_param (stage 3)
    teacher_offload: bool = False  # deepspeed.teacher_offload
    micro_batch: int = 1  # train.micro_batch_size (pairs)
    grad_accum: int = 1
    sequences: int = 2  # per example: chosen + rejected when the objective uses rejected
    max_length: int = 1024
    checkpointing: bool = False  # train.gradient_checkpointing
    liger: bool = False  # Liger's RMSNorm/SwiGLU in the student (GPU, supported architecture)
    reduce_bucket: int = DS_REDUCE_BUCKET
    prefetch_bucket: int = DS_PREFETCH_BUCKET
    max_live: int = DS_MAX_LIVE
    persistence_threshold: int = DS_PERSISTENCE
    chunk_budget_mb: Optional[float] = None  # kernels.chunk_budget_mb; None: the kernels' default for the device
    lora_rank: int = 0  # model.lora.r; 0: every parameter is trained
    lora_targets: Tuple[str, ...] = ()
    lora_dropout: float = 0.0

    @property
    def fsdp2(self) -> bool:
        return self.engine == "fsdp2"

    @property
    def tokens(self) -> int:
        """Student tokens per micro-batch: micro_batch x sequences x max_length (the worst case)."""
        return self.micro_batch * self.sequences * self.max_length

    @property
    def on_gpu(self) -> bool:
        return self.device == "gpu"


def stored_params(arch: Architecture, s: Setting) -> int:
    """Parameters held as weights: the model's, plus LoRA's adapters when there are some."""
    return arch.params + (arch.lora_params(s.lora_rank, s.lora_targets) if s.lora_rank else 0)


def trained_params(arch: Architecture, s: Setting) -> int:
    """Parameters the optimizer updates: all of them, or LoRA's adapters only."""
    return arch.lora_params(s.lora_rank, s.lora_targets) if s.lora_rank else arch.params


def student_params_bytes(arch: Architecture, s: Setting) -> int:
    """The student's weights in the model dtype: P·b on every rank below stage 3; stage 3 keeps a
    1/W shard (P·b/W), and none on the GPU with offload_param (the shard lives in host memory)."""
    total = stored_params(arch, s) * (4 if s.fsdp2 else s.dtype_bytes)  # FSDP2 keeps fp32 masters as the weights
    if s.zero_stage < 3:
        return total
    if s.offload_param and s.on_gpu:
        return 0
    return _ceil_div(total, s.ranks)


def student_grads_bytes(arch: Architecture, s: Setting) -> int:
    """The gradients in the model dtype, before the optimizer step. Stages 0-1: every rank holds the
    full P·b (stage 1 partitions the optimizer only). Stage 2: the rank's reduced partition P·b/W.
    Stage 3: its flat partition buffer P·b/W (host memory with offload_optimizer)."""
    total = trained_params(arch, s) * (4 if s.fsdp2 else s.dtype_bytes)  # FSDP2 reduces into fp32 shards
    if s.zero_stage <= 1:
        return total
    if s.zero_stage == 3 and s.offload_optimizer and s.on_gpu:
        return 0
    return _ceil_div(total, s.ranks)


def _bucket_elements(arch: Architecture, s: Setting) -> int:
    return s.reduce_bucket if s.on_gpu else min(s.reduce_bucket, trained_params(arch, s))


def student_reduce_bucket_bytes(arch: Architecture, s: Setting) -> int:
    """Stages 2-3 copy gradients into a contiguous reduce bucket of reduce_bucket_size elements in
    the model dtype (allocated whole on a GPU; on a CPU only the pages written count, at most the
    P elements of the model)."""
    if s.zero_stage < 2 or s.fsdp2:  # FSDP2 reduce-scatters each layer group's gradient as it is formed
        return 0
    return _bucket_elements(arch, s) * s.dtype_bytes


def student_reduce_copy_bytes(arch: Architecture, s: Setting) -> int:
    """Stage 3's reduce-scatter concatenates a full bucket's padded partitions into one more flat
    tensor of the bucket's size while it reduces it. A bucket fills, and is reduced, during backward
    when the gradients outnumber it (P > reduce_bucket_size: then this copy meets the activations);
    otherwise only once, after backward (``bucket_fills_in_backward``)."""
    if s.zero_stage != 3 or s.fsdp2:
        return 0
    return _bucket_elements(arch, s) * s.dtype_bytes


def bucket_fills_in_backward(arch: Architecture, s: Setting) -> bool:
    return trained_params(arch, s) > s.reduce_bucket


def student_allreduce_bytes(arch: Architecture, s: Setting) -> int:
    """Stage 0 all-reduces the gradients after backward through flattened copies of up to 5e8
    elements (DeepSpeed's buffered all-reduce): min(5e8, P)·b alive with every gradient, before the
    step."""
    if s.zero_stage != 0:
        return 0
    return min(500_000_000, trained_params(arch, s)) * s.dtype_bytes


def student_master_bytes(arch: Architecture, s: Setting) -> int:
    """AdamW's fp32 master weights, 4 bytes per parameter. Stage 0 in bf16/fp16: a full copy (4P);
    in fp32 the weights are their own master (0). Stages 1-3 keep the rank's partition in fp32,
    4P/W, a copy even when the model is fp32. offload_optimizer moves it to host memory."""
    return _fp32_copy_of_trained(arch, s)


def _fp32_copy_of_trained(arch: Architecture, s: Setting) -> int:
    """An fp32 copy of the trained parameters' size: whole at stage 0 unless they are fp32 already,
    the rank's partition at stages 1-3; none on the GPU with offload_optimizer (it lives in host memory)."""
    if (s.offload_optimizer and s.on_gpu) or s.fsdp2:  # FSDP2: the weights are the fp32 master, .grad is fp32
        return 0
    if s.zero_stage == 0:
        return 4 * trained_params(arch, s) if s.dtype_bytes < 4 else 0
    return _ceil_div(4 * trained_params(arch, s), s.ranks)


def student_moments_bytes(arch: Architecture, s: Setting) -> int:
    """AdamW's two fp32 moments (exp_avg, exp_avg_sq): 8 bytes per parameter, over the rank's
    partition at stages 1-3 (8P/W), whole at stage 0 (8P); host memory with offload_optimizer."""
    if s.offload_optimizer and s.on_gpu:
        return 0
    trained = trained_params(arch, s)
    return 8 * trained if s.zero_stage == 0 else _ceil_div(8 * trained, s.ranks)


def student_step_fp32_grads_bytes(arch: Architecture, s: Setting) -> int:
    """At the optimizer step the gradients the optimizer reads are fp32: stage 0 in bf16/fp16 copies
    all of them (4P; fp32 steps on .grad itself: 0); stages 1-3 flatten the rank's partition into
    fp32 (4P/W, a copy even in fp32). Host memory with offload_optimizer."""
    return _fp32_copy_of_trained(arch, s)


def student_optimizer_temp_bytes(arch: Architecture, s: Setting) -> int:
    """torch AdamW's temporary at the step. On CUDA it runs fused (no temporary). On CPU it loops
    over tensors and builds ``exp_avg_sq.sqrt()`` per tensor, 4 bytes per element of the largest
    one: the flat fp32 partition at stages 1-3 (P/W), the largest parameter at stage 0 (V·H)."""
    if s.on_gpu and not s.offload_optimizer:
        return 0
    if s.fsdp2:  # per parameter shard: the largest module's
        largest = _ceil_div(arch.largest_module_params, s.ranks)
    elif s.zero_stage:
        largest = _ceil_div(trained_params(arch, s), s.ranks)
    else:
        largest = max(s.lora_rank * max(map(sum, arch.linear_shapes().values())), 1) if s.lora_rank \
            else arch.largest_module_params
    return 4 * largest


def student_gathered_bytes(arch: Architecture, s: Setting) -> int:
    """Stage 3 gathers each module's full parameters for its forward and backward: the largest
    module (the LM head, V·H, registered with the loss so it stays gathered through it) plus the
    prefetch bucket (stage3_prefetch_bucket_size elements), at most stage3_max_live_parameters,
    in the model dtype; and the parameters under stage3_param_persistence_threshold, which stay
    gathered (norms and biases: per layer 2·H plus the q/k/v biases)."""
    if s.zero_stage < 3:
        return 0
    if s.fsdp2:  # the root group (embeddings, head, norm: gathered for the whole forward) and two layers
        return (arch.largest_module_params + 2 * arch.layer_params()) * s.dtype_bytes
    live = min(arch.largest_module_params + min(s.prefetch_bucket, arch.params), max(s.max_live, arch.largest_module_params))
    small = arch.layers * (2 * arch.hidden + ((arch.q_dim + 2 * arch.kv_dim) if arch.attention_bias else 0))
    persistent = small if arch.hidden <= s.persistence_threshold else 0
    return (live + persistent) * s.dtype_bytes


def layer_activation_bytes_per_token(arch: Architecture, s: Setting) -> int:
    """What one decoder layer keeps for backward per token (measured on transformers' Qwen2/Llama
    layers with saved-tensor hooks): two RMSNorms at 8·H bytes each (fp32: the normalized rows and
    the output; bf16: the fp32 upcast, the normalized and the output), the residual stream twice
    (2·H·b), attention's q, k and v after RoPE (k and v repeated to all heads when a padding mask
    is given) and its output (4·q_dim·b), the MLP's gate, SiLU, up and product (4·I·b), the padding
    mask row SDPA keeps (T·b), the softmax log-sum-exp (heads·4) and two norms' rstd (2·4).
    With Liger's kernels the norms keep their input only (0 more) and SwiGLU recomputes SiLU (3·I)."""
    b, h = s.dtype_bytes, arch.hidden
    norms = 0 if s.liger else 2 * 8 * h
    mlp = (3 if s.liger else 4) * arch.intermediate
    return norms + (2 * h + 4 * arch.q_dim + mlp + s.max_length) * b + (arch.heads + 2) * 4 + lora_activation_bytes(arch, s)


def lora_activation_bytes(arch: Architecture, s: Setting) -> int:
    """Per token and layer, what LoRA adds: each adapted projection keeps its A-projection's output
    (r·b) and, with dropout, the dropped-out copy of its input (in·b) and dropout's mask (in bytes)."""
    if not s.lora_rank:
        return 0
    shapes = arch.linear_shapes()
    targets = [t for t in s.lora_targets if t in shapes]
    dropped = sum(shapes[t][0] for t in targets) * (s.dtype_bytes + 1) if s.lora_dropout > 0 else 0
    return len(targets) * s.lora_rank * s.dtype_bytes + dropped


def student_activation_bytes(arch: Architecture, s: Setting, checkpointing: Optional[bool] = None) -> int:
    """The student's activations kept for backward at the start of backward, per micro-batch of
    ``s.tokens`` tokens. Without checkpointing: every layer's (see ``layer_activation_bytes_per_token``)
    plus the final norm (8·H + H·b per token). With it: each layer's input only (H·b per token),
    and one layer's full set while backward recomputes it."""
    checkpointing = s.checkpointing if checkpointing is None else checkpointing
    per_layer = layer_activation_bytes_per_token(arch, s)
    final_norm = 8 * arch.hidden + arch.hidden * s.dtype_bytes
    if checkpointing:
        return s.tokens * (arch.layers * arch.hidden * s.dtype_bytes + per_layer + final_norm)
    return s.tokens * (arch.layers * per_layer + final_norm)


def student_backward_workspace_bytes(arch: Architecture, s: Setting) -> int:
    """Gradients of activations alive while backward goes through one layer: the MLP's (gate, up,
    their product and SiLU's, 4·I·b per token) and the incoming and outgoing hidden-state gradients
    (2·H·b)."""
    return s.tokens * (4 * arch.intermediate + 2 * arch.hidden) * s.dtype_bytes


@dataclass(frozen=True)
class KernelSweep:
    """One fused-kernel call of the objective: its rows and which heads it reads."""

    rows: int
    with_logps: bool = True
    teachers: int = 0  # 1: a divergence against the teacher; 2: ADPA's advantage (teacher and its reference)
    holds_grads: bool = False  # gradients formed in the forward sweep and held until backward
    jsd: bool = False


def kernel_sweeps(objective, s: Setting) -> List[KernelSweep]:
    """The fused-kernel calls an objective makes per micro-batch, as it declares them
    (``objective.needs().kernel_calls``), each over its rows in the worst case (all positions are
    response tokens): a call over one sequence a pair (the chosen or the rejected responses) reads
    micro_batch x max_length rows; over both, twice that."""
    per_sequence = s.micro_batch * s.max_length
    return [KernelSweep(per_sequence * (2 if call.rows == "both" else 1), with_logps=call.with_logps,
                        teachers=call.teachers, holds_grads=call.reduced, jsd=call.jsd)
            for call in objective.needs().kernel_calls]


def kernel_workspace_bytes(sweep: KernelSweep, arch: Architecture, s: Setting, teacher_vocab: int) -> int:
    """The row-chunk buffers of one call, by the kernels' own rule (``chunk_plan.plan_chunks``, the
    budgeted row-chunk algorithm on every device: the Triton row sweep on GPU, torch's on CPU): the
    fp32 logit chunks of the student (V) and of each teacher (the shared vocabulary), the torch row
    sweep's scratch, or, at the end, the fp32 gradients cast to the model dtype if that is more; plus
    the per-row vectors. The dW and dh accumulators the rule also counts are the
    ``kernel_gradient_bytes`` term, so they are taken out here."""
    plan = _chunk_plan(sweep, arch, s, min(arch.vocab, teacher_vocab) if sweep.teachers else 0)
    # At the end the chunk buffers are gone and the gradients' cast takes their place.
    return max(plan.rows_per_chunk * plan.row_bytes, plan.cast_bytes) + plan.scratch_bytes + 8 * sweep.rows * 4


def _chunk_plan(sweep: KernelSweep, arch: Architecture, s: Setting, shared: int) -> ChunkPlan:
    """The kernels' plan for one call of ``sweep`` (at temperature 1, a divergence over the
    teacher's vocabulary)."""
    kind = "none" if not sweep.teachers else "advantage" if sweep.teachers == 2 else "jsd" if sweep.jsd else "forward_kl"
    spec = SweepSpec(kind=kind, vocab_size=shared, with_logps=sweep.with_logps,
                     weight_grad=_head_grad_rows(arch, s) > 0)
    # The GPU computes in the model dtype; the CPU upcasts half inputs to fp32.
    dtype = torch.float32 if s.dtype_bytes == 4 or not s.on_gpu else torch.bfloat16
    device = torch.device("cuda" if s.on_gpu else "cpu")
    return plan_chunks(spec, sweep.rows, arch.vocab, arch.hidden, budget_bytes(s.chunk_budget_mb, device),
                       input_dtype=dtype, row_sweep="triton" if s.on_gpu else "torch")


def _grad_bytes(sweep: KernelSweep, arch: Architecture, s: Setting, shared: int) -> int:
    """Bytes per element of the kernels' dW and dh accumulators (``_chunk_plan``)."""
    return torch.finfo(_chunk_plan(sweep, arch, s, shared).grad_dtype).bits // 8


def _head_grad_rows(arch: Architecture, s: Setting) -> int:
    return 0 if s.lora_rank else arch.vocab  # a frozen head (a LoRA student) gets no dW


def kernel_gradient_bytes(sweep: KernelSweep, arch: Architecture, s: Setting,
                          teacher_vocab: Optional[int] = None) -> int:
    """The gradients a call forms for the student's inputs: dW [V, H] and dh [N, H], accumulated in
    fp32 where the kernels' budget holds fp32 accumulators (always on CPU, which computes in fp32;
    ``_grad_bytes``), else in the model dtype; plus the compacted copy of the
    student's hidden rows the call keeps for backward (N·H·b). A frozen head (a LoRA student) gets
    no dW: the kernels skip it. The GPU's final cast to the model dtype is in
    ``kernel_workspace_bytes``. ``teacher_vocab``: the teachers' vocabulary (default: the student's)."""
    shared = min(arch.vocab, arch.vocab if teacher_vocab is None else teacher_vocab) if sweep.teachers else 0
    grad_bytes = _grad_bytes(sweep, arch, s, shared)
    return ((_head_grad_rows(arch, s) + sweep.rows) * arch.hidden * grad_bytes
            + sweep.rows * arch.hidden * s.dtype_bytes)


def teacher_shard_bytes(arch: Architecture, s: Setting) -> int:
    """A frozen teacher in the model dtype under ZeRO-3 over the same W ranks: P·b/W; none on the
    GPU with deepspeed.teacher_offload (the shards live in host memory)."""
    if s.teacher_offload and s.on_gpu:
        return 0
    return _ceil_div(arch.params * s.dtype_bytes, s.ranks)


def teacher_head_bytes(arch: Architecture, s: Setting) -> int:
    """The teacher's LM head, gathered once at build time into a plain tensor: a full V·H·b copy on
    every rank (the kernels read all of it at every step)."""
    return arch.vocab * arch.hidden * s.dtype_bytes


def teacher_gathered_bytes(arch: Architecture, s: Setting) -> int:
    """What ZeRO-3 gathers at a time for the teacher's forward: its largest module (the embedding,
    V·H) plus the prefetch bucket, at most stage3_max_live_parameters, in the model dtype."""
    live = min(arch.largest_module_params + min(s.prefetch_bucket, arch.params), max(s.max_live, arch.largest_module_params))
    return live * s.dtype_bytes


def teacher_forward_bytes(arch: Architecture, s: Setting) -> int:
    """The teacher's no-grad forward holds one layer at a time: the residual stream and the layer
    input (2·H·b per token) and the MLP's widest moment, gate, up and their product (3·I·b)."""
    return s.tokens * (2 * arch.hidden + 3 * arch.intermediate) * s.dtype_bytes


def teacher_hidden_bytes(arch: Architecture, s: Setting) -> int:
    """The teacher's final hidden states, kept through the student's forward and backward for the
    kernels: tokens·H·b, and the kernel's compacted copy of them (the same again)."""
    return 2 * s.tokens * arch.hidden * s.dtype_bytes


@dataclass
class Term:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    setting: Setting
    terms: List[Term]
    phases: Dict[str, List[str]]  # phase -> names of the terms alive in it

    def phase_bytes(self, phase: str) -> int:
        by_name = {t.name: t.bytes for t in self.terms}
        return sum(by_name[name] for name in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)


@dataclass(frozen=True)
class Models:
    student: Architecture
    teachers: Tuple[Tuple[str, Architecture], ...] = ()  # online every step
    precomputed: Tuple[Tuple[str, Architecture], ...] = ()  # frozen models loaded for the cached log-probs
    served: Tuple[Tuple[str, str], ...] = ()  # (model key, URL): cached log-probs from a server, no memory here


def build_plan(models: Models, objective, s: Setting) -> Plan:
    """Every term for this setting, and which of them are alive in each phase of a step."""
    st = models.student
    terms = [
        Term("student parameters", student_params_bytes(st, s)),
        Term("student gradients", student_grads_bytes(st, s)),
        Term("student reduce bucket", student_reduce_bucket_bytes(st, s)),
        Term("student stage-0 all-reduce copy", student_allreduce_bytes(st, s)),
        Term("student reduce-scatter copy", student_reduce_copy_bytes(st, s),
             "during backward" if bucket_fills_in_backward(st, s) else "after backward"),
        Term("student fp32 master weights", student_master_bytes(st, s)),
        Term("student AdamW moments", student_moments_bytes(st, s)),
        Term("student fp32 gradients at the step", student_step_fp32_grads_bytes(st, s)),
        Term("AdamW temporary", student_optimizer_temp_bytes(st, s)),
        Term("student ZeRO-3 gathered", student_gathered_bytes(st, s)),
        Term("student activations", student_activation_bytes(st, s),
             "with activation checkpointing" if s.checkpointing else "without activation checkpointing"),
        Term("student backward workspace", student_backward_workspace_bytes(st, s)),
    ]
    # Gradients already accumulated from earlier micro-batches of the step are alive in the next one's forward.
    persistent = ["student parameters", "student reduce bucket", "student fp32 master weights", "student AdamW moments"]
    if s.zero_stage == 3 and not s.fsdp2:
        persistent.append("student gradients")  # stage 3's flat partition buffer is allocated once
    # FSDP2 frees the gradients after each step (zero_grad to None) and forms each layer's shard as its
    # backward ends, while the activations go: they peak at the step, not in the forward.
    accumulated = ["student gradients"] if s.grad_accum > 1 and (s.zero_stage < 3 or s.fsdp2) else []

    sweeps = kernel_sweeps(objective, s)
    teacher_vocab = min((arch.vocab for _, arch in models.teachers), default=st.vocab)
    workspace = max(kernel_workspace_bytes(sw, st, s, teacher_vocab) for sw in sweeps)
    held = [sw for sw in sweeps if sw.holds_grads]
    gradients = sum(kernel_gradient_bytes(sw, st, s, teacher_vocab) for sw in held) if held else \
        max(kernel_gradient_bytes(sw, st, s, teacher_vocab) for sw in sweeps)
    terms += [Term("kernel row-chunk buffers", workspace),
              Term("kernel dW [V, H] and dh accumulators", gradients,
                   f"{len(held)} call(s) form gradients in the forward and hold them" if held
                   else "formed in backward")]

    teacher_terms: List[str] = []
    teacher_forward: List[str] = []
    teacher_hidden: List[str] = []
    for key, arch in models.teachers:
        terms += [Term(f"{key} shard", teacher_shard_bytes(arch, s)),
                  Term(f"{key} gathered LM head", teacher_head_bytes(arch, s)),
                  Term(f"{key} ZeRO-3 gathered", teacher_gathered_bytes(arch, s)),
                  Term(f"{key} forward (no grad)", teacher_forward_bytes(arch, s)),
                  Term(f"{key} hidden states", teacher_hidden_bytes(arch, s))]
        teacher_terms += [f"{key} shard", f"{key} gathered LM head"]
        teacher_forward += [f"{key} ZeRO-3 gathered", f"{key} forward (no grad)"]
        teacher_hidden.append(f"{key} hidden states")

    precompute_terms: List[str] = []
    for key, arch in models.precomputed:
        name = f"{key} (precompute)"
        terms.append(Term(name, teacher_shard_bytes(arch, s) + teacher_head_bytes(arch, s)
                          + teacher_gathered_bytes(arch, s) + teacher_forward_bytes(arch, s)
                          + teacher_hidden_bytes(arch, s),
                          "shard, head, gathered, no-grad forward, hidden states; freed before training"))
        precompute_terms.append(name)
    if models.precomputed:  # the log-prob sweep without gradients: its buffers only
        terms.append(Term("kernel buffers (precompute)", kernel_workspace_bytes(KernelSweep(s.tokens), st, s, st.vocab)))

    phases = {
        "student forward/backward": persistent + accumulated + teacher_terms + teacher_hidden + [
            "student ZeRO-3 gathered", "student activations", "student backward workspace",
            "kernel row-chunk buffers", "kernel dW [V, H] and dh accumulators"],
        "optimizer step": _unique(persistent + ["student gradients", "student fp32 gradients at the step",
                                                "AdamW temporary"] + teacher_terms),
    }
    if s.zero_stage == 3 and bucket_fills_in_backward(st, s):
        phases["student forward/backward"].append("student reduce-scatter copy")
    elif s.zero_stage == 3:  # the one reduction of the last bucket, after backward
        phases["gradient reduce-scatter"] = persistent + ["student reduce-scatter copy"] + teacher_terms
    if s.zero_stage == 0:  # after backward, before the step: every gradient and its flattened copy
        phases["gradient all-reduce"] = persistent + ["student gradients", "student stage-0 all-reduce copy"] + \
            teacher_terms
    if models.teachers:
        phases["teacher forward"] = persistent + accumulated + teacher_terms + teacher_forward
    if models.precomputed:
        # Before the first step: no AdamW moments yet (torch allocates them at the first step).
        phases["precompute"] = [n for n in persistent if n != "student AdamW moments"] + precompute_terms + [
            "kernel buffers (precompute)"]
    return Plan(s, terms, {k: _unique(v) for k, v in phases.items()})


def _unique(names: List[str]) -> List[str]:
    return list(dict.fromkeys(names))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
