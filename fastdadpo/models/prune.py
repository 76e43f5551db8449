"""Structured pruning of a dense decoder-only causal LM (the Llama / Qwen2 / Mistral layout: q/k/v/o
attention projections, gate/up/down MLP) into a smaller model of the same architecture, saved as a
normal Hugging Face model directory. This is how the daDPO paper makes its 20%-pruned students.

What is removed
- MLP channels (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``), the same number in every
  layer: a Hugging Face config has one ``intermediate_size``.
- Attention heads, the same number in every layer. Grouped-query attention stays valid
  (``num_attention_heads`` a multiple of ``num_key_value_heads``) because every KV head is kept and
  the same number of query heads is removed from each KV group: KV heads are few and shared, so
  removing whole groups would be a coarse step (a quarter of Qwen2.5-7B's attention at once). Where
  every group has a single query head (multi-head attention: Vicuna, Llama-2), a removed query head
  takes its KV head with it. ``config.head_dim`` is written explicitly, since ``hidden_size /
  num_attention_heads`` no longer gives it. A config class may still refuse a head count
  (transformers 5's ``LlamaConfig`` wants ``hidden_size`` divisible by ``num_attention_heads`` even
  with ``head_dim`` given): then fewer heads are removed, the MLP takes the rest of the budget, and
  the plan's notes say so.
- Optionally whole decoder layers (``drop_layers``): those with the lowest block influence
  (ShortGPT), ``1 − mean cos(layer input, layer output)`` over calibration tokens: a layer that barely
  turns the residual stream changes the model least when removed.

Importance (activation-aware, Wanda-style, no gradients)
``score(structure) = Σ |W_ij|·‖X_j‖₂`` over the weights that read the structure's output, ``‖X_j‖₂``
the L2 norm of input feature ``j`` over all calibration tokens. For an MLP channel ``c`` that is
``‖h_c‖·Σ_o |W_down[o, c]|`` (``h`` = ``act(gate(x))·up(x)``, the input of ``down_proj``); for a query
head, the same sum over its columns of ``o_proj`` (input: the attention output); for a KV group of
one query head (multi-head attention), that head's score. The output side is scored because all a
channel or head adds to the residual stream goes through those columns: a channel that never
activates, or whose output weights are zero, scores zero. Scores, like the block influences, come
from one forward pass of the original model over the calibration tokens (padding excluded).

How much
``ratio`` is the fraction of the attention + MLP parameters of the kept layers to remove. Attention
heads are removed at that ratio rounded to whole heads per KV group, and the MLP takes the rest of the
budget, so the achieved fraction lands close to the target; when channels are removed,
``intermediate_size`` is rounded to a multiple of ``channel_multiple`` (default 8, for tensor-core
friendly matmuls). The report gives the parameters before and after.

Calibration data
JSONL rows with ``"prompt"`` (a string or chat messages, rendered through the chat template exactly as
training does, followed by the ``"chosen"`` response when the row has one, so response tokens are
seen too) or ``"text"`` (raw text). There is no built-in fallback: random or generic tokens give
activation statistics unlike the model's real use. ``ratio=0`` without dropped layers needs no
calibration and reproduces the original model.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from fastdadpo.base.errors import ConfigError, DataError, UserError
from fastdadpo.core.batch import pad_token_id, padded
from fastdadpo.core.chat import as_messages, prompt_ids, response_ids
from fastdadpo.core.rows import read_rows
from fastdadpo.models.loading import count_parameters, decoder

ROW_SLICED = {"self_attn.q_proj": "query", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv",
              "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp"}
COLUMN_SLICED = {"self_attn.o_proj": "query", "mlp.down_proj": "mlp"}
PRUNABLE_PROJECTIONS = tuple(ROW_SLICED) + tuple(COLUMN_SLICED)
# Config lists with one entry per decoder layer, filtered when layers are dropped.
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")
REPORT_FILE = "pruning_report.json"


@dataclass(frozen=True)
class DecoderGeometry:
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


@dataclass
class PruningPlan:
    """What to keep, in original indices (ascending), and the scores it was chosen by."""
    kept_layers: List[int]
    kept_channels: List[List[int]]    # MLP channels kept, per layer (indexed by original layer)
    kept_heads: List[List[int]]       # query heads kept, per layer
    kept_kv_heads: List[List[int]]    # KV heads kept, per layer
    channel_scores: Optional[List[torch.Tensor]] = None
    head_scores: Optional[List[torch.Tensor]] = None
    layer_influence: Optional[List[float]] = None
    notes: List[str] = field(default_factory=list)   # where the plan departs from what ratio asked


# --- geometry and support checks ---------------------------------------------------------------------------

def decoder_geometry(model) -> DecoderGeometry:
    """The decoder's sizes, after checking it has the layout this module prunes."""
    layers = getattr(decoder(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UserError(f"cannot prune {type(model).__name__}: its decoder has no list of layers named 'layers'; only "
                        f"Llama/Qwen2/Mistral-style decoders are supported")
    for index, layer in enumerate(layers):
        for name in PRUNABLE_PROJECTIONS:
            if not _is_linear(layer, name):
                raise UserError(f"cannot prune {type(model).__name__}: decoder layer {index} has no linear "
                                f"{name}; only dense Llama/Qwen2/Mistral-style decoders (q/k/v/o attention "
                                f"projections and a gate/up/down MLP) are supported")
    config = model.config
    attention = layers[0].self_attn
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = attention.q_proj.out_features // heads
    if heads % kv_heads or attention.k_proj.out_features != kv_heads * head_dim:
        raise UserError(f"cannot prune {type(model).__name__}: {heads} query heads, {kv_heads} KV heads and "
                        f"projection sizes {attention.q_proj.out_features}/{attention.k_proj.out_features} do not "
                        f"describe grouped-query attention")
    return DecoderGeometry(layers=len(layers), hidden_size=config.hidden_size, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim, intermediate_size=layers[0].mlp.down_proj.in_features)


def _is_linear(module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name), torch.nn.Linear)
    except AttributeError:
        return False


def _numel(module: torch.nn.Linear) -> int:
    return module.weight.numel() + _bias_numel(module)


def _bias_numel(module: torch.nn.Linear) -> int:
    return module.bias.numel() if module.bias is not None else 0


def _attention_params(layer) -> int:
    return sum(_numel(layer.get_submodule(name)) for name in PRUNABLE_PROJECTIONS if name.startswith("self_attn"))


def _mlp_params(layer) -> int:
    return sum(_numel(layer.get_submodule(name)) for name in PRUNABLE_PROJECTIONS if name.startswith("mlp"))


def prunable_parameters(model, layers: Optional[Sequence[int]] = None) -> int:
    """Parameters of the attention and MLP projections of ``layers`` (default: all): what ``ratio`` is
    a fraction of."""
    decoder_layers = decoder(model).layers
    return sum(_attention_params(decoder_layers[i]) + _mlp_params(decoder_layers[i])
               for i in (range(len(decoder_layers)) if layers is None else layers))


# --- calibration -------------------------------------------------------------------------------------------

def read_calibration(path: str, tokenizer, *, samples: int, max_length: int, seed: int = 0) -> List[List[int]]:
    """Token ids of up to ``samples`` rows of a data file (any format ``data.read_rows`` reads;
    ``"prompt"`` [+ ``"chosen"``] or ``"text"``), a seeded random subset when the file has more,
    each cut to ``max_length`` tokens."""
    rows = list(read_rows(path))
    if not rows:
        raise DataError(f"{path}: no calibration rows; give rows with a 'prompt' or 'text' field")
    if len(rows) > samples:
        keep = sorted(random.Random(seed).sample(range(len(rows)), samples))
        rows = [rows[i] for i in keep]
    return [_calibration_ids(tokenizer, row, source)[:max_length] for row, source in rows]


def _calibration_ids(tokenizer, row, location: str) -> List[int]:
    if not isinstance(row, dict):
        raise DataError(f"{location}: expected a JSON object with a 'prompt' or 'text' field")
    if "prompt" in row:
        prompt = as_messages(row["prompt"], "user", location, "prompt")
        ids = prompt_ids(tokenizer, prompt)
        if "chosen" in row:
            ids = ids + response_ids(tokenizer, prompt, as_messages(row["chosen"], "assistant", location, "chosen"),
                                     prompt_token_ids=ids)
        return ids
    if isinstance(row.get("text"), str) and row["text"].strip():
        return tokenizer(row["text"])["input_ids"]
    raise DataError(f"{location}: a calibration row needs a 'prompt' (text or chat messages) or a non-empty "
                    f"'text' field")


class _ActivationStatistics:
    """Forward hooks that accumulate, over non-padding tokens: the squared inputs of every ``o_proj``
    and ``down_proj`` (per feature) and each layer's summed cos(input, output)."""

    def __init__(self, layers: torch.nn.ModuleList):
        device = layers[0].mlp.down_proj.weight.device
        self.token_mask: Optional[torch.Tensor] = None
        self.tokens = 0
        self.attention_sq = [torch.zeros(layer.self_attn.o_proj.in_features, device=device) for layer in layers]
        self.mlp_sq = [torch.zeros(layer.mlp.down_proj.in_features, device=device) for layer in layers]
        self.cos_sum = [torch.zeros((), dtype=torch.float64, device=device) for _ in layers]
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles += [
                layer.self_attn.o_proj.register_forward_pre_hook(self._squares(self.attention_sq, index)),
                layer.mlp.down_proj.register_forward_pre_hook(self._squares(self.mlp_sq, index)),
                layer.register_forward_hook(self._influence(index), with_kwargs=True)]

    def _valid(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.token_mask].float()

    def _squares(self, sums: List[torch.Tensor], index: int):
        def hook(module, args):
            sums[index] += self._valid(args[0]).pow(2).sum(0)
        return hook

    def _influence(self, index: int):
        def hook(module, args, kwargs, output):
            layer_input = args[0] if args else kwargs["hidden_states"]
            layer_output = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(self._valid(layer_input), self._valid(layer_output), dim=-1)
            self.cos_sum[index] += cos.double().sum()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _collect_statistics(model, calibration: Sequence[List[int]], pad_id: int,
                        batch_size: int) -> _ActivationStatistics:
    layers = decoder(model).layers
    stats = _ActivationStatistics(layers)
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, len(calibration), batch_size):
                input_ids, attention_mask = padded(calibration[start:start + batch_size], pad_id)
                stats.token_mask = attention_mask.bool().to(device)
                stats.tokens += int(attention_mask.sum())
                decoder(model)(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               use_cache=False)
    finally:
        stats.remove()
    return stats


