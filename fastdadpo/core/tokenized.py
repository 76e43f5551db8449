"""Tokenizing rows under one truncation policy (the prompt keeps its end, each response its start),
cached by the content-addressed cache."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from fastdadpo.base.cache import ContentCache
from fastdadpo.base.errors import ConfigError, DataError
from fastdadpo.base.progress import StageProgress
from fastdadpo.core import chat
from fastdadpo.core.rows import Example, RESPONSE_FIELDS

# How a plain-string row (TRL's standard format) is tokenized: "template" puts it through the chat
# template as one user turn and one assistant reply (what a chat model is served with); "raw" takes
# the text itself, eos after each response, as TRL does for that format (and allows "text" rows).
STRING_ROWS = ("template", "raw")

_CACHE_FORMAT = 3  # bump when the cached layout or the tokenization policy changes


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    chosen_ids: Optional[list[int]]  # response tokens, ending with eos unless truncated
    rejected_ids: Optional[list[int]]
    index: int  # position of the row in the loaded list

    def response_ids(self, name: str) -> Optional[list[int]]:
        return getattr(self, f"{name}_ids")

    def length(self) -> int:
        """Tokens of its longest sequence (prompt + the longer response)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids or ()), len(self.rejected_ids or ()))


@dataclass
class TokenizationReport:
    rows: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> rows
    dropped_sources: list = field(default_factory=list)  # "SOURCE: reason" of the first few dropped rows
    prompt_truncated: int = 0
    response_truncated: dict = field(default_factory=dict)  # field -> rows
    max_length: int = 0
    max_prompt_length: int = 0

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.dropped.items()))
        truncated = ", ".join(f"{name} {count}" for name, count in self.response_truncated.items())
        return (f"{self.rows} rows, kept {self.kept}, dropped {dropped}" + (f" ({reasons})" if reasons else "")
                + f"; prompt truncated (left, to {self.max_prompt_length}) in {self.prompt_truncated}"
                + f"; response truncated (right, to max_length {self.max_length}) in "
                + (truncated or "0"))


