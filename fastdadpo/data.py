"""Preference data: loading and validating rows, tokenizing them under one truncation policy,
checking that teacher and student share a vocabulary, and collating micro-batches (padded or
packed) into a ``Batch`` with pre-shifted targets and the pair layout.

Files
    ``.jsonl``   one JSON object per line (blank lines are skipped); errors name ``FILE line N``.
    ``.json``    one JSON array of objects; errors name the line where the object starts.
    ``.parquet`` a table, one row per example; errors name ``FILE row N`` (N counted from 0, as ``ds[N]``).
    directory   saved by ``datasets.Dataset.save_to_disk``; a ``DatasetDict`` needs its split: ``DIR:split``.

Rows follow TRL's preference format: ``prompt``, ``chosen``, ``rejected``, each a string or a list
of ``{"role", "content"}`` messages. A string prompt is one user message, a string response one
assistant message. TRL's implicit-prompt rows (no ``prompt``; ``chosen`` and ``rejected`` are whole
conversations that share their opening messages) are split at the last shared message.
``answer`` (a reference answer, or a list of right answers) and every other field pass through untouched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import chat
from .errors import ConfigError, DataError
from .kernels import IGNORE_INDEX
from .checkpoint import write_file_atomic
from .models import padded

RESPONSE_FIELDS = ("chosen", "rejected")
KNOWN_FIELDS = ("prompt", *RESPONSE_FIELDS, "answer")
_CACHE_FORMAT = 2  # bump when the cached layout or the tokenization policy changes


# --- loading -------------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One validated row. Messages are ``{"role", "content"}`` dicts."""
    prompt: list[dict]
    chosen: Optional[list[dict]]
    rejected: Optional[list[dict]]
    answer: Union[None, str, Tuple[str, ...]]  # several when a prompt has several right answers
    source: str  # "FILE line N" or "FILE row N", for error messages
    extra: dict = field(default_factory=dict)

    def response(self, name: str) -> Optional[list[dict]]:
        return getattr(self, name)


def load_examples(path: str, *, require: Sequence[str] = ("prompt", "chosen", "rejected")) -> list[Example]:
    """Every row of ``path`` as an ``Example``; any bad row is a ``DataError`` naming file, line and field.
    ``prompt`` and the fields in ``require`` must be present and non-empty; the other known fields
    are validated when present."""
    unknown = set(require) - {"prompt", *RESPONSE_FIELDS}
    if unknown:
        raise ValueError(f"require: unknown fields {sorted(unknown)}")
    require = ("prompt", *(name for name in require if name != "prompt"))
    examples = [_example(row, source, require) for row, source in read_rows(path)]
    if not examples:
        raise DataError(f"{path}: no rows; a data file needs at least one example")
    return examples


def load_prompts(path: str) -> list[Example]:
    """Rows that need only a prompt (for generation and evaluation)."""
    return load_examples(path, require=("prompt",))


def read_rows(path: str) -> Iterator[tuple[Any, str]]:
    """(row, source) for every row of a supported file or saved dataset."""
    dataset_dir, split = _split_dataset_path(path)
    if dataset_dir is not None:
        yield from _dataset_dir_rows(dataset_dir, split)
    elif not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    elif path.endswith(".jsonl"):
        yield from _jsonl_rows(path)
    elif path.endswith(".json"):
        yield from _json_array_rows(path)
    elif path.endswith(".parquet"):
        yield from _parquet_rows(path)
    else:
        raise DataError(f"{path}: unknown data format; use .jsonl, .json (an array of objects), .parquet, or a "
                        f"directory saved by datasets' save_to_disk")


def _split_dataset_path(path: str) -> tuple[Optional[str], Optional[str]]:
    """("DIR", split or None) when ``path`` names a saved dataset directory, else (None, None)."""
    if os.path.isdir(path):
        return path, None
    head, sep, split = path.rpartition(":")
    if sep and split and os.path.isdir(head):
        return head, split
    return None, None