# --- scores and the plan -----------------------------------------------------------------------------------

def _column_scores(weight: torch.Tensor, input_sq: torch.Tensor) -> torch.Tensor:
    """Wanda's |W_ij|·‖X_j‖ summed over each input column j."""
    return weight.detach().float().abs().sum(0) * input_sq.sqrt()


def _top_sorted(scores: torch.Tensor, keep: int) -> List[int]:
    if keep >= scores.numel():
        return list(range(scores.numel()))
    return sorted(torch.topk(scores, keep).indices.tolist())


def _heads_removed(ratio: float, geometry: DecoderGeometry) -> int:
    """Query heads removed per KV group (grouped-query attention) or in all (one head per group)."""
    units = geometry.group_size if geometry.group_size > 1 else geometry.heads
    return min(units - 1, round(ratio * units))


def _channels_kept(ratio: float, geometry: DecoderGeometry, layer, heads_removed: int, channel_multiple: int) -> int:
    """MLP channels kept per layer, so that attention and MLP removal together come close to ``ratio``
    of the layer's attention + MLP parameters (every kept layer is pruned alike)."""
    attention, mlp = _attention_params(layer), _mlp_params(layer)
    if geometry.group_size > 1:   # a query head: its q_proj rows (and bias) and its o_proj columns
        per_head = (_numel(layer.self_attn.q_proj) + layer.self_attn.o_proj.weight.numel()) // geometry.heads
        attention_removed = heads_removed * geometry.kv_heads * per_head
    else:                         # a whole head: its q/k/v rows and o_proj columns
        attention_removed = heads_removed * (attention - _bias_numel(layer.self_attn.o_proj)) // geometry.heads
    channels_removed = max(0.0, ratio * (attention + mlp) - attention_removed) * geometry.intermediate_size / mlp
    kept = geometry.intermediate_size - min(geometry.intermediate_size - 1, round(channels_removed))
    if kept < geometry.intermediate_size and channel_multiple > 1:
        kept = min(geometry.intermediate_size, max(channel_multiple, round(kept / channel_multiple) * channel_multiple))
    return kept


