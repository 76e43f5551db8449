"""Preference data: loading and validating rows.

Files
    ``.jsonl``   one JSON object per line (blank lines are skipped); errors name ``FILE line N``.
    ``.json``    one JSON array of objects; errors name the line where the object starts.
    ``.parquet`` a table, one row per example; errors name ``FILE row N`` (N counted from 0, as ``ds[N]``).
    directory   saved by ``datasets.Dataset.save_to_disk``; a ``DatasetDict`` needs its split: ``DIR:split``.

Rows follow TRL's preference format: ``prompt``, ``chosen``, ``rejected``, each a string or a list
of ``{"role", "content"}`` messages. A string prompt is one user message, a string response one
assistant message. TRL's implicit-prompt rows (no ``prompt``; ``chosen`` and ``rejected`` are whole
conversations that share their opening messages) are split at the last shared message.
TRL's SFT formats serve the chosen-only objectives (sft, kd, ...): ``prompt`` and ``completion``
(the completion is the chosen response), and conversational ``messages`` (the messages before the
last assistant message are the prompt, that message and any after it the response).
``answer`` (a reference answer, or a list of right answers) and every other field pass through untouched.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

from fastdadpo.base.errors import DataError
from fastdadpo.base.files import not_a_readable_file
from fastdadpo.core import chat


RESPONSE_FIELDS = ("chosen", "rejected")


KNOWN_FIELDS = ("prompt", *RESPONSE_FIELDS, "answer", "completion", "messages")


@dataclass
class Example:
    """One validated row. Messages are ``{"role", "content"}`` dicts."""
    prompt: list[dict]
    chosen: Optional[list[dict]]
    rejected: Optional[list[dict]]
    answer: Union[None, str, Tuple[str, ...]]  # several when a prompt has several right answers
    source: str  # "FILE line N" or "FILE row N", for error messages
    extra: dict = field(default_factory=dict)
    # Every text field a plain string (TRL's standard format, not conversational): with
    # ``data.string_rows: raw`` such a row is tokenized as the text itself, no chat template. A
    # ``text`` row (language modeling) is plain with an empty prompt and its text as ``chosen``.
    plain: bool = False

    def response(self, name: str) -> Optional[list[dict]]:
        return getattr(self, name)

    @property
    def is_text(self) -> bool:
        return not self.prompt


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
    elif any(char in path for char in "*?[") or (os.path.isfile(path) and _builder(path) not in (None, "native")):
        yield from _local_files_rows(path)
    elif not os.path.exists(path) and _builder(path) is None and _HUB_NAME.match(path):
        name, _, split = path.partition(":")
        yield from _load_dataset_rows(path, name, split=split or "train")
    elif problem := not_a_readable_file(path):
        raise DataError(f"{path}: {problem}; give a data file, a saved dataset directory or "
                        f"a Hub dataset name")
    elif path.endswith(".jsonl"):
        yield from _jsonl_rows(path)
    elif path.endswith(".json"):
        yield from _json_array_rows(path)
    elif path.endswith(".parquet"):
        yield from _parquet_rows(path)
    else:
        raise DataError(f"{path}: unknown data format; use .jsonl, .json (an array of objects), .parquet, .csv, "
                        f".tsv, .arrow (each optionally compressed: .gz, .bz2, .xz, .zst), a glob of such files, "
                        f"a dataset directory (save_to_disk's, or data files laid out as on the Hub) or a Hub "
                        f"dataset name")


# Formats read through datasets.load_dataset (its cache, its offline mode): its builder per extension,
# compressed or not. "native": read here, with line numbers in errors.
_BUILDERS = {".jsonl": "native", ".json": "native", ".parquet": "native", ".csv": "csv", ".tsv": "csv",
             ".arrow": "arrow"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


def _uncompressed(path: str) -> str:
    name = path.lower()
    return name[:name.rindex(".")] if name.endswith(_COMPRESSED) else name


def _builder(path: str) -> Optional[str]:
    """datasets' builder for ``path`` ("native" for the formats read here), None for an unknown one."""
    name = _uncompressed(path)
    builder = next((b for ext, b in _BUILDERS.items() if name.endswith(ext)), None)
    if builder == "native" and name != path.lower():  # compressed: datasets decompresses it
        return "parquet" if name.endswith(".parquet") else "json"
    return builder


