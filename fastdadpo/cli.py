"""``fastdadpo`` command line: one subcommand per stage of the recipe.

Each subcommand lives in its own module, imported only when that command runs (importing torch,
transformers and DeepSpeed takes seconds; ``--help`` should not). A module offers
``add_arguments(parser)`` and ``run(args) -> int``. Bad input raises ``UserError``, printed here
as one paragraph, exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
import warnings

from fastdadpo.base.errors import UserError

# name -> (module, one-line help)
COMMANDS = {
    "train": ("fastdadpo.commands.train", "train a student with one of the objectives (README's table) from a YAML config"),
    "generate": ("fastdadpo.commands.generate", "sample teacher (chosen) and student (rejected) responses into preference pairs"),
    "prune": ("fastdadpo.commands.prune", "structurally prune a causal LM (MLP channels, attention heads, layers)"),
    "eval": ("fastdadpo.commands.evaluate", "compare a student with its teacher: divergence, win/preference rate, accuracy"),
    "run": ("fastdadpo.commands.recipe", "run a whole recipe: prune, generate, dsft, precompute, train, eval"),
    "export": ("fastdadpo.commands.export", "a training checkpoint (either engine) as a Hugging Face model directory"),
    "plan": ("fastdadpo.commands.plan", "the memory a training config needs per GPU (no weights loaded), and the largest micro-batch"),
    "demo": ("fastdadpo.demo.command", "the embedded end-to-end demo: a tiny distillation on CPU, nothing downloaded"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdadpo", description="fastdadpo: distill a large teacher LLM into a "
                                     "small student with daDPO and its relatives, without [tokens x vocab] logits.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they say something: not for required options, unset ones (None) or flags
    (False), and not twice where the help text already gives its own "default: ..."."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def _command_parser(name: str):
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"fastdadpo {name}", description=COMMANDS[name][1],
                                     formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return module, parser


def report_user_error(exc: BaseException) -> None:
    message = " ".join(str(exc).split())
    lines = textwrap.wrap(f"fastdadpo: error: {message}", width=100, break_on_hyphens=False, break_long_words=False)
    print("\n".join(lines), file=sys.stderr)


def take_launcher_local_rank(argv: list) -> list:
    """The ``deepspeed`` launcher (and torch's legacy ``launch``) append ``--local_rank=N`` to the
    command; the rank is already in the environment torchrun-style launchers set, so it is moved
    there (``LOCAL_RANK``) and out of the arguments the subcommand parses."""
    kept, rest = [], iter(argv)
    for arg in rest:
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            os.environ.setdefault("LOCAL_RANK", next(rest, "0"))
        else:
            kept.append(arg)
    return kept


def quiet_third_party() -> None:
    """Noise a user cannot act on, off for every command: DeepSpeed's "Setting accelerator to CPU"
    warning (it guesses when ``DS_ACCELERATOR`` is unset, and on a machine without CUDA the guess is
    the CPU anyway) and torch's FutureWarnings about the collectives DeepSpeed itself calls (hundreds
    per training). Other warnings stay."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def main(argv=None) -> int:
    argv = take_launcher_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_third_party()
    try:
        module, parser = _command_parser(argv[0])
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except UserError as exc:
        report_user_error(exc)
        return 2
    except KeyboardInterrupt:
        print("fastdadpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