def _head_counts(geometry: DecoderGeometry, heads_removed: int) -> Tuple[int, int]:
    """(query heads, KV heads) per layer after removing ``heads_removed`` (see ``_heads_removed``)."""
    if geometry.group_size > 1:
        return geometry.heads - heads_removed * geometry.kv_heads, geometry.kv_heads
    return geometry.heads - heads_removed, geometry.heads - heads_removed


def _config_accepts(config, geometry: DecoderGeometry, heads_removed: int) -> bool:
    """Whether the config class loads with these head counts: transformers 5's LlamaConfig, for one,
    insists that hidden_size be a multiple of num_attention_heads even with head_dim given."""
    heads, kv_heads = _head_counts(geometry, heads_removed)
    candidate = {**config.to_dict(), "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                 "head_dim": geometry.head_dim}
    try:
        type(config).from_dict(candidate)
    except Exception:  # config classes validate with their own error types (huggingface_hub's in transformers 5)
        return False
    return True


def _kept_heads(head_scores: torch.Tensor, geometry: DecoderGeometry, heads_removed: int):
    """(query heads, KV heads) kept: the top-scored query heads of each KV group, all KV heads; or,
    with one query head per group, the top-scored heads with their KV heads."""
    size = geometry.group_size
    if size > 1:
        grouped = head_scores.view(geometry.kv_heads, size)
        heads = [group * size + head for group in range(geometry.kv_heads)
                 for head in _top_sorted(grouped[group], size - heads_removed)]
        return heads, list(range(geometry.kv_heads))
    heads = _top_sorted(head_scores, geometry.heads - heads_removed)
    return heads, heads


def check_amounts(ratio: float, drop_layers: int, layers: Optional[int] = None) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio: {ratio} is not in [0, 1); it is the fraction of attention + MLP parameters "
                          f"to remove (0.2 for the paper's 20%-pruned students)")
    if drop_layers < 0:
        raise ConfigError(f"drop_layers: {drop_layers} must be 0 or more")
    if layers is not None and drop_layers >= layers:
        raise ConfigError(f"drop_layers: {drop_layers} would leave no layer; the model has {layers} decoder layers")


