"""How far a reader follows the config through one training run: the walk of ``train(config)``
from module to module through the functions handed the config, a section, the objective or a value
read from them, each function at its first such call (the order a reader meets the code in),
consecutive ones in one module merged into one stay.

    python bench/config_walk.py [--json OUT]

Reports the stays, the modules visited, the returns (stays in a module already left once) and the
modules visited most often. The run is a tiny daDPO training (one step, ZeRO-3, a teacher online, the
reference cached) on models built offline, in this process. Works on the layout before the layers
(``fastdadpo/*.py``) too, so the two can be compared from the same script.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

import fastdadpo  # noqa: E402

PACKAGE = os.path.dirname(os.path.abspath(fastdadpo.__file__))
try:  # the layered layout
    from fastdadpo.commands.train import train  # noqa: E402
    from fastdadpo.commands.config import load_config  # noqa: E402
    from fastdadpo.demo.synthetic import WORDS, build_tokenizer, make_examples, save_model_dir, task_corpus, tiny_causal_lm  # noqa: E402,E501
except ImportError:  # the flat layout before it
    from fastdadpo.trainer import train  # noqa: E402
    from fastdadpo.config import load_config  # noqa: E402
    from fastdadpo.synthetic import WORDS, build_tokenizer, make_examples, save_model_dir, task_corpus, tiny_causal_lm  # noqa: E402,E501


def _module(filename: str):
    """The fastdadpo module a code object belongs to (None outside fastdadpo and for the kernels)."""
    path = os.path.abspath(filename)
    if not path.startswith(PACKAGE + os.sep) or f"{os.sep}kernels{os.sep}" in path:
        return None
    return os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")


def _traceable(value) -> bool:
    """A value whose identity says where it came from (not None, a bool or a small cached int)."""
    return value is not None and not isinstance(value, bool) and not (isinstance(value, int) and -5 <= value <= 256)


def walk(config_path: str) -> list:
    """The modules of the functions handed the config, a section, the objective or a value read
    from them (a path, a number, a mapping), each function at its first such call, in call order;
    consecutive ones in one module merged."""
    config = load_config(config_path)
    classes = {type(config), type(config.objective)} | {type(getattr(config, name)) for name in
                                                         ("model", "data", "train", "deepspeed", "kernels")}
    carried = {id(config), id(config.objective)} | {id(getattr(config, name)) for name in
                                                     ("model", "data", "train", "deepspeed", "kernels")}
    kept = []  # the values read, alive for the run so their ids stay theirs
    originals = {cls: cls.__getattribute__ for cls in classes}

    def recording(cls):
        original = originals[cls]

        def __getattribute__(self, name):
            value = original(self, name)
            if not name.startswith("__") and _traceable(value) and not callable(value):
                carried.add(id(value))
                kept.append(value)
            return value

        return __getattribute__

    seen, path = set(), []

    def profile(frame, event, arg):
        if event != "call" or frame.f_code in seen:
            return
        code = frame.f_code
        module = _module(code.co_filename)
        if module is None:
            return
        arguments = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if any(id(frame.f_locals.get(name)) in carried for name in arguments):
            seen.add(code)
            if not path or path[-1] != module:
                path.append(module)

    for cls in classes:
        cls.__getattribute__ = recording(cls)
    sys.setprofile(profile)
    try:
        train(config)
    finally:
        sys.setprofile(None)
        for cls, original in originals.items():
            cls.__getattribute__ = original
    return path


def summarize(path: list) -> dict:
    left, returns = set(), 0
    for previous, module in zip([None] + path[:-1], path):
        if module in left:
            returns += 1
        if previous is not None:
            left.add(previous)
    visits = collections.Counter(path)
    return {"stays": len(path), "modules": len(visits), "returns": returns,
            "most_visited": visits.most_common(5), "path": path}


def tiny_run(root: str) -> str:
    tokenizer = build_tokenizer(task_corpus(400, seed=0), vocab_size=320)
    models = {}
    for name, kwargs in {"student": dict(hidden_size=32, layers=2, seed=1),
                         "teacher": dict(hidden_size=48, layers=2, seed=2)}.items():
        model = tiny_causal_lm(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **kwargs)
        models[name] = save_model_dir(model, tokenizer, os.path.join(root, name))
    rng = random.Random(0)
    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": " ".join(rng.sample(WORDS, 3))}
            for r in make_examples(8, seed=4, tasks=("repeat",))]
    data = os.path.join(root, "train.jsonl")
    with open(data, "w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": models, "data": {"train": data, "max_length": 48, "cache_dir": os.path.join(root, "cache")},
              "objective": {"name": "dadpo"},
              "train": {"micro_batch_size": 2, "max_steps": 1, "output_dir": os.path.join(root, "run")}}
    path = os.path.join(root, "config.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the summary (with the whole path) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        summary = summarize(walk(tiny_run(root)))
    print(f"{summary['stays']} stays in {summary['modules']} modules, {summary['returns']} returns; most visited: "
          + ", ".join(f"{name} {count}" for name, count in summary["most_visited"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