def tokenize_examples(examples: Sequence[Example], tokenizer, *, max_length: int, max_prompt_length: int,
                      fields: Sequence[str] = RESPONSE_FIELDS, cache_dir: Optional[str] = None, log=None,
                      show_progress: bool = False, string_rows: str = "template"
                      ) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Token ids of every example under the truncation policy: the prompt keeps its last
    ``max_prompt_length`` tokens, then each response keeps its first ``max_length - len(prompt)``.
    A row with an empty response is dropped and counted. With ``cache_dir``, results are stored
    there keyed by a fingerprint of the examples, the tokenizer, the lengths and the fields, with a
    digest of their contents; an entry that is unreadable or fails its digest is said and rebuilt.
    ``show_progress``: this process reports the tokenization's progress (``base.progress``).
    ``string_rows``: how plain-string rows are tokenized (``STRING_ROWS``)."""
    _check_lengths(max_length, max_prompt_length)
    if string_rows not in STRING_ROWS:
        raise ConfigError(f"data.string_rows: is {string_rows!r}; choose {' or '.join(STRING_ROWS)}")
    unknown = set(fields) - set(RESPONSE_FIELDS)
    if unknown:
        raise ValueError(f"fields: unknown response fields {sorted(unknown)}")
    fields = tuple(fields)
    cache = ContentCache(cache_dir, "tokenization cache", log) if cache_dir is not None else None
    if cache is not None:
        key = {"kind": "tokenized", "inputs": _fingerprint(examples, tokenizer, max_length, max_prompt_length, fields),
               **({"string_rows": string_rows} if string_rows != "template" else {})}
        entry = cache.load(key, "tokenizing again")
        if entry is not None:
            return _from_cache_entry(*entry, fields)
    with StageProgress(len(examples), "tokenize", "rows", active=show_progress) as progress:
        tokenized, report = _tokenize_all(examples, tokenizer, max_length, max_prompt_length, fields, string_rows,
                                          progress)
    if cache is not None:
        cache.store(key, _cache_entry(tokenized, report, fields), report.__dict__)  # several ranks may write it at once
    return tokenized, report


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"data.max_length: must be an integer of at least 2, got {max_length!r}")
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ConfigError(f"data.max_prompt_length: must be a positive integer, got {max_prompt_length!r}")
    if max_prompt_length >= max_length:
        raise ConfigError(f"data.max_prompt_length ({max_prompt_length}) must be smaller than data.max_length "
                          f"({max_length}), or no response token would fit")


def _tokenize_all(examples, tokenizer, max_length, max_prompt_length, fields, string_rows, progress=None):
    report = TokenizationReport(rows=len(examples), max_length=max_length, max_prompt_length=max_prompt_length,
                                response_truncated={name: 0 for name in fields})
    tokenized = []
    for index, example in enumerate(examples):
        if progress is not None:
            progress.update()
        prompt_ids, responses = _tokenize_one(example, tokenizer, fields, string_rows)
        if len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
            report.prompt_truncated += 1
        budget = max_length - len(prompt_ids)
        for name, ids in responses.items():
            if len(ids) > budget:
                responses[name] = ids[:budget]
                report.response_truncated[name] += 1
        # An empty teacher response would teach the student to stop at once: dropped. An empty
        # student (rejected) response is a real, bad sample: kept (its tokens are just eos).
        empty = [name for name, ids in responses.items()
                 if not ids or (name == "chosen" and not any(m["content"].strip() for m in example.chosen))]
        if empty:
            reason = f"empty {' and '.join(empty)} response"
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            if len(report.dropped_sources) < 5:
                report.dropped_sources.append(f"{example.source}: {reason}")
            continue
        tokenized.append(TokenizedExample(prompt_ids, responses.get("chosen"), responses.get("rejected"), index))
    report.kept = len(tokenized)
    if examples and not tokenized:
        raise DataError(f"every one of the {len(examples)} rows was dropped ({report.summary()}); e.g. "
                        f"{'; '.join(report.dropped_sources)}")
    return tokenized, report


def _tokenize_one(example: Example, tokenizer, fields, string_rows: str) -> tuple[list[int], dict]:
    try:
        if example.is_text:  # language modeling: every token after the first is a target
            if string_rows != "raw":
                raise DataError(TEXT_ROWS_NEED_RAW)
            text_ids = chat.raw_sequence_ids(tokenizer, "", example.chosen[0]["content"])
            return text_ids[:1], {"chosen": text_ids[1:]}
        if string_rows == "raw" and example.plain:
            responses = {}
            for name in fields:
                response = example.response(name)
                if response is None:
                    raise DataError(f"field {name!r} is missing, and this run trains on it")
                responses[name] = response[0]["content"]
            return _raw_ids(tokenizer, example.prompt[0]["content"], responses)
        prompt_ids = prompt_token_ids(tokenizer, example, string_rows)
        responses = {}
        for name in fields:
            messages = example.response(name)
            if messages is None:
                raise DataError(f"field {name!r} is missing, and this run trains on it")
            responses[name] = chat.response_ids(tokenizer, example.prompt, messages, prompt_token_ids=prompt_ids)
    except DataError as exc:
        raise DataError(f"{example.source}: {exc}") from None
    return list(prompt_ids), responses


TEXT_ROWS_NEED_RAW = ("a 'text' row (TRL's language-modeling format) has no prompt to put through the chat template; "
                      "set data.string_rows: raw to train on the text itself (sft, kd)")


def _raw_ids(tokenizer, prompt: str, responses: dict) -> tuple[list[int], dict]:
    """A plain row as TRL tokenizes it (``chat.raw_sequence_ids``): one prompt for every response
    ({name: text}), cut where the prompt's tokens and the shortest match of prompt + response part
    (the prompt's last token may merge into a response's first)."""
    prompt_ids = chat.raw_prompt_ids(tokenizer, prompt)
    sequences = {name: chat.raw_sequence_ids(tokenizer, prompt, text) for name, text in responses.items()}
    cut = min(chat.common_prefix(prompt_ids, ids) for ids in sequences.values())
    return prompt_ids[:cut], {name: ids[cut:] for name, ids in sequences.items()}


def prompt_token_ids(tokenizer, example: Example, string_rows: str = "template") -> list[int]:
    """The prompt's token ids: the text itself for a plain row under ``string_rows: raw``, else
    through the chat template (``core.chat``)."""
    if example.is_text:
        raise DataError("a 'text' row (TRL's language-modeling format) has no prompt")
    if string_rows == "raw" and example.plain:
        return chat.raw_prompt_ids(tokenizer, example.prompt[0]["content"])
    return list(chat.prompt_ids(tokenizer, example.prompt))


def sequence_token_ids(tokenizer, example: Example, response: list,
                       string_rows: str = "template") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one response, as training tokenizes them: a plain row under
    ``string_rows: raw`` cut where the prompt's tokens and prompt + response's part (``_raw_ids``: a
    prompt's last token may merge into the response's first), else the prompt through the chat
    template and the response after it."""
    if string_rows == "raw" and example.plain and len(response) == 1:
        prompt_ids, ids = _raw_ids(tokenizer, example.prompt[0]["content"], {"response": response[0]["content"]})
        return prompt_ids, ids["response"]
    prompt_ids = prompt_token_ids(tokenizer, example, string_rows)
    return prompt_ids, chat.response_ids(tokenizer, example.prompt, response, prompt_token_ids=prompt_ids)


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything that decides how text becomes ids: vocabulary, merges, normalizer, added tokens,
    special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = {
        "class": type(tokenizer).__name__,
        "model": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _fingerprint(examples, tokenizer, max_length, max_prompt_length, fields) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": _CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer),
                              "max_length": max_length, "max_prompt_length": max_prompt_length,
                              "fields": list(fields)}).encode())
    for example in examples:
        content = [example.prompt] + [example.response(name) for name in fields]
        digest.update(json.dumps(content, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _flatten(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in sequences])
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    values = flat.tolist()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _cache_entry(tokenized: list[TokenizedExample], report: TokenizationReport, fields) -> dict:
    tensors = {"index": torch.tensor([t.index for t in tokenized], dtype=torch.int64)}
    for name in ("prompt", *fields):
        flat, offsets = _flatten([getattr(t, f"{name}_ids") for t in tokenized])
        tensors[f"{name}_flat"], tensors[f"{name}_offsets"] = torch.from_numpy(flat), torch.from_numpy(offsets)
    return tensors


def _from_cache_entry(tensors: dict, document: dict, fields) -> tuple[list[TokenizedExample], TokenizationReport]:
    columns = {name: _unflatten(tensors[f"{name}_flat"].numpy(), tensors[f"{name}_offsets"].numpy())
               for name in ("prompt", *fields)}
    tokenized = [TokenizedExample(columns["prompt"][i], columns["chosen"][i] if "chosen" in columns else None,
                                  columns["rejected"][i] if "rejected" in columns else None, index)
                 for i, index in enumerate(tensors["index"].tolist())]
    return tokenized, TokenizationReport(**document)