def plan_pruning(model, calibration: Sequence[List[int]], *, ratio: float, drop_layers: int = 0,
                 channel_multiple: int = 8, batch_size: int = 8, pad_id: int = 0) -> PruningPlan:
    """Choose the layers, MLP channels and heads to keep from activation statistics on
    ``calibration`` (token id lists); ``ratio=0, drop_layers=0`` keeps everything and needs none."""
    geometry = decoder_geometry(model)
    check_amounts(ratio, drop_layers, geometry.layers)
    everything = range(geometry.layers)
    if ratio == 0 and drop_layers == 0:
        return PruningPlan(kept_layers=list(everything),
                           kept_channels=[list(range(geometry.intermediate_size)) for _ in everything],
                           kept_heads=[list(range(geometry.heads)) for _ in everything],
                           kept_kv_heads=[list(range(geometry.kv_heads)) for _ in everything])
    if not calibration:
        raise UserError("pruning needs calibration data to score channels, heads and layers: give a JSONL file "
                        "of prompts (a 'prompt' field, optionally 'chosen') or texts ('text') with --calibration")
    stats = _collect_statistics(model, calibration, pad_id, batch_size)
    layers = decoder(model).layers
    influence = [1.0 - float(cos_sum) / stats.tokens for cos_sum in stats.cos_sum]
    kept_layers = sorted(sorted(everything, key=lambda index: (influence[index], index))[drop_layers:])
    notes = []
    heads_removed = wanted = _heads_removed(ratio, geometry)
    while heads_removed and not _config_accepts(model.config, geometry, heads_removed):
        heads_removed -= 1
    if heads_removed < wanted:
        (wanted_heads, _), (heads_left, _) = _head_counts(geometry, wanted), _head_counts(geometry, heads_removed)
        notes.append(f"{type(model.config).__name__} does not load with {wanted_heads} attention heads (hidden "
                     f"size {geometry.hidden_size}), so {heads_left} are kept and the MLP takes the rest of the budget")
    channels_kept = _channels_kept(ratio, geometry, layers[0], heads_removed, channel_multiple)
    channel_scores = [_column_scores(layer.mlp.down_proj.weight, stats.mlp_sq[i]) for i, layer in enumerate(layers)]
    head_scores = [_column_scores(layer.self_attn.o_proj.weight, stats.attention_sq[i])
                   .view(geometry.heads, geometry.head_dim).sum(1) for i, layer in enumerate(layers)]
    kept_heads = [_kept_heads(scores, geometry, heads_removed) for scores in head_scores]
    return PruningPlan(kept_layers=kept_layers,
                       kept_channels=[_top_sorted(scores, channels_kept) for scores in channel_scores],
                       kept_heads=[heads for heads, _ in kept_heads], kept_kv_heads=[kv for _, kv in kept_heads],
                       channel_scores=channel_scores, head_scores=head_scores, layer_influence=influence,
                       notes=notes)


