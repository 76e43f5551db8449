"""What the method study measures beyond ``fastdadpo eval``: the training pairs' kinds and the
teacher's margin δ_te on them, each trained model's implicit reward on them, and the coverage of the
several right answers when a model samples.

Pair types (of one teacher response y^t and one student response y^s to a prompt, as the recipe
samples them once before training; the same four on held-out prompts from the teacher's and the
dSFT student's greedy answers):

* ``same answer``       -- y^t = y^s: DPO and daDPO get no gradient from the pair;
* ``both right``        -- two different right answers (several-answer tasks): the pair the daDPO
  paper argues a teacher's sample alone mislabels, since the student's answer is as good;
* ``teacher wrong``     -- y^t is wrong (whatever y^s is);
* ``student wrong``     -- y^t right, y^s wrong: the pair DPO is built for.

δ_te = log[π_te(y^t)/π_ref(y^t)] − log[π_te(y^s)/π_ref(y^s)] (π_ref: the dSFT student) shifts each
pair's daDPO margin by −β2·δ_te: (β1+β2)·h − β2·δ_te, h the DPO log-ratio margin.
"""
from __future__ import annotations

import json
import statistics
from typing import Dict, List, Optional, Sequence

import torch

from fastdadpo.commands.evaluate import correctness
from fastdadpo.commands.precompute import sequence_logps_table
from fastdadpo.core.batch import collate, pad_token_id
from fastdadpo.core.chat import prompt_ids
from fastdadpo.core.rows import load_examples, load_prompts
from fastdadpo.core.tokenized import tokenize_examples
from fastdadpo.kernels import fused_linear_logprobs
from fastdadpo.models.generation import generate_texts
from fastdadpo.models.loading import (final_hidden_states, head_logit_options, head_weight, load_causal_lm,
                                      load_tokenizer)

PAIR_TYPES = ("same answer", "both right", "teacher wrong", "student wrong")
_CPU = torch.device("cpu")


def pair_type(chosen_right: bool, rejected_right: bool, same: bool) -> str:
    if same:
        return "same answer"
    if not chosen_right:
        return "teacher wrong"
    return "both right" if rejected_right else "student wrong"


class TrainingPairs:
    """One seed's preference pairs as the trainer tokenizes them, with each pair's type."""

    def __init__(self, path: str, tokenizer, *, max_length: int, max_prompt_length: int):
        examples = load_examples(path)
        self.tokenized, _ = tokenize_examples(examples, tokenizer, max_length=max_length,
                                              max_prompt_length=max_prompt_length)
        self.pad_id = pad_token_id(tokenizer)
        kept = [examples[t.index] for t in self.tokenized]
        chosen_right = correctness([e.chosen[-1]["content"] for e in kept], kept)
        rejected_right = correctness([e.rejected[-1]["content"] for e in kept], kept)
        self.types = [pair_type(bool(c), bool(r), e.chosen == e.rejected)
                      for c, r, e in zip(chosen_right, rejected_right, kept)]

    def sequence_logps(self, model_dir: str, batch_size: int = 64) -> torch.Tensor:
        """[pairs, 2] float32: Σ log π(y) of each kept pair's chosen and rejected response under the
        model at ``model_dir``, through the fused kernel (no [tokens × vocab] logits)."""
        model = load_causal_lm(model_dir, dtype=torch.float32, device=_CPU, key=model_dir)
        head, options = head_weight(model), head_logit_options(model.config, model_dir)

        def token_logps(batch):
            hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids)
            return fused_linear_logprobs(hidden, head, batch.targets, **options)

        table = sequence_logps_table(token_logps, self.tokenized,
                                     collate=lambda rows: collate(rows, pad_token_id=self.pad_id),
                                     micro_batch_size=batch_size, rank=0, world_size=1,
                                     gather=lambda part: [part], device=_CPU)
        return table[[t.index for t in self.tokenized]]


def teacher_margins(pairs: TrainingPairs, teacher: torch.Tensor, reference: torch.Tensor) -> List[float]:
    """δ_te of every pair (tables from ``TrainingPairs.sequence_logps``)."""
    ratio = teacher - reference
    return (ratio[:, 0] - ratio[:, 1]).tolist()