def _dataset_dir_rows(directory: str, split: Optional[str]) -> Iterator[tuple[Any, str]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(directory)
    except FileNotFoundError:
        raise DataError(f"{directory}: a directory that is not a dataset saved by datasets' save_to_disk; give a "
                        f"data file (.jsonl, .json, .parquet) or a saved dataset") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            problem = "names no split" if split is None else f"has no split {split!r}"
            raise DataError(f"{directory}: the dataset has splits {', '.join(loaded)} and the path {problem}; "
                            f"write DIR:SPLIT, e.g. {directory}:{next(iter(loaded))}")
        loaded, name = loaded[split], f"{directory}:{split}"
    elif split is not None:
        raise DataError(f"{directory}: a single dataset without splits, but the path asks for split {split!r}")
    else:
        name = directory
    for number, row in enumerate(loaded):
        yield row, f"{name} row {number}"


class _StrictJSON(ValueError):
    """What JSON allows but a data row must not hold: a key twice (the first would be dropped
    silently), NaN or Infinity (not JSON; Python's parser takes them)."""


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise _StrictJSON(f"key {duplicated[0]!r} is written twice in one object (one would be dropped silently)")
    return dict(pairs)


def _no_constant(name: str):
    raise _StrictJSON(f"{name} is not JSON (write a number or a string)")


def _strict_json(text: str, where: str):
    """``json.loads`` that refuses duplicate keys, NaN/Infinity, integers past Python's digit limit,
    nesting past the recursion limit, and lone surrogates (text no tokenizer can encode)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError:
        raise
    except _StrictJSON as exc:
        raise DataError(f"{where}: {exc}") from None
    except UnicodeEncodeError:
        raise DataError(f"{where}: holds a lone surrogate (\\ud800–\\udfff escapes without their pair): not "
                        f"text any tokenizer can encode") from None
    except RecursionError:
        raise DataError(f"{where}: nested too deeply to be a data row") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise DataError(f"{where}: {exc}") from None
    return value


def _jsonl_rows(path: str) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _utf8(raw, f"{path} line {number}")
            if not line.strip():
                continue
            try:
                row = _strict_json(line, f"{path} line {number}")
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: malformed JSON ({exc.msg} at column {exc.colno}); every "
                                f"line of a .jsonl file must be one JSON object") from None
            yield row, f"{path} line {number}"


def _json_array_rows(path: str) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as handle:
        text = _utf8(handle.read(), path)
    try:
        document = _strict_json(text, path)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(document, list):
        raise DataError(f"{path}: a .json data file must hold one array of row objects, found a "
                        f"{type(document).__name__}; for one object per line use .jsonl")
    # The document is valid JSON: walk the array once more only to learn where each item starts.
    decoder, position, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0
    for row in document:
        while text[position] in " \t\r\n,":
            position += 1
        line, counted = line + text.count("\n", counted, position), position
        yield row, f"{path} line {line}"
        position = decoder.raw_decode(text, position)[1]


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte {exc.start}); JSON data files must be UTF-8") from None


def _parquet_rows(path: str) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for an unreadable file
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    for number, row in enumerate(rows):
        yield row, f"{path} row {number}"


def _example(row: Any, source: str, require: Sequence[str]) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected an object with fields prompt, chosen, rejected; got "
                        f"{type(row).__name__}")
    # Tabular formats store a field absent from some rows as null: null means missing.
    present = {key: value for key, value in row.items() if value is not None}
    if "prompt" not in present and _has_implicit_prompt(present):
        present = _split_implicit_prompt(present, source)
    for name in require:
        if name not in present:
            raise DataError(f"{source}: missing field {name!r} (rows need {', '.join(require)}); found fields "
                            f"{', '.join(row) or 'none'}")
    prompt = chat.as_messages(present["prompt"], "user", source, "prompt")
    responses = {name: _response(present[name], source, name) if name in present else None
                 for name in RESPONSE_FIELDS}
    return Example(prompt=prompt, chosen=responses["chosen"], rejected=responses["rejected"],
                   answer=_answer(present.get("answer"), source), source=source,
                   extra={key: value for key, value in row.items() if key not in KNOWN_FIELDS})


def _response(value: Any, source: str, name: str) -> list[dict]:
    messages = chat.as_messages(value, "assistant", source, name, allow_empty=True)
    if messages[0]["role"] != "assistant":
        raise DataError(f"{source}: field {name!r} must start with an assistant message (it is the response to "
                        f"the prompt), found role {messages[0]['role']!r}")
    return messages


def _answer(value: Any, source: str) -> Union[None, str, Tuple[str, ...]]:
    """One reference answer, or a list of them when a prompt has several right answers (any one is right)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list):
        if not value:
            raise DataError(f"{source}: field 'answer' is an empty list; give at least one right answer, or leave "
                            f"the field out")
        if any(isinstance(item, list) for item in value):
            raise DataError(f"{source}: field 'answer' must be a string, a number or a list of them; it holds a "
                            f"nested list")
        if any(item is None for item in value):
            raise DataError(f"{source}: field 'answer' holds a null among its answers; every entry must be a right "
                            f"answer (a string or a number)")
        return tuple(_answer(item, source) for item in value)
    raise DataError(f"{source}: field 'answer' must be a string, a number or a list of them (every one a right "
                    f"answer), got {type(value).__name__}")