# --- applying the plan -------------------------------------------------------------------------------------

def _layers_prefix(model) -> str:
    """State-dict prefix of the decoder layers, e.g. ``model.layers.``."""
    layers = decoder(model).layers
    return next(name for name, module in model.named_modules() if module is layers) + "."


def _kept_indices(plan: PruningPlan, layer: int, kind: str, geometry: DecoderGeometry, device) -> torch.Tensor:
    """Rows (or columns) of a ``kind`` projection (see ROW_SLICED) that ``plan`` keeps in ``layer``."""
    if kind == "mlp":
        return torch.tensor(plan.kept_channels[layer], device=device)
    heads = plan.kept_heads[layer] if kind == "query" else plan.kept_kv_heads[layer]
    size = geometry.head_dim
    return torch.tensor([head * size + offset for head in heads for offset in range(size)], device=device)


def _pruned_state_dict(model, plan: PruningPlan, geometry: DecoderGeometry) -> Dict[str, torch.Tensor]:
    prefix = _layers_prefix(model)
    new_index = {old: new for new, old in enumerate(plan.kept_layers)}
    state = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        old_text, rest = key[len(prefix):].split(".", 1)
        old = int(old_text)
        if old not in new_index:
            continue
        module, parameter = rest.rsplit(".", 1)
        if module in ROW_SLICED:
            tensor = tensor.index_select(0, _kept_indices(plan, old, ROW_SLICED[module], geometry, tensor.device))
        elif module in COLUMN_SLICED and parameter == "weight":   # an o_proj/down_proj bias is per output: kept
            tensor = tensor.index_select(1, _kept_indices(plan, old, COLUMN_SLICED[module], geometry, tensor.device))
        state[f"{prefix}{new_index[old]}.{rest}"] = tensor.contiguous()
    return state


