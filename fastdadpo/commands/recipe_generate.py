"""A recipe's sections that are a command's flags (``generate:``, ``prune:``, ``eval:``): turned into
the flags its stage passes, and the ``generate:`` section checked when the recipe loads, by
``fastdadpo generate``'s own parser and checks, so a wrong key or value fails before any stage runs."""
from __future__ import annotations

import argparse
import math
from typing import Any, Dict, List

from fastdadpo.base.errors import ConfigError, UserError
from fastdadpo.commands import generate

# Flags of `fastdadpo generate` that the recipe sets itself, never the `generate:` section.
SET_BY_RECIPE = {"teacher", "student", "prompts", "out", "help"}


def as_flags(options: Dict[str, Any]) -> List[str]:
    """``{max_new_tokens: 8, keep_chosen: true}`` -> ``--max-new-tokens 8 --keep-chosen``."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif value is not None:
            args += [flag, str(value)]
    return args


def check_generate_section(options: Dict[str, Any], where: str) -> None:
    """The section as its stage will pass it, through generate's parser and ``check_arguments``;
    ``where`` names it in errors (``recipe.yaml: generate``)."""
    parser = argparse.ArgumentParser(prog="fastdadpo generate", add_help=False, exit_on_error=False)
    generate.add_arguments(parser)
    actions = {action.dest: action for action in parser._actions if action.dest not in SET_BY_RECIPE}
    unknown = set(options) - set(actions)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; the keys are fastdadpo generate's "
                          f"flags ({', '.join(sorted(actions))}); the recipe sets teacher, student, prompts and out "
                          f"itself")
    for key, value in options.items():
        switch = isinstance(actions[key], argparse._StoreTrueAction)
        if switch and not isinstance(value, bool):  # as a flag, "yes" or 1 would be read as a value
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{key} is {value}; numbers must be finite")
    if "student_url" in options:
        raise ConfigError(f"{where}: student_url would serve one model at every stage, but the recipe's student "
                          f"changes (pruned, dSFT, a regenerating entry); serve the teacher only")
    if options.get("student_model_name"):
        raise ConfigError(f"{where}: student_model_name names a served student, which a recipe does not have")
    stand_ins = ["--student", "S", "--prompts", "P", "--out", "O"] + ([] if options.get("keep_chosen") else
                                                                       ["--teacher", "T"])
    try:
        parsed, leftover = parser.parse_known_args(stand_ins + as_flags(options))
        if not leftover:
            generate.check_arguments(parsed)
    except (argparse.ArgumentError, UserError) as exc:
        raise ConfigError(f"{where}: {exc} (the section's keys are generate's flags)") from None
    if leftover:
        raise ConfigError(f"{where}: {' '.join(leftover)} is not a value generate takes")