def reward_summary(pairs: TrainingPairs, policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    """Per pair type (and over the pairs whose responses differ, "distinct"): the share of pairs
    whose implicit DPO reward β·h prefers the teacher's response, and the mean margin β·h."""
    ratio = policy - reference
    margins = (beta * (ratio[:, 0] - ratio[:, 1])).tolist()
    groups = {"distinct": [i for i, t in enumerate(pairs.types) if t != "same answer"]}
    groups.update({t: [i for i, u in enumerate(pairs.types) if u == t] for t in PAIR_TYPES if t != "same answer"})
    return {name: {"pairs": len(members),
                   "accuracy": sum(margins[i] > 0 for i in members) / len(members) if members else None,
                   "margin": statistics.fmean(margins[i] for i in members) if members else None}
            for name, members in groups.items()}


def quantiles(values: Sequence[float]) -> Optional[dict]:
    """Median, quartiles, 10th/90th percentiles and mean of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)

    def at(q):
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"n": len(ordered), "p10": at(0.1), "p25": at(0.25), "median": at(0.5), "p75": at(0.75), "p90": at(0.9),
            "mean": statistics.fmean(ordered), "median_abs": statistics.median(abs(v) for v in ordered)}


def heldout_types(results: dict, baseline: str = "after dSFT") -> List[str]:
    """Each held-out prompt's pair type from the teacher's and ``baseline``'s greedy answers in an
    ``eval.json``."""
    teacher, student = results["models"]["teacher"], results["models"][baseline]
    return [pair_type(bool(tc), bool(sc), tr.strip() == sr.strip())
            for tc, sc, tr, sr in zip(teacher["correct"], student["correct"], teacher["responses"],
                                      student["responses"])]


def answer_coverage(model_dir: str, heldout_path: str, *, samples: int, max_new_tokens: int, seed: int,
                    batch_size: int = 64) -> dict:
    """Sampling each several-answer held-out prompt ``samples`` times at temperature 1: the mean share
    of its right answers that appear at least once (coverage), and the share of samples that are
    right (validity)."""
    tokenizer = load_tokenizer(model_dir, model_dir)
    model = load_causal_lm(model_dir, dtype=torch.float32, device=_CPU, key=model_dir)
    rows = [json.loads(line) for line in open(heldout_path, encoding="utf-8") if line.strip()]
    examples = load_prompts(heldout_path)
    multi = [i for i, row in enumerate(rows) if row.get("kind") == "multi"]
    prompts = [prompt_ids(tokenizer, examples[i].prompt) for i in multi for _ in range(samples)]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                           batch_size=batch_size)
    coverage, right = [], 0
    for k, i in enumerate(multi):
        answers = {a.strip() for a in rows[i]["answer"]}
        drawn = {t.strip() for t in texts[k * samples:(k + 1) * samples]}
        coverage.append(len(drawn & answers) / len(answers))
        right += sum(t.strip() in answers for t in texts[k * samples:(k + 1) * samples])
    return {"prompts": len(multi), "samples": samples,
            "coverage": statistics.fmean(coverage) if coverage else None,
            "validity": right / len(texts) if texts else None}


def measure_pairs(pairs: TrainingPairs, models: Dict[str, str], reference: str, teacher: str, beta: float) -> dict:
    """The seed's training-pair measures: type counts, δ_te overall and per type, and each model's
    reward summary (``models``: display name → directory)."""
    reference_table = pairs.sequence_logps(reference)
    delta = teacher_margins(pairs, pairs.sequence_logps(teacher), reference_table)
    return {"types": {t: pairs.types.count(t) for t in PAIR_TYPES},
            "delta_te": {"all": quantiles([d for d, t in zip(delta, pairs.types) if t != "same answer"]),
                         **{t: quantiles([d for d, u in zip(delta, pairs.types) if u == t]) for t in PAIR_TYPES}},
            "rewards": {name: reward_summary(pairs, pairs.sequence_logps(path), reference_table, beta)
                        for name, path in models.items()}}
