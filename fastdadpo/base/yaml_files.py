"""YAML files a user writes (a training config, a recipe): read safely (no tags, no key twice, no
alias bombs, UTF-8 checked), merged, and changed by ``--set KEY=VALUE``. Errors name the file and line."""
from __future__ import annotations

import copy
from typing import Any, Dict

import yaml

from fastdadpo.base.errors import ConfigError
from fastdadpo.base.files import not_a_readable_file


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is written twice (first at line {seen[key] + 1}); one of them would "
                                f"be silently dropped", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str, what: str) -> Dict[str, Any]:
    """A YAML file whose top level is a mapping (a config, a recipe); errors name the file and line."""
    problem = not_a_readable_file(path)
    if problem:
        raise ConfigError(f"{what} file {path} {problem}")
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the {what} as "
                          f"UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: its values are nested too deeply to read (thousands of levels); a {what} "
                          f"is a few levels of sections") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the {what} must be a mapping of sections, got {type(raw).__name__}")
    check_shape(raw, path)
    return raw


# A config or recipe is a few hundred values; YAML aliases can make a short file expand to billions
# ("billion laughs"), which every later walk (merging, error messages) would pay for.
MAX_YAML_VALUES = 100_000


def check_shape(raw, path: str) -> None:
    """Every mapping key a string, and the whole value (aliases expanded) under MAX_YAML_VALUES."""
    sizes = {}

    def size(node, where: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        total = 1
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise ConfigError(f"{path}: key {key!r} under {where or 'the top level'} is not a string "
                                      f"(write it as text: keys are config names)")
                total += size(value, f"{where}.{key}" if where else key)
        elif isinstance(node, list):
            total += sum(size(item, where) for item in node)
        sizes[id(node)] = total
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"{path}: {where or 'the file'} expands to more than {MAX_YAML_VALUES:,} values "
                              f"(YAML aliases?); a config is a few hundred")
        return total

    size(raw, "")


def merge_mappings(base: dict, extra: dict) -> dict:
    """A new mapping: ``base`` with ``extra`` merged in, nested mappings merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(raw: dict, override: str) -> str:
    """``--set a.b.c=VALUE`` into the raw mapping, VALUE read as YAML (a plain string if it is not);
    returns the dot path."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set train.lr=1e-5")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")  # deepspeed.extra.a.b=... nests below extra like any other path
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    except RecursionError:
        raise ConfigError(f"--set {key}: its value is nested too deeply to read (thousands of levels)") from None
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.setdefault(part, {}), dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = value
    return ".".join(parts)
