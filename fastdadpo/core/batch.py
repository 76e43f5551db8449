"""Collating tokenized examples into a ``Batch``: padded or packed micro-batches with pre-shifted
targets and the pair layout."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastdadpo.core.rows import RESPONSE_FIELDS
from fastdadpo.core.tokenized import TokenizedExample
from fastdadpo.kernels import IGNORE_INDEX


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def padded(sequences, pad_id: int, *, left: bool = False):
    """``(input_ids, attention_mask)`` of sequences padded to the longest. Right padding (training,
    scoring): with causal attention the hidden states of real tokens do not depend on the padding
    after them, and positions start at 0. Left padding (generation): every row ends where new
    tokens begin."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


@dataclass
class Batch:
    """One micro-batch of ``B`` examples: the tensors and the pair layout.

    Sequences (``S`` of them) are prompt + chosen for examples ``0..B-1``, then, with rejected
    responses, prompt + rejected for the same examples: pair ``i`` is sequences ``i`` and ``B + i``.
    Padded: one row per sequence, right padding to the longest (pad positions continue counting, so
    with right padding the real tokens need no attention mask at all). Packed: one row, the sequences
    end to end, no padding, ``attention_mask`` None and positions restarting at 0 for each sequence
    (transformers derives the block-diagonal causal mask from them, but only in a forward without a
    KV cache: run it with ``use_cache=False``, as ``models.final_hidden_states`` does, or every token
    attends to the sequences before it in the row).

    ``targets`` are pre-shifted: ``targets[r, t]`` is the token at ``t + 1`` when that is a response
    token of the same sequence, else -100, so hidden state ``[r, t]`` predicts it; ``target_sequence``
    is the sequence of each target, -1 where none. The methods below are the one place that layout
    is read.
    """

    input_ids: torch.Tensor  # [R, T] long
    attention_mask: Optional[torch.Tensor]  # [R, T]; None when packed
    position_ids: torch.Tensor  # [R, T]
    targets: torch.Tensor  # [R, T]
    target_sequence: torch.Tensor  # [R, T]
    response_tokens: torch.Tensor  # [S] response length of each sequence
    example_index: torch.Tensor  # [B] rows of the loaded data
    has_rejected: bool

    @property
    def num_pairs(self) -> int:
        return int(self.example_index.numel())

    @property
    def num_sequences(self) -> int:
        return self.num_pairs * (2 if self.has_rejected else 1)

    def chosen_rows(self) -> torch.Tensor:
        return (self.target_sequence >= 0) & (self.target_sequence < self.num_pairs)

    def rejected_rows(self) -> torch.Tensor:
        return self.target_sequence >= self.num_pairs

    def response_rows(self) -> torch.Tensor:
        return self.target_sequence >= 0

    def split_pairs(self, per_sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence values [S] as (chosen [B], rejected [B]; empty without rejected responses)."""
        b = self.num_pairs
        return per_sequence[:b], per_sequence[b:2 * b]

    def per_sequence(self, table: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A cached [data rows, 2] table (chosen, rejected) laid out like this batch's sequences."""
        if table is None:
            return None
        rows = table[self.example_index.cpu()]
        values = torch.cat([rows[:, 0], rows[:, 1]]) if self.has_rejected else rows[:, 0]
        return values.to(self.input_ids.device)

    def counts(self) -> torch.Tensor:
        """[pairs, chosen response tokens, rejected response tokens], float64: summed over the
        micro-batches and ranks of a step they are the objectives' normalizers."""
        chosen, rejected = self.chosen_rows().sum(), self.rejected_rows().sum()
        return torch.stack([torch.tensor(self.num_pairs, device=chosen.device), chosen, rejected]).double()

    def tokens(self) -> int:
        """Real (not padding) tokens."""
        return self.input_ids.numel() if self.attention_mask is None else int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if torch.is_tensor(getattr(self, f.name))})


def collate(examples: Sequence[TokenizedExample], *, pad_token_id: int, include_rejected: bool = True,
            packing: bool = False) -> Batch:
    """The ``Batch`` of these examples (with their rejected responses when ``include_rejected``),
    padded, or packed into one row with ``packing``."""
    if not examples:
        raise ValueError("collate: an empty micro-batch")
    names = RESPONSE_FIELDS if include_rejected else RESPONSE_FIELDS[:1]
    sequences = []  # (prompt ids, response ids)
    for name in names:
        for example in examples:
            response = example.response_ids(name)
            if response is None:
                raise ValueError(f"collate: example {example.index} has no {name} tokens (tokenize with that field)")
            sequences.append((example.prompt_ids, response))
    tensors = _pack(sequences) if packing else _pad(sequences, pad_token_id)
    return Batch(**tensors, has_rejected=include_rejected,
                 response_tokens=torch.tensor([len(response) for _, response in sequences], dtype=torch.long),
                 example_index=torch.tensor([example.index for example in examples], dtype=torch.long))


def _targets(prompt: list[int], response: list[int], sequence: int) -> tuple[list[int], list[int]]:
    """Pre-shifted targets of one sequence and their sequence index (-100 / -1 where no target)."""
    before = len(prompt) - 1  # positions before the one that predicts the first response token
    targets = [IGNORE_INDEX] * before + list(response) + [IGNORE_INDEX]
    owners = [-1] * before + [sequence] * len(response) + [-1]
    return targets, owners


def _pad(sequences, pad_token_id: int) -> dict:
    input_ids, attention_mask = padded([prompt + response for prompt, response in sequences], pad_token_id)
    rows, width = input_ids.shape
    targets = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    target_sequence = torch.full((rows, width), -1, dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        row_targets, owners = _targets(prompt, response, row)
        targets[row, :len(row_targets)] = torch.tensor(row_targets, dtype=torch.long)
        target_sequence[row, :len(owners)] = torch.tensor(owners, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).expand(rows, width).clone()
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, targets=targets,
                target_sequence=target_sequence)


def _pack(sequences) -> dict:
    input_ids, position_ids, targets, owners = [], [], [], []
    for sequence, (prompt, response) in enumerate(sequences):
        input_ids += prompt + response
        position_ids += range(len(prompt) + len(response))
        sequence_targets, sequence_owners = _targets(prompt, response, sequence)
        targets += sequence_targets
        owners += sequence_owners

    def row(values):
        return torch.tensor([values], dtype=torch.long)

    return dict(input_ids=row(input_ids), attention_mask=None, position_ids=row(position_ids), targets=row(targets),
                target_sequence=row(owners))