def _has_implicit_prompt(row: dict) -> bool:
    return all(isinstance(row.get(name), list) for name in RESPONSE_FIELDS)


def _split_implicit_prompt(row: dict, source: str) -> dict:
    """TRL's implicit prompt: the messages ``chosen`` and ``rejected`` share are the prompt."""
    chosen, rejected = row["chosen"], row["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise DataError(f"{source}: no field 'prompt', and 'chosen' and 'rejected' do not read as one prompt "
                        f"followed by two different responses (they share {shared} opening messages); add a "
                        f"'prompt' field")
    return {**row, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


# --- tokenizing ----------------------------------------------------------------------------------------------

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
                      fields: Sequence[str] = RESPONSE_FIELDS, cache_dir: Optional[str] = None, log=None
                      ) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Token ids of every example under the truncation policy: the prompt keeps its last
    ``max_prompt_length`` tokens, then each response keeps its first ``max_length - len(prompt)``.
    A row with an empty response is dropped and counted. With ``cache_dir``, results are stored
    there keyed by a fingerprint of the examples, the tokenizer, the lengths and the fields, with a
    digest of their contents; an entry that is unreadable or fails its digest is said and rebuilt."""
    _check_lengths(max_length, max_prompt_length)
    unknown = set(fields) - set(RESPONSE_FIELDS)
    if unknown:
        raise ValueError(f"fields: unknown response fields {sorted(unknown)}")
    fields = tuple(fields)
    cache_path = None
    if cache_dir is not None:
        key = _fingerprint(examples, tokenizer, max_length, max_prompt_length, fields)
        cache_path = os.path.join(cache_dir, f"tokenized-{key[:24]}.npz")
        cached, problem = _read_cache(cache_path, key, fields)
        if cached is not None:
            return cached
        if problem is not None:
            _say_once(f"tokenization cache {cache_path}: {problem}; tokenizing again", log)
    tokenized, report = _tokenize_all(examples, tokenizer, max_length, max_prompt_length, fields)
    if cache_path is not None:
        _write_cache(cache_path, key, tokenized, report, fields)
    return tokenized, report


def _say_once(message: str, log=None) -> None:
    """Through ``log`` (the trainer's: rank 0 only), else on stderr by rank 0, not by every rank."""
    if log is not None:
        log(message)
    elif os.environ.get("RANK", "0") == "0":
        print(f"fastdadpo: {message}", file=sys.stderr, flush=True)


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"data.max_length: must be an integer of at least 2, got {max_length!r}")
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ConfigError(f"data.max_prompt_length: must be a positive integer, got {max_prompt_length!r}")
    if max_prompt_length >= max_length:
        raise ConfigError(f"data.max_prompt_length ({max_prompt_length}) must be smaller than data.max_length "
                          f"({max_length}), or no response token would fit")


def _tokenize_all(examples, tokenizer, max_length, max_prompt_length, fields):
    report = TokenizationReport(rows=len(examples), max_length=max_length, max_prompt_length=max_prompt_length,
                                response_truncated={name: 0 for name in fields})
    tokenized = []
    for index, example in enumerate(examples):
        prompt_ids, responses = _tokenize_one(example, tokenizer, fields)
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


def _tokenize_one(example: Example, tokenizer, fields) -> tuple[list[int], dict]:
    try:
        prompt_ids = chat.prompt_ids(tokenizer, example.prompt)
        responses = {}
        for name in fields:
            messages = example.response(name)
            if messages is None:
                raise DataError(f"field {name!r} is missing, and this run trains on it")
            responses[name] = chat.response_ids(tokenizer, example.prompt, messages, prompt_token_ids=prompt_ids)
    except DataError as exc:
        raise DataError(f"{example.source}: {exc}") from None
    return list(prompt_ids), responses


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