def _local_files_rows(pattern: str) -> Iterator[tuple[Any, str]]:
    """Local files datasets reads (CSV, TSV, compressed JSON Lines, Arrow; a glob of data files)."""
    files = sorted(glob.glob(pattern)) if any(char in pattern for char in "*?[") else [pattern]
    if not files:
        raise DataError(f"{pattern}: matches no file")
    builders = {_builder(f) for f in files}
    if len(builders) != 1 or None in builders:
        raise DataError(f"{pattern}: matches files of {'unknown' if None in builders else 'different'} formats "
                        f"({', '.join(os.path.basename(f) for f in files[:5])}); one format per data path")
    for file in files:
        if problem := not_a_readable_file(file):  # a glob can match a directory or a FIFO too
            raise DataError(f"{file}: {problem}")
    builder = builders.pop()
    if builder == "native":
        builder = "parquet" if files[0].endswith(".parquet") else "json"
    options = {"delimiter": "\t"} if _uncompressed(files[0]).endswith(".tsv") else {}
    yield from _load_dataset_rows(pattern, builder, data_files=files, split="train", **options)


def _load_dataset_rows(where: str, name: str, **kwargs) -> Iterator[tuple[Any, str]]:
    """Rows through ``datasets.load_dataset(name, **kwargs)``: a Hub dataset (cached; offline with
    HF_HUB_OFFLINE=1), a local folder laid out as one, or local files with a builder."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 (datasets raises many types: not found, offline, bad split, parse)
        if "data_files" in kwargs:
            hint = ""
        elif os.path.isdir(name):
            hint = ("; a local directory is read as save_to_disk's output or as data files laid out as on the Hub "
                    "(e.g. data/train.jsonl), and this one is neither")
        else:
            hint = ("; it is not a local file or directory, so it was looked up as a Hugging Face Hub dataset "
                    "(NAME or OWNER/NAME, :SPLIT for a split other than train)")
        raise DataError(f"{where}: cannot be read through datasets.load_dataset ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]}){hint}") from None
    for number, row in enumerate(loaded):
        yield row, f"{where} row {number}"


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
    except FileNotFoundError:  # not save_to_disk's layout: a folder of data files, as a Hub dataset is
        yield from _load_dataset_rows(directory if split is None else f"{directory}:{split}", directory,
                                      split=split or "train")
        return
    except PermissionError as exc:
        raise DataError(f"{directory}: a saved dataset whose file {exc.filename or ''} cannot be read by this user "
                        f"(permission denied)") from None
    except Exception as exc:  # noqa: BLE001 (datasets, pyarrow and JSON errors alike: a damaged saved dataset)
        raise DataError(f"{directory}: a saved dataset that cannot be read ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}); its state.json or .arrow files are damaged: save it "
                        f"again") from None
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


# Python refuses to parse longer integers (a guard against quadratic-time conversion); a row's
# numbers (a score, an id) never come close.
MAX_INT_DIGITS = 4300


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _StrictJSON(f"holds an integer of {len(digits.lstrip('-')):,} digits; a data row's numbers have at "
                          f"most {MAX_INT_DIGITS:,} (write it as a string if it is an identifier)")
    return int(digits)


def _finite_float(digits: str) -> float:
    value = float(digits)
    if not math.isfinite(value):  # 1e999: past a double, read as inf, written back as Infinity (not JSON)
        raise _StrictJSON(f"holds the number {digits[:40]}, past the largest a float holds (about 1.8e308)")
    return value


def strict_json(text: str, where: str):
    """``json.loads`` that refuses duplicate keys, NaN/Infinity, integers past Python's digit limit,
    nesting past the recursion limit, and lone surrogates (text no tokenizer can encode)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                           parse_int=_bounded_int, parse_float=_finite_float)
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
    except ValueError as exc:  # anything else Python's parser refuses after JSON's grammar passed
        raise DataError(f"{where}: {exc}") from None
    return value