def _pruned_config(config, plan: PruningPlan, geometry: DecoderGeometry):
    pruned = copy.deepcopy(config)
    first = plan.kept_layers[0]
    pruned.num_hidden_layers = len(plan.kept_layers)
    pruned.intermediate_size = len(plan.kept_channels[first])
    pruned.num_attention_heads = len(plan.kept_heads[first])
    pruned.num_key_value_heads = len(plan.kept_kv_heads[first])
    pruned.head_dim = geometry.head_dim
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(pruned, name, None)
        if isinstance(values, (list, tuple)) and len(values) == geometry.layers:
            setattr(pruned, name, [values[index] for index in plan.kept_layers])
    if isinstance(getattr(pruned, "max_window_layers", None), int):  # Qwen2: layers below it use full attention
        pruned.max_window_layers = sum(1 for index in plan.kept_layers if index < config.max_window_layers)
    return pruned


def apply_pruning(model, plan: PruningPlan):
    """A new model of the same class with only what ``plan`` keeps (same device and dtype)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    geometry = decoder_geometry(model)
    config = _pruned_config(model.config, plan, geometry)
    state = _pruned_state_dict(model, plan, geometry)
    device = next(model.parameters()).device
    with no_init_weights(), torch.device(device):  # every weight is overwritten from ``state`` below
        pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    pruned.tie_weights()  # no_init_weights also skips the tying that initialization does
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.train(model.training)
    return pruned


def prune_model(model, tokenizer, calibration: Sequence[Union[str, Sequence[int]]], ratio: float,
                drop_layers: int = 0, *, channel_multiple: int = 8, batch_size: int = 8, max_length: int = 512):
    """Prune ``model`` (see the module docstring) and return the smaller model.

    ``calibration``: token id lists (e.g. ``chat.prompt_ids`` of training prompts: what the student
    will see) or raw texts (tokenized as they are, without the chat template); each cut to
    ``max_length`` tokens."""
    ids = [tokenizer(item)["input_ids"][:max_length] if isinstance(item, str) else list(item)[:max_length]
           for item in calibration]
    plan = plan_pruning(model, ids, ratio=ratio, drop_layers=drop_layers, channel_multiple=channel_multiple,
                        batch_size=batch_size, pad_id=pad_token_id(tokenizer))
    return apply_pruning(model, plan)


def pruning_report(original, pruned, plan: PruningPlan, *, ratio: float, drop_layers: int) -> dict:
    """Sizes before and after, and the fraction of parameters removed."""
    before, after = decoder_geometry(original), decoder_geometry(pruned)
    prunable_before, prunable_after = prunable_parameters(original), prunable_parameters(pruned)
    kept_layers_before = prunable_parameters(original, plan.kept_layers)
    parameters_before, parameters_after = count_parameters(original), count_parameters(pruned)
    return {
        "target_ratio": ratio,
        "drop_layers": drop_layers,
        "dropped_layers": sorted(set(range(before.layers)) - set(plan.kept_layers)),
        "parameters_before": parameters_before,
        "parameters_after": parameters_after,
        "removed_fraction": 1 - parameters_after / parameters_before,
        "prunable_before": prunable_before,
        "prunable_after": prunable_after,
        "prunable_removed_fraction": 1 - prunable_after / prunable_before,
        "width_removed_fraction": 1 - prunable_after / kept_layers_before,   # what ratio targets
        "layers": [before.layers, after.layers],
        "attention_heads": [before.heads, after.heads],
        "key_value_heads": [before.kv_heads, after.kv_heads],
        "intermediate_size": [before.intermediate_size, after.intermediate_size],
        "head_dim": after.head_dim,
        "notes": plan.notes,
    }


def format_report(report: dict) -> str:
    def change(key):
        return f"{report[key][0]} -> {report[key][1]}"

    return (f"parameters {report['parameters_before']:,} -> {report['parameters_after']:,} "
            f"(-{report['removed_fraction']:.1%}); attention+MLP {report['prunable_before']:,} -> "
            f"{report['prunable_after']:,} (-{report['prunable_removed_fraction']:.1%}; width pruning "
            f"-{report['width_removed_fraction']:.1%} of the kept layers, target {report['target_ratio']:.1%}); "
            f"layers {change('layers')}; attention heads {change('attention_heads')}; KV heads "
            f"{change('key_value_heads')}; intermediate size {change('intermediate_size')}")
