"""The training config's reference as valid, commented YAML, generated from the config's dataclasses:
every key with its default, and the comment written beside it (or above it) in the source, so the
README's reference cannot drift from what the trainer reads (``tests/test_config_reference.py``
keeps the two equal, and loads the YAML as a config)."""
from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from typing import Dict, List

import yaml

from fastdadpo.commands.config import SECTIONS
from fastdadpo.commands.trl_names import aliases_of
from fastdadpo.core.objectives import DEFAULT_OBJECTIVE, OBJECTIVES

_FIELD = re.compile(r"^    (\w+): [^=]+?(?:= .*?)?(?:\s+#\s*(?P<comment>.*))?$")
WIDTH = 108  # the README's code blocks
_COMMENT = re.compile(r"^    #\s?(?P<text>.*)$")


def _source_comments(cls) -> Dict[str, str]:
    """{field: its comment}: the one after it on its line, else the comment lines just above it."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        comment = _COMMENT.match(line)
        if comment:
            above.append(comment.group("text").strip())
            continue
        field = _FIELD.match(line)
        if field and not line.startswith("    def"):
            text = field.group("comment") or " ".join(above)
            if text:
                comments[field.group(1)] = text
        above = []
    return comments


def _value(value) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if value == "":
        return '""'
    # A scalar dumps as "VALUE\n...\n" (YAML's document end): the value alone.
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("...\n").strip()


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _lines(section: str, cls, docs: Dict[str, str]) -> List[str]:
    lines = [f"{section}:"]
    aliases = {ours: theirs for theirs, ours in aliases_of(section).items()}
    for field in dataclasses.fields(cls):
        text = docs.get(field.name, "")
        if field.name in aliases:
            text = (text + "; " if text else "") + f"TRL's name: {aliases[field.name]}"
        default = _default(field)
        if dataclasses.is_dataclass(default):  # a nested section: its keys below it, each commented
            lines += [f"  # {line}" for line in textwrap.wrap(text, WIDTH - 4)] + [f"  {field.name}:"]
            nested = _source_comments(type(default))
            lines += ["  " + line for sub in dataclasses.fields(default)
                      for line in _entry(sub.name, getattr(default, sub.name), nested.get(sub.name, ""))]
            continue
        lines += _entry(field.name, default, text)
    return lines


def _entry(name: str, default, comment: str) -> List[str]:
    """``  name: default  # comment``, the comment above the key when it would not fit the line."""
    entry = f"  {name}: {_value(default)}"
    if not comment:
        return [entry]
    if len(entry) + len(comment) + 4 <= WIDTH:
        return [f"{entry}  # {comment}"]
    return [f"  # {line}" for line in textwrap.wrap(comment, WIDTH - 4)] + [entry]


def config_reference() -> str:
    """Every section of a training config with every key at its default, commented."""
    out = ["# fastdadpo train CONFIG.yaml: every key at its default. model.student and data.train are required;",
           "# the objective's parameters depend on objective.name (the README's table lists every objective's)."]
    for section, cls in SECTIONS.items():
        out += _lines(section, cls, _source_comments(cls))
        if section == "data":
            objective = OBJECTIVES[DEFAULT_OBJECTIVE]
            out.append(f"objective:  # the default objective, {DEFAULT_OBJECTIVE}; each parameter with its source")
            out.append(f"  name: {DEFAULT_OBJECTIVE}")
            for field in objective.parameters():
                out += _entry(field.name, field.default, f"{field.metadata['doc']} ({field.metadata['source']})")
    return "\n".join(out) + "\n"