def _jsonl_rows(path: str) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _utf8(raw, f"{path} line {number}")
            if not line.strip():
                continue
            try:
                row = strict_json(line, f"{path} line {number}")
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: malformed JSON ({exc.msg} at column {exc.colno}); every "
                                f"line of a .jsonl file must be one JSON object") from None
            yield row, f"{path} line {number}"


def _json_array_rows(path: str) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as handle:
        text = _utf8(handle.read(), path)
    try:
        document = strict_json(text, path)
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
    present = _from_sft_form(present, source)
    if "prompt" not in present and _has_implicit_prompt(present):
        present = _split_implicit_prompt(present, source)
    if "text" in present and "prompt" not in present:
        return _text_example(present, row, source, require)
    for name in require:
        if name not in present:
            raise DataError(f"{source}: missing field {name!r} (rows need {', '.join(require)}); found fields "
                            f"{', '.join(row) or 'none'}")
    prompt = chat.as_messages(present["prompt"], "user", source, "prompt")
    responses = {name: _response(present[name], source, name) if name in present else None
                 for name in RESPONSE_FIELDS}
    plain = all(isinstance(present[name], str) for name in ("prompt", *RESPONSE_FIELDS) if name in present)
    return Example(prompt=prompt, chosen=responses["chosen"], rejected=responses["rejected"],
                   answer=_answer(present.get("answer"), source), source=source,
                   extra={key: value for key, value in row.items() if key not in KNOWN_FIELDS}, plain=plain)


def _text_example(present: dict, row: dict, source: str, require: Sequence[str]) -> Example:
    """TRL's language-modeling row ``{"text": ...}``: trained on as a whole (sft, kd), with
    ``data.string_rows: raw``; it has no prompt to sample from nor a second response to prefer."""
    if set(require) != {"prompt", "chosen"}:
        needs = "a prompt to answer" if "chosen" not in require else "a 'rejected' response"
        raise DataError(f"{source}: a 'text' row (TRL's language-modeling format) has no prompt and response, but "
                        f"this needs {needs}; give prompt/chosen/rejected, prompt/completion or messages rows")
    text = present["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{source}: field 'text' must be a non-empty string")
    return Example(prompt=[], chosen=[{"role": "assistant", "content": text}], rejected=None,
                   answer=_answer(present.get("answer"), source), source=source,
                   extra={key: value for key, value in row.items() if key not in KNOWN_FIELDS and key != "text"},
                   plain=True)


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


def _from_sft_form(row: dict, source: str) -> dict:
    """TRL's SFT rows as prompt and chosen: ``completion`` is the chosen response; ``messages`` is
    split before its last assistant message. Given beside ``chosen`` (or ``messages`` beside
    ``prompt``), which one is meant cannot be known: an error."""
    if "completion" in row:
        if "chosen" in row:
            raise DataError(f"{source}: has both 'completion' and 'chosen'; give the response once")
        row = {**row, "chosen": row["completion"]}
    if "messages" in row:
        if "prompt" in row or "chosen" in row:
            raise DataError(f"{source}: has 'messages' and also 'prompt' or 'chosen'; give the conversation one way")
        messages = chat.as_messages(row["messages"], "user", source, "messages")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError(f"{source}: field 'messages' needs a prompt message followed by an assistant message "
                            f"(the response trained on); found roles {[m['role'] for m in messages]}")
        row = {**row, "prompt": messages[:last], "chosen": messages[last:]}
    return row


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