def _cache_digest(arrays: dict) -> str:
    """sha256 of every array of an entry (name, dtype, shape, bytes) but the digest itself."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        if name != "digest":
            array = np.ascontiguousarray(arrays[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape}:".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def _write_cache(path: str, key: str, tokenized: list[TokenizedExample], report: TokenizationReport, fields) -> None:
    arrays = {"index": np.array([t.index for t in tokenized], dtype=np.int64),
              "report": np.array(json.dumps(report.__dict__)), "key": np.array(key)}
    for name in ("prompt", *fields):
        arrays[f"{name}_flat"], arrays[f"{name}_offsets"] = _flatten([getattr(t, f"{name}_ids") for t in tokenized])
    arrays["digest"] = np.array(_cache_digest(arrays))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_file_atomic(path, lambda out: np.savez(out, **arrays), binary=True)  # several ranks may write it at once


def _read_cache(path: str, key: str, fields) -> tuple[Optional[tuple[list[TokenizedExample], TokenizationReport]],
                                                       Optional[str]]:
    """(the cached entry, None), or (None, why it is not usable; None when there is no entry). An
    entry is used only when it loads without pickle, was made for ``key`` and matches its digest."""
    if not os.path.exists(path):
        return None, None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        if "digest" not in arrays or str(arrays["digest"]) != _cache_digest(arrays):
            return None, "its contents do not match their digest (truncated or edited)"
        if str(arrays["key"]) != key:
            return None, "it was written for other inputs"
        report = TokenizationReport(**json.loads(str(arrays["report"])))
        columns = {name: _unflatten(arrays[f"{name}_flat"], arrays[f"{name}_offsets"])
                   for name in ("prompt", *fields)}
        indices = arrays["index"].tolist()
        tokenized = [TokenizedExample(columns["prompt"][i], columns["chosen"][i] if "chosen" in columns else None,
                                      columns["rejected"][i] if "rejected" in columns else None, index)
                     for i, index in enumerate(indices)]
    except Exception as exc:  # noqa: BLE001 (zipfile, zlib, numpy and JSON errors alike: the entry is rebuilt)
        return None, f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return (tokenized, report), None


# --- tokenizer compatibility ---------------------------------------------------------------------------------

def check_tokenizers_compatible(student_tokenizer, teacher_tokenizer, *, student_head_rows: int,
                                teacher_head_rows: int) -> int:
    """The vocabulary size ``V`` that divergences are computed over (the first ``V`` rows of both
    LM heads). The tokenizers must map every token to the same id; heads may be padded past ``V``."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        raise ConfigError(f"model.teacher / model.student: the teacher and student tokenizers differ "
                          f"({_vocab_difference(student_vocab, teacher_vocab)}; {len(teacher_vocab)} tokens "
                          f"against {len(student_vocab)}); distillation compares next-token distributions id by "
                          f"id, so both models must use the same tokenizer")
    vocab_size = max(len(student_tokenizer), max(student_vocab.values()) + 1)
    for key, rows in (("model.student", student_head_rows), ("model.teacher", teacher_head_rows)):
        if rows < vocab_size:
            raise ConfigError(f"{key}: the LM head has {rows} rows, fewer than the tokenizer's {vocab_size} "
                              f"tokens; the model cannot score every token of its own tokenizer")
    return vocab_size


def _vocab_difference(student_vocab: dict, teacher_vocab: dict) -> str:
    for token, student_id in sorted(student_vocab.items(), key=lambda item: item[1]):
        teacher_id = teacher_vocab.get(token)
        if teacher_id != student_id:
            where_teacher = "absent from the teacher's" if teacher_id is None else f"id {teacher_id} in the teacher's"
            return f"token {token!r} is id {student_id} in the student's tokenizer and {where_teacher}"
    token = min(set(teacher_vocab) - set(student_vocab), key=teacher_vocab.get)
    return f"token {token!r} is id {teacher_vocab[token]} in the teacher's tokenizer and absent from the student's"


# --- collating -----------------------------------------------------------------------------------------------

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
