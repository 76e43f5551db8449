"""``fastdadpo plan CONFIG.yaml``: the memory one training step needs per GPU, before launching.

It reads the training config and the models' architecture configs only (no weights), and adds up,
per rank, one small function per term below (each says where its bytes come from): the student's
parameters, gradients and AdamW states under the ZeRO stage and offload in force, each online
teacher's ZeRO-3 shard plus its gathered LM head (a full copy per rank) plus what ZeRO-3 gathers
at a time, the student's activations at ``data.max_length`` (with and without activation
checkpointing), the teachers' no-grad forward, and the fused kernels' buffers (their own row-chunk
rule, and the dW accumulator [V, H]). Terms that are alive together are summed per phase of a step
(precompute, teacher forward, student forward/backward, optimizer step); the peak is the largest
phase. Then: the largest micro-batch that fits ``--gpu-memory``, and what to change when nothing fits.

Figures are planned for the worst case of the config: every sequence ``data.max_length`` tokens,
every position a response token. ``--device cpu`` plans what a CPU run holds in host memory (fp32,
the chunked-torch kernels), the mode ``bench/plan_check.py`` checks against measured peak RSS.

A model named by a path that is not a local directory (a hub name, or a run's output that does not
exist yet) is looked up in the architecture tables shipped in ``fastdadpo/plan_data/`` by hub name,
else by a distinctive part of the path (``runs/qwen2.5-1.5b-dsft/final`` is Qwen2.5-1.5B); the output
says so. ``--arch model.student=NAME`` names the table to use.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .errors import ConfigError
from .kernels.chunk_plan import ChunkPlan, budget_bytes, plan_chunks
from .kernels.sweep import SweepSpec

GIB = 2**30
PLAN_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_data")

# DeepSpeed's ZeRO defaults (deepspeed.runtime.zero.config), used unless deepspeed.extra sets them.
DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size, elements
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size, elements
DS_MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters, elements
DS_PERSISTENCE = 100_000  # stage3_param_persistence_threshold, elements: smaller parameters stay gathered
# The largest micro-batch the search tries.
MAX_MICRO_BATCH = 4096
# Architectures Liger's RMSNorm/SwiGLU patches apply to (model.liger_kernels auto, on CUDA).
LIGER_ARCHS = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "phi3")


# --- architectures ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """The shapes the memory model needs, from a model's config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # LM-head rows
    tied: bool
    model_type: str = "llama"
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = ""
    source: str = ""  # where the shapes came from, for the output

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """One decoder layer: q/k/v/o projections (+ q/k/v biases: Qwen2 always has them), the
        gated MLP's gate/up/down (3·H·I), two RMSNorm weights (2·H)."""
        h = self.hidden
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.attention_bias:
            attention += self.q_dim + 2 * self.kv_dim
        mlp = 3 * h * self.intermediate + (2 * self.intermediate + h if self.mlp_bias else 0)
        return attention + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Embedding V·H, the layers, the final norm H, and an untied LM head V·H."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embedding_params + self.layers * self.layer_params() + self.hidden + head

    @property
    def largest_module_params(self) -> int:
        """The largest set of parameters ZeRO-3 gathers for one module's forward: the embedding
        (or LM head, V·H) or the widest projection (an MLP matrix H·I, or q_proj H·q_dim)."""
        return max(self.embedding_params, self.hidden * self.intermediate, self.hidden * self.q_dim)

    def linear_shapes(self) -> Dict[str, Tuple[int, int]]:
        """(in, out) features of each decoder projection, by the module names LoRA targets."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def lora_params(self, rank: int, targets: Tuple[str, ...]) -> int:
        """LoRA adapters: A [r, in] and B [out, r] per targeted projection per layer, r·(in + out)."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * sum(shapes[t]) for t in targets if t in shapes)

    def describe(self) -> str:
        kv = f" ({self.kv_heads} KV)" if self.kv_heads != self.heads else ""
        return (f"{self.params / 1e9:.2f}B parameters, hidden {self.hidden}, {self.layers} layers, {self.heads} heads"
                f"{kv}, MLP {self.intermediate}, vocabulary {self.vocab:,}{', tied embeddings' if self.tied else ''}")


