"""What ``fastdadpo generate`` writes and how a rerun continues it: the output rows, the settings
record beside them (``OUT.settings.json``), the check of every kept row, and the final sort."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from fastdadpo.base.errors import UserError
from fastdadpo.base.files import write_text_atomic
from fastdadpo.core.rows import Example
from fastdadpo.models.served import probe_matches

ROLES = ("teacher", "student")  # teacher -> chosen, student -> rejected


def kept_chosen(example: Example) -> str:
    """The row's own chosen response, the text it was given (``--keep-chosen`` checked it is one message)."""
    return example.chosen[0]["content"]


def output_row(example: Example, index: int, *, chosen: str, rejected: str) -> dict:
    """A preference row in TRL's format (a single user message as a plain string), plus what the
    prompt row carried."""
    single_user_turn = len(example.prompt) == 1 and example.prompt[0]["role"] == "user"
    row = {"index": index, "prompt": example.prompt[0]["content"] if single_user_turn else example.prompt,
           "chosen": chosen, "rejected": rejected}
    if example.answer is not None:
        row["answer"] = example.answer
    for key, value in example.extra.items():
        row.setdefault(key, value)
    return row


# What an output whose settings predate a key was generated with: it continues under the same settings.
SETTINGS_BEFORE_THEIR_KEY = {"keep_chosen": False, "teacher_server": None, "student_server": None,
                             "string_rows": "template"}


def settings_file(out: str) -> str:
    return out + ".settings.json"


def prepare_output(out: str, settings: dict, examples: Sequence[Example]) -> set[int]:
    """Indices already in ``out`` (after dropping a partial last line), each row checked; records the
    settings of a new output."""
    settings_path = settings_file(out)
    if not os.path.exists(out) or os.path.getsize(out) == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_text_atomic(settings_path, json.dumps(settings, indent=1) + "\n")
        open(out, "w").close()
        return set()
    try:
        with open(settings_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{out}: the file exists but {settings_path}, the record of the settings it was generated "
                        f"with, is missing or unreadable, so it cannot be continued safely; choose another --out "
                        f"or delete the file") from None
    recorded = {**SETTINGS_BEFORE_THEIR_KEY, **recorded}
    changed = [f"{key} {_shown(recorded.get(key))} -> {_shown(value)}" for key, value in settings.items()
               if not _same(key, recorded.get(key), value)]
    for role in ROLES:
        weights = f"{role}_weights"
        if settings[role] is not None and weights in recorded and recorded[weights] != settings[weights] \
                and recorded.get(role) == settings[role]:
            changed.append(f"the {role}'s config or weights at {settings[role]} changed since")
    if changed:
        raise UserError(f"{out} was generated with other settings ({'; '.join(changed)}); continuing it would mix "
                        f"two samplings in one file; rerun with the recorded settings, or choose another --out")
    _drop_partial_last_line(out)
    chosen = [kept_chosen(example) for example in examples] if settings["keep_chosen"] else None
    return set(read_rows(out, len(examples), [_prompt_field(example) for example in examples], chosen))


def _same(key: str, recorded, now) -> bool:
    """A served model is the same when its server lists it the same and it answers the probe the same
    (within the numerics of a restarted server), wherever it is now served; every other setting must
    be equal."""
    if key.endswith("_server") and isinstance(recorded, dict) and isinstance(now, dict):
        listed = lambda identity: {k: v for k, v in identity.items() if k not in ("url", "probe")}  # noqa: E731
        return listed(recorded) == listed(now) and probe_matches(recorded.get("probe"), now.get("probe"))
    return recorded == now


def _shown(value) -> str:
    """A setting in a message: a served model's probe is numbers nobody reads, left out."""
    if isinstance(value, dict) and "probe" in value:
        value = {**{k: v for k, v in value.items() if k != "probe"}, "probe": "…"}
    return repr(value)


def _drop_partial_last_line(out: str) -> None:
    """A kill during a write can leave a last line without its newline: cut it (its batch is regenerated)."""
    with open(out, "rb+") as handle:
        content = handle.read()
        if content and not content.endswith(b"\n"):
            handle.truncate(content.rfind(b"\n") + 1)
            print(f"generate: dropped a partial last line of {out} (an interrupted write)", file=sys.stderr)


def _prompt_field(example: Example):
    """The ``prompt`` of the row ``output_row`` writes for ``example``, as JSON reads it back."""
    return json.loads(json.dumps(output_row(example, 0, chosen="", rejected="")["prompt"], default=str))


def read_rows(out: str, num_prompts: int, prompts: Optional[list] = None,
               chosen: Optional[list] = None) -> dict[int, str]:
    """index -> line of every row in ``out``. Each must be what this command writes: a JSON object
    with an in-range int ``index``, string ``chosen`` and ``rejected``, and (given ``prompts``) the
    prompt of that index, (given ``chosen``, the kept responses) that index's chosen; anything else
    is a UserError naming the line, never a row kept."""
    lines: dict[int, str] = {}
    with open(out, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{out} line {number}"
            try:
                row = json.loads(line)
                index = row["index"]
            except (json.JSONDecodeError, TypeError, KeyError):
                raise UserError(f"{where}: not a row written by fastdadpo generate (malformed JSON or "
                                f"no 'index'); repair or delete the file") from None
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_prompts:
                raise UserError(f"{where}: 'index' {index!r} is not a row of the {num_prompts} prompts")
            bad = [name for name in ("chosen", "rejected") if not isinstance(row.get(name), str)]
            if bad:
                raise UserError(f"{where}: {' and '.join(repr(b) for b in bad)} must be strings (a generated "
                                f"response), got {', '.join(type(row.get(b)).__name__ for b in bad)}; not a row "
                                f"this command wrote: repair or delete the file")
            if prompts is not None and row.get("prompt") != prompts[index]:
                raise UserError(f"{where}: its 'prompt' is not prompt {index} of --prompts; the file belongs to "
                                f"other prompts: choose another --out or delete it")
            if chosen is not None and row["chosen"] != chosen[index]:
                raise UserError(f"{where}: its 'chosen' is not the chosen response of prompt {index} of --prompts "
                                f"(--keep-chosen copies it unchanged); repair or delete the file")
            if index in lines:
                raise UserError(f"{out} line {number}: a second row for prompt {index}")
            lines[index] = line
    return lines


def append_rows(out, rows: list[dict]) -> None:
    """The rows appended and synced; a failing disk is one paragraph (the rows before are whole: the
    reader drops a torn last line, and a rerun generates the rest)."""
    try:
        out.write("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
        out.flush()
        os.fsync(out.fileno())
    except OSError as exc:
        raise UserError(f"--out {out.name}: writing rows failed ({exc.strerror or exc}); the rows written before are "
                        f"kept: free space and run the same command again to continue") from None


def finish(out: str, num_prompts: int) -> None:
    """Rewrite a complete output sorted by index (once; a sorted file is left alone)."""
    lines = read_rows(out, num_prompts)
    if len(lines) != num_prompts:
        raise RuntimeError(f"{out}: {num_prompts - len(lines)} rows missing after generation")
    order = list(lines)
    if order != sorted(order):
        write_text_atomic(out, "".join(lines[index] for index in sorted(order)))


