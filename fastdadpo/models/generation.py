"""Batched sampling with transformers' ``generate``: left padding, greedy at temperature 0, seeded.

Under ZeRO-3 with several ranks, pass ``synced_gpus=True``: each rank then keeps stepping until
every rank's batch is finished, so all ranks make the same collective calls (the classic hang is
one rank stopping early). Callers must also give every rank the same number of batches.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from fastdadpo.base.progress import StageProgress
from fastdadpo.core.batch import pad_token_id, padded


def generate_batch(model, tokenizer, prompts: Sequence[List[int]], *, max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0, seed: Optional[int] = None, synced_gpus: bool = False,
                   device: Optional[torch.device] = None) -> List[List[int]]:
    """Generate one response per prompt (token ids, left-padded batch). Returns the new tokens of
    each response, up to and including the first eos (or ``max_new_tokens`` of them)."""
    pad = pad_token_id(tokenizer)
    device = device or next(model.parameters()).device
    input_ids, attention_mask = padded(prompts, pad, left=True)
    width = input_ids.shape[1]
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                  synced_gpus=synced_gpus, use_cache=True)
    if temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    responses = []
    for row in output[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id) + 1]
        else:
            row = [t for t in row if t != pad] if pad != tokenizer.eos_token_id else row
        responses.append(row)
    return responses


def decode_response(tokenizer, ids: List[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_texts(model, tokenizer, prompts: Sequence[List[int]], *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                   device: Optional[torch.device] = None, progress: Optional[str] = None) -> List[str]:
    """Responses (decoded text) for many prompts in one process: batches sorted by prompt length
    (little padding), results in the prompts' order; batch k is seeded with ``seed + k``.
    ``progress``: the stage's name, to report its progress under (``base.progress``)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: List[Optional[str]] = [None] * len(prompts)
    with StageProgress(len(prompts), progress or "", "prompts", active=progress is not None) as bar:
        _generate_in_batches(model, tokenizer, prompts, order, texts, bar, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, device=device)
    return texts


def _generate_in_batches(model, tokenizer, prompts, order, texts, bar, *, max_new_tokens, temperature, top_p, seed,
                         batch_size, device) -> None:
    for k, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start:start + batch_size]
        outs = generate_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed + k, device=device)
        for i, ids in zip(chunk, outs):
            texts[i] = decode_response(tokenizer, ids)
        bar.update(len(chunk))