def architecture_from_config(values: dict, name: str = "", source: str = "") -> Architecture:
    """An Architecture from a Hugging Face config's fields (a dict)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source or name}: the model config must be a JSON object, got {type(values).__name__}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if values.get(k) is None]
    if missing:
        raise ConfigError(f"{source or name}: the model config has no {', '.join(missing)}; fastdadpo plan "
                          f"covers dense decoder configs (Llama, Qwen2, Mistral and their kind)")
    shape = {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "num_key_value_heads", "head_dim"):
        value = values.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source or name}: {key} is {value!r}; a model's shape is positive integers")
        shape[key] = value
    heads = shape["num_attention_heads"]
    hidden = shape["hidden_size"]
    model_type = str(values.get("model_type", "llama"))
    return Architecture(
        hidden=hidden, layers=int(values["num_hidden_layers"]), heads=heads,
        kv_heads=int(values.get("num_key_value_heads") or heads),
        head_dim=int(values.get("head_dim") or hidden // heads), intermediate=int(values["intermediate_size"]),
        vocab=int(values["vocab_size"]), tied=bool(values.get("tie_word_embeddings", False)), model_type=model_type,
        attention_bias=model_type == "qwen2" or bool(values.get("attention_bias", False)),
        mlp_bias=bool(values.get("mlp_bias", False)), name=name, source=source)


def known_architectures() -> Dict[str, dict]:
    """{table name: entry} of the shipped tables (``fastdadpo/plan_data/*.json``)."""
    tables = {}
    for path in sorted(glob.glob(os.path.join(PLAN_DATA, "*.json"))):
        with open(path, encoding="utf-8") as handle:
            tables[os.path.splitext(os.path.basename(path))[0]] = json.load(handle)
    return tables


def _known_match(path: str) -> Optional[Tuple[str, str]]:
    """(table name, why) for a path that is not a local directory: an exact hub name first, else the
    longest path hint found in the lowercased path (``vicuna-7b-pruned20`` before ``vicuna-7b``)."""
    tables = known_architectures()
    lowered = path.lower().rstrip("/")
    for table, entry in tables.items():
        if lowered in (n.lower() for n in entry.get("names", ())) or lowered == table:
            return table, "by name"
    hints = sorted(((hint.lower(), table) for table, entry in tables.items() for hint in entry.get("path_hints", ())),
                   key=lambda pair: -len(pair[0]))
    for hint, table in hints:
        if hint in lowered:
            return table, f"'{hint}' in the path"
    return None


def load_architecture(path: str, key: str, table: Optional[str] = None) -> Architecture:
    """The architecture of ``model.<key>``: its local directory's config.json, else a shipped table."""
    tables = known_architectures()
    if table is None and path and os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ConfigError(f"{key}: {path} is a directory without config.json; give a Hugging Face model directory")
        try:
            with open(config_path, encoding="utf-8") as handle:
                values = json.load(handle)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot read {config_path}: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{key}: {config_path} must hold a JSON object, found a {type(values).__name__}")
        values = values.get("text_config", values) if "hidden_size" not in values else values
        return architecture_from_config(values, name=path, source=f"{config_path}")
    if table is not None:
        if table not in tables:
            raise ConfigError(f"--arch {key}={table}: no such architecture table; known: {', '.join(tables)}")
        why = "given by --arch"
    else:
        match = _known_match(path or "")
        if match is None:
            raise ConfigError(f"{key}: {path!r} is not a local model directory and not a known architecture "
                              f"(tables: {', '.join(tables)}); give a local Hugging Face directory, or name a table "
                              f"with --arch {key}=NAME")
        table, why = match
    entry = tables[table]
    return architecture_from_config(
        entry["config"], name=entry.get("title", table),
        source=f"known architecture table {table} ({why}; shapes from {entry.get('source', 'its config')})")


# --- the setting a plan is made for ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """Everything the terms depend on besides the architectures."""

    ranks: int = 1  # gpus x nodes: ZeRO shards over all of them
    device: str = "gpu"  # gpu | cpu (host memory, the chunked-torch kernels)
    dtype_bytes: int = 2  # model.dtype: 2 for bf16/fp16, 4 for fp32
    zero_stage: int = 3
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
    def tokens(self) -> int:
        """Student tokens per micro-batch: micro_batch x sequences x max_length (the worst case)."""
        return self.micro_batch * self.sequences * self.max_length

    @property
    def on_gpu(self) -> bool:
        return self.device == "gpu"


# --- the terms: one function each, bytes per rank -----------------------------------------------------------------
# P: parameters, W: ranks, b: the model dtype's bytes (2 bf16/fp16, 4 fp32), V/H: vocabulary and hidden size.
# With model.lora the weights are the frozen base plus the adapters, and everything the optimizer holds
# (gradients, master weights, moments) covers the adapters only: ``trained_params``.

def stored_params(arch: Architecture, s: Setting) -> int:
    """Parameters held as weights: the model's, plus LoRA's adapters when there are some."""
    return arch.params + (arch.lora_params(s.lora_rank, s.lora_targets) if s.lora_rank else 0)


def trained_params(arch: Architecture, s: Setting) -> int:
    """Parameters the optimizer updates: all of them, or LoRA's adapters only."""
    return arch.lora_params(s.lora_rank, s.lora_targets) if s.lora_rank else arch.params


def student_params_bytes(arch: Architecture, s: Setting) -> int:
    """The student's weights in the model dtype: P·b on every rank below stage 3; stage 3 keeps a
    1/W shard (P·b/W), and none on the GPU with offload_param (the shard lives in host memory)."""
    total = stored_params(arch, s) * s.dtype_bytes
    if s.zero_stage < 3:
        return total
    if s.offload_param and s.on_gpu:
        return 0
    return _ceil_div(total, s.ranks)


def student_grads_bytes(arch: Architecture, s: Setting) -> int:
    """The gradients in the model dtype, before the optimizer step. Stages 0-1: every rank holds the
    full P·b (stage 1 partitions the optimizer only). Stage 2: the rank's reduced partition P·b/W.
    Stage 3: its flat partition buffer P·b/W (host memory with offload_optimizer)."""
    total = trained_params(arch, s) * s.dtype_bytes
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
    if s.zero_stage < 2:
        return 0
    return _bucket_elements(arch, s) * s.dtype_bytes


def student_reduce_copy_bytes(arch: Architecture, s: Setting) -> int:
    """Stage 3's reduce-scatter concatenates a full bucket's padded partitions into one more flat
    tensor of the bucket's size while it reduces it. A bucket fills, and is reduced, during backward
    when the gradients outnumber it (P > reduce_bucket_size: then this copy meets the activations);
    otherwise only once, after backward (``bucket_fills_in_backward``)."""
    if s.zero_stage != 3:
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
    if s.offload_optimizer and s.on_gpu:
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
    if s.zero_stage:
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


# --- putting terms together ---------------------------------------------------------------------------------------

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
    if s.zero_stage == 3:
        persistent.append("student gradients")  # stage 3's flat partition buffer is allocated once
    accumulated = ["student gradients"] if s.grad_accum > 1 and s.zero_stage < 3 else []

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


# --- from a config ---------------------------------------------------------------------------------------------

def setting_from_config(config, *, ranks: int, device: str, micro_batch: Optional[int] = None,
                        checkpointing: Optional[bool] = None, **changes) -> Setting:
    """The Setting a training config asks for, on ``ranks`` ranks of ``device``."""
    zero = dict(config.deepspeed.extra.get("zero_optimization", {}))
    dtype = config.model.dtype or ("bf16" if device == "gpu" else "fp32")

    def offloaded(section: str) -> bool:
        return str(zero.get(section, {}).get("device", "none")).lower() in ("cpu", "nvme")

    student_type = changes.pop("student_type", "")
    liger_setting = getattr(config.model, "liger_kernels", False)
    liger = device == "gpu" and liger_setting is not False and student_type in LIGER_ARCHS
    values = dict(
        ranks=ranks, device=device, dtype_bytes=4 if dtype == "fp32" else 2, zero_stage=config.deepspeed.zero_stage,
        offload_optimizer=offloaded("offload_optimizer"), offload_param=offloaded("offload_param"),
        teacher_offload=config.deepspeed.teacher_offload,
        micro_batch=micro_batch or config.train.micro_batch_size, grad_accum=config.train.grad_accum,
        sequences=2 if config.objective.needs().uses_rejected else 1, max_length=config.data.max_length,
        checkpointing=bool(getattr(config.train, "gradient_checkpointing", False)) if checkpointing is None
        else checkpointing, liger=liger,
        reduce_bucket=int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", zero.get("prefetch_bucket_size",
                                                                               DS_PREFETCH_BUCKET))),
        max_live=int(zero.get("stage3_max_live_parameters", zero.get("max_live_parameters", DS_MAX_LIVE))),
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold",
                                           zero.get("param_persistence_threshold", DS_PERSISTENCE))),
        chunk_budget_mb=config.kernels.chunk_budget_mb)
    lora = getattr(config.model, "lora", None)
    if lora is not None:
        values.update(lora_rank=int(lora.r), lora_targets=tuple(lora.target_modules), lora_dropout=float(lora.dropout))
    values.update(changes)
    return Setting(**values)


def models_from_config(config, tables: Optional[Dict[str, str]] = None) -> Models:
    """The architectures of the student, the teachers online every step, and the frozen models
    loaded before training for cached log-probs (``fastdadpo.precompute``)."""
    tables = tables or {}
    model, objective = config.model, config.objective

    def arch(key: str) -> Architecture:
        return load_architecture(getattr(model, key), f"model.{key}", tables.get(f"model.{key}"))

    student = arch("student")
    needs = objective.needs()
    online = [(key, arch(key)) for key in needs.online]
    # π_ref unset is the starting student: nothing more to load for it.
    precomputed = [(key, arch(key)) for key in needs.cached if key != "reference" or model.reference]
    return Models(student=student, teachers=tuple(online), precomputed=tuple(precomputed))


@dataclass
class Report:
    """A plan at the config's micro-batch, the searches around it, and what to change."""

    config_path: str
    models: Models
    objective: str
    setting: Setting
    memory_bytes: int
    plan: Plan
    plan_other_checkpointing: Plan
    largest: int  # largest micro-batch that fits, 0 if none
    largest_other_checkpointing: int
    suggestions: List[str] = field(default_factory=list)
    gpus: int = 1
    nodes: int = 1

    @property
    def fits(self) -> bool:
        return self.plan.peak_bytes <= self.memory_bytes

    def to_json(self) -> dict:
        s = self.setting

        def plan_json(plan: Plan) -> dict:
            return {"checkpointing": plan.setting.checkpointing,
                    "terms": {t.name: t.bytes for t in plan.terms},
                    "phases": {k: {"bytes": plan.phase_bytes(k), "terms": v} for k, v in plan.phases.items()},
                    "peak_bytes": plan.peak_bytes, "peak_phase": plan.peak_phase}

        with_ck, without_ck = ((self.plan, self.plan_other_checkpointing) if s.checkpointing
                               else (self.plan_other_checkpointing, self.plan))
        largest_with, largest_without = ((self.largest, self.largest_other_checkpointing) if s.checkpointing
                                         else (self.largest_other_checkpointing, self.largest))
        return {
            "config": self.config_path, "objective": self.objective,
            "models": {key: {**dataclasses.asdict(arch), "params": arch.params}
                       for key, arch in [("student", self.models.student), *self.models.teachers,
                                         *[(f"{k} (precompute)", a) for k, a in self.models.precomputed]]},
            "setting": dataclasses.asdict(s), "gpus": self.gpus, "nodes": self.nodes, "ranks": s.ranks,
            "memory_bytes": self.memory_bytes, "micro_batch_size": s.micro_batch, "tokens_per_micro_batch": s.tokens,
            "terms": {t.name: t.bytes for t in self.plan.terms},
            "phases": {k: {"bytes": self.plan.phase_bytes(k), "terms": v} for k, v in self.plan.phases.items()},
            "peak_bytes": self.plan.peak_bytes, "peak_phase": self.plan.peak_phase, "fits": self.fits,
            "without_checkpointing": plan_json(without_ck), "with_checkpointing": plan_json(with_ck),
            "largest_micro_batch": self.largest,
            "largest_micro_batch_without_checkpointing": largest_without,
            "largest_micro_batch_with_checkpointing": largest_with,
            "suggestions": self.suggestions,
        }


def largest_micro_batch(models: Models, objective, s: Setting, memory_bytes: int) -> int:
    """The largest micro-batch (up to MAX_MICRO_BATCH) whose peak fits; 0 if not even 1 does.
    Peak grows with the micro-batch, so a doubling then a bisection finds it."""
    def fits(mb: int) -> bool:
        return build_plan(models, objective, dataclasses.replace(s, micro_batch=mb)).peak_bytes <= memory_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_MICRO_BATCH and fits(high):
        low, high = high, high * 2
    high = min(high, MAX_MICRO_BATCH + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def suggestions(models: Models, objective, s: Setting, memory_bytes: int, gpus: int, nodes: int) -> List[str]:
    """What would make micro-batch 1 fit when it does not: each change alone, with its peak."""
    out = []

    def peak(**changes) -> int:
        return build_plan(models, objective, dataclasses.replace(s, micro_batch=1, **changes)).peak_bytes

    def add(what: str, **changes):
        value = peak(**changes)
        out.append(f"{what}: peak {_gib(value)} at micro-batch 1 ({'fits' if value <= memory_bytes else 'still too large'})")

    if not s.checkpointing:
        add("train.gradient_checkpointing: true", checkpointing=True)
    if s.zero_stage < 3:
        add("deepspeed.zero_stage: 3", zero_stage=3)
    if s.on_gpu and not s.offload_optimizer:
        add("deepspeed.extra.zero_optimization.offload_optimizer: {device: cpu}", offload_optimizer=True)
    if s.on_gpu and s.zero_stage == 3 and not s.offload_param:
        add("deepspeed.extra.zero_optimization.offload_param: {device: cpu} (with offload_optimizer)",
            offload_param=True, offload_optimizer=True)
    if s.on_gpu and models.teachers and not s.teacher_offload and s.zero_stage == 3:
        add("deepspeed.teacher_offload: true", teacher_offload=True)
    if s.on_gpu and not s.offload_optimizer:
        add("all of the above", checkpointing=True, zero_stage=3, offload_optimizer=True, offload_param=True,
            teacher_offload=bool(models.teachers))
    for more in (2, 4, 8, 16):
        ranks = s.ranks * more
        if peak(ranks=ranks) <= memory_bytes:
            out.append(f"more GPUs: {ranks} ranks ({nodes * more} nodes of {gpus}) fit micro-batch 1 "
                       f"(peak {_gib(peak(ranks=ranks))})")
            break
    else:
        out.append(f"more GPUs alone do not help enough: even {s.ranks * 16} ranks need {_gib(peak(ranks=s.ranks * 16))} "
                   f"(the unsharded terms: gathered heads, activations, kernel buffers)")
    return out


def make_report(config, *, config_path: str, gpus: int, nodes: int, memory_gb: float, device: str = "gpu",
                tables: Optional[Dict[str, str]] = None, micro_batch: Optional[int] = None) -> Report:
    models = models_from_config(config, tables)
    s = setting_from_config(config, ranks=gpus * nodes, device=device, micro_batch=micro_batch,
                            student_type=models.student.model_type)
    memory = int(memory_gb * GIB)
    plan = build_plan(models, config.objective, s)
    other = dataclasses.replace(s, checkpointing=not s.checkpointing)
    report = Report(config_path=config_path, models=models, objective=config.objective.name, setting=s,
                    memory_bytes=memory, plan=plan, plan_other_checkpointing=build_plan(models, config.objective, other),
                    largest=largest_micro_batch(models, config.objective, s, memory),
                    largest_other_checkpointing=largest_micro_batch(models, config.objective, other, memory),
                    gpus=gpus, nodes=nodes)
    if report.largest == 0:
        report.suggestions = suggestions(models, config.objective, s, memory, gpus, nodes)
    return report


# --- text ------------------------------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def headline(report: Report) -> str:
    """One line: the peak against the memory, and the largest micro-batch."""
    s = report.setting
    where = "GPU" if s.on_gpu else "rank (host memory)"
    ck = "with" if s.checkpointing else "without"
    other = "with" if not s.checkpointing else "without"
    verdict = "fits" if report.fits else "does NOT fit"
    return (f"plan: peak {_gib(report.plan.peak_bytes)} per {where} at micro-batch {s.micro_batch} "
            f"({report.plan.peak_phase}, {ck} activation checkpointing), {verdict} in {report.memory_bytes / GIB:.1f} "
            f"GiB; largest micro-batch {_capped(report.largest)} ({_capped(report.largest_other_checkpointing)} {other} "
            f"checkpointing)")


def _capped(micro_batch: int) -> str:
    return f">= {micro_batch}" if micro_batch >= MAX_MICRO_BATCH else str(micro_batch)


def render(report: Report) -> str:
    s = report.setting
    lines = [f"fastdadpo plan: {report.config_path}: objective {report.objective}, "
             f"{report.nodes} node(s) x {report.gpus} {'GPU' if s.on_gpu else 'rank'}(s) = {s.ranks} rank(s), "
             f"{report.memory_bytes / GIB:g} GiB each, {'fp32' if s.dtype_bytes == 4 else '16-bit'} weights, "
             f"ZeRO stage {s.zero_stage}"
             + (", optimizer offloaded" if s.offload_optimizer else "") + (", parameters offloaded" if s.offload_param else "")
             + (", teachers offloaded" if s.teacher_offload and report.models.teachers else "")]
    for key, arch in [("model.student", report.models.student),
                      *[(f"model.{k} (online)", a) for k, a in report.models.teachers],
                      *[(f"model.{k} (cached log-probs, before training)", a) for k, a in report.models.precomputed]]:
        lines.append(f"  {key}: {arch.name}: {arch.describe()}")
        lines.append(f"      from {arch.source}")
    lines.append(f"per {'GPU' if s.on_gpu else 'rank'} at micro-batch {s.micro_batch} ({s.micro_batch} x {s.sequences} "
                 f"sequence(s) x {s.max_length} tokens = {s.tokens:,} tokens), grad_accum {s.grad_accum}:")
    other = {t.name: t.bytes for t in report.plan_other_checkpointing.terms}
    for term in report.plan.terms:
        extra = ""
        if term.name == "student activations":
            extra = f"  ({'without' if s.checkpointing else 'with'} checkpointing: {_gib(other[term.name])})"
        note = f"  [{term.note}]" if term.note else ""
        lines.append(f"  {term.name:<42} {_gib(term.bytes):>12}{extra}{note}")
    lines.append("phases (the terms alive together):")
    for phase in report.plan.phases:
        mark = "  <- peak" if phase == report.plan.peak_phase else ""
        lines.append(f"  {phase:<42} {_gib(report.plan.phase_bytes(phase)):>12}{mark}")
    ck_on = "on" if s.checkpointing else "off"
    lines.append(f"peak {_gib(report.plan.peak_bytes)} of {report.memory_bytes / GIB:g} GiB "
                 f"(checkpointing {ck_on}): {'fits' if report.fits else 'does NOT fit'}; with checkpointing "
                 f"{'off' if s.checkpointing else 'on'} (train.gradient_checkpointing): "
                 f"{_gib(report.plan_other_checkpointing.peak_bytes)}")
    lines.append(f"largest micro-batch per {'GPU' if s.on_gpu else 'rank'}: {report.largest} with checkpointing {ck_on}, "
                 f"{report.largest_other_checkpointing} with it {'off' if s.checkpointing else 'on'}"
                 + (f" (search capped at {MAX_MICRO_BATCH})" if MAX_MICRO_BATCH in (report.largest,
                                                                                   report.largest_other_checkpointing) else ""))
    if report.suggestions:
        lines.append("nothing fits at micro-batch 1; each of these changes alone gives:")
        lines += [f"  - {text}" for text in report.suggestions]
    return "\n".join(lines)


def training_headline(config, world_size: int, device) -> str:
    """The plan's one-line headline for ``fastdadpo train`` at start, on this run's ranks and device
    (a GPU's total memory; on CPU the host memory shared by this node's ranks). Never fails the run:
    a config the planner cannot read gives a line saying so."""
    try:
        if getattr(device, "type", str(device)) == "cuda":
            import torch

            memory_gb = torch.cuda.get_device_properties(device).total_memory / GIB
            kind = "gpu"
        else:
            import psutil

            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or 1)
            memory_gb = psutil.virtual_memory().total / GIB / max(1, local)
            kind = "cpu"
        return headline(make_report(config, config_path=config.source, gpus=world_size, nodes=1, memory_gb=memory_gb,
                                    device=kind))
    except Exception as exc:  # the plan is advice: a training run never stops for it
        return f"plan: unavailable ({' '.join(str(exc).split())[:200]})"


# --- the command -------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("config", help="the training config (YAML), as for fastdadpo train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for fastdadpo train")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes; ZeRO shards over gpus x nodes ranks")
    parser.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                        help="memory per GPU in GiB (per rank, host memory, with --device cpu)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="gpu: 16-bit unless model.dtype says otherwise, the chunked CUDA kernels; cpu: host "
                             "memory of a CPU run (fp32 by default, the chunked-torch kernels)")
    parser.add_argument("--micro-batch", type=int, default=None, help="plan this micro-batch instead of the config's")
    parser.add_argument("--arch", action="append", default=[], metavar="model.KEY=TABLE",
                        help="use a shipped architecture table for a model (names: fastdadpo/plan_data/*.json)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args) -> int:
    from .config import load_config

    for flag, value in (("--gpus", args.gpus), ("--nodes", args.nodes)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not args.gpu_memory > 0 or not math.isfinite(args.gpu_memory):
        raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ConfigError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    tables = {}
    for item in args.arch:
        key, sep, table = item.partition("=")
        if not sep or not key.startswith("model."):
            raise ConfigError(f"--arch {item!r}: expected model.KEY=TABLE, e.g. --arch model.student=qwen2.5-1.5b-instruct")
        tables[key] = table
    config = load_config(args.config, args.set)
    report = make_report(config, config_path=args.config, gpus=args.gpus, nodes=args.nodes, memory_gb=args.gpu_memory,
                         device=args.device, tables=tables, micro_batch=args.micro_batch)
    print(json.dumps(report.to_json(), indent=1) if args.json else render(report))
    return 0
