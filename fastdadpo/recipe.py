"""``fastdadpo run RECIPE.yaml``: the whole daDPO experiment, stage by stage.

    prune → generate → dsft → precompute → train → eval

Each stage writes its output under the recipe's ``output_dir`` and is skipped when that output is
already complete, so an interrupted run continues where it stopped (trainings resume from their
latest checkpoint). Complete means: the stage's process exited 0 and the runner then wrote its
completion marker, ``stages/NAME.json`` (the command it ran, and a hash of a training's config),
and the output is still there; a directory existing proves nothing (a killed stage leaves
partial ones). A stage whose command or config changed since its marker runs again. Each stage runs as its own ``fastdadpo`` process, under ``launcher`` (e.g.
``torchrun --nproc_per_node=8``) for the stages that shard models over ranks.

A recipe (see configs/recipes/):

    output_dir: runs/vicuna-dadpo
    launcher: ""                     # prefix for generate/train, e.g. "torchrun --nproc_per_node=8"
    teacher: lmsys/vicuna-7b-v1.5
    student: lmsys/vicuna-7b-v1.5    # the starting student (pruned first when `prune` is given)
    prompts: data/prompts.jsonl      # training prompts ("prompt", optional "answer")
    eval_prompts: data/heldout.jsonl # held-out prompts for the final comparison
    prune: {ratio: 0.2}              # optional; drop_layers, calibration_samples, seed
    generate: {max_new_tokens: 512, temperature: 0.7, top_p: 0.95, seed: 0}
    train_common: {...}              # a training config (model/data/train/deepspeed sections) under every training
    dsft: {train: {lr: 2.0e-5}}      # overrides for the distilled SFT
    students:                        # preference trainings from the dSFT student, by display name
      dDPO: {objective: {name: dpo}}
      daDPO: {objective: {name: dadpo}}
    eval: {judge: exact, max_new_tokens: 128}
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from .checkpoint import write_json_atomic
from .config import apply_override, config_from_mapping, merge_mappings, read_yaml_mapping
from .errors import ConfigError, UserError

STAGES = ("prune", "generate", "dsft", "precompute", "train", "eval")
RECIPE_KEYS = {"output_dir", "launcher", "teacher", "student", "prompts", "eval_prompts", "prune", "generate",
               "train_common", "dsft", "students", "eval", "plots"}


class StageFailed(UserError):
    pass


@dataclass
class Recipe:
    output_dir: str
    teacher: str
    student: str
    prompts: str
    eval_prompts: Optional[str] = None
    launcher: str = ""
    prune: Optional[dict] = None
    generate: dict = field(default_factory=dict)
    train_common: dict = field(default_factory=dict)
    dsft: dict = field(default_factory=dict)
    students: Dict[str, dict] = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    source: str = "<recipe>"

    # --- where each stage's output lives ---
    def path(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)

    @property
    def pruned_dir(self) -> str:
        return self.path("student-pruned")

    @property
    def start_student(self) -> str:
        return self.pruned_dir if self.prune else self.student

    @property
    def pairs(self) -> str:
        return self.path("pairs.jsonl")

    def training_dir(self, name: str) -> str:
        return self.path("train", _slug(name))

    @property
    def dsft_final(self) -> str:
        return os.path.join(self.training_dir("dSFT"), "final")

    # --- what each training is ---
    def trainings(self) -> List[tuple]:
        """(name, objective overrides, starting student) of every training, dSFT first."""
        dsft = merge_mappings({"objective": {"name": "sft"}}, self.dsft)
        return [("dSFT", dsft, self.start_student)] + [(name, overrides, self.dsft_final)
                                                      for name, overrides in self.students.items()]

    def training_config(self, name: str, overrides: dict, student: str) -> dict:
        """The training config (a mapping, as in a YAML file) of one training of the recipe."""
        config = merge_mappings(self.train_common, {"model": {"student": student, "teacher": self.teacher},
                                                    "data": {"train": self.pairs},
                                                    "train": {"output_dir": self.training_dir(name), "resume": True}})
        return merge_mappings(config, overrides)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def load_recipe(path: str, overrides: List[str] = ()) -> Recipe:
    raw = read_yaml_mapping(path, "recipe")
    for override in overrides:
        apply_override(raw, override)
    unknown = set(raw) - RECIPE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown recipe keys {', '.join(sorted(unknown))}; known: "
                          f"{', '.join(sorted(RECIPE_KEYS))}")
    for key in ("output_dir", "teacher", "student", "prompts"):
        if not raw.get(key):
            raise ConfigError(f"{path}: recipe key {key!r} is required")
    raw.pop("plots", None)
    recipe = Recipe(**raw, source=path)
    if not isinstance(recipe.students, dict) or not all(isinstance(v, dict) for v in recipe.students.values()):
        raise ConfigError(f"{path}: students must map display names to training overrides (mappings), e.g. "
                          f"daDPO: {{objective: {{name: dadpo}}}}")
    for key in ("train_common", "dsft", "generate", "eval"):
        if not isinstance(getattr(recipe, key), dict):
            raise ConfigError(f"{path}: {key} must be a mapping, got {getattr(recipe, key)!r}")
    # Every training's config is checked now, not when its stage comes hours later.
    for name, overrides, student in recipe.trainings():
        config_from_mapping(recipe.training_config(name, overrides, student), f"{path} (training {name})")
    return recipe


# --- running stages ------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, recipe: Recipe, stages: List[str], echo=print):
        self.recipe, self.stages, self.echo = recipe, stages, echo
        os.makedirs(recipe.output_dir, exist_ok=True)

    def run(self) -> None:
        for stage in STAGES:
            if stage in self.stages:
                getattr(self, f"stage_{stage}")()

    # --- completion markers ---
    def _marker_path(self, log_name: str) -> str:
        return self.recipe.path("stages", f"{log_name}.json")

    def _identity(self, args: List[str]) -> dict:
        """What a stage's result depends on: its command, and the contents of a config file it reads."""
        identity = {"command": list(args)}
        if args and args[0] == "train":
            with open(args[1], "rb") as handle:
                identity["config_sha256"] = hashlib.sha256(handle.read()).hexdigest()
        return identity

    def is_complete(self, log_name: str, args: List[str], output: str) -> bool:
        """The stage finished with these arguments (its marker says so) and its output is there."""
        try:
            with open(self._marker_path(log_name), encoding="utf-8") as handle:
                marker = json.load(handle)
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("identity") == self._identity(args) and os.path.exists(output)

    def _mark_complete(self, log_name: str, args: List[str]) -> None:
        path = self._marker_path(log_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"stage": log_name, "identity": self._identity(args), "finished": time.time()})

    def fastdadpo(self, args: List[str], distributed: bool, log_name: str) -> None:
        launcher = shlex.split(self.recipe.launcher) if distributed and self.recipe.launcher else []
        command = (launcher + ["-m", "fastdadpo"] if launcher else [sys.executable, "-m", "fastdadpo"]) + args
        log_path = self.recipe.path("logs", f"{log_name}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self.echo(f"[run] {log_name}: {' '.join(shlex.quote(a) for a in command)}")
        started = time.time()
        with open(log_path, "a", encoding="utf-8") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                tail = log.read()[-1500:]
            raise StageFailed(f"stage {log_name} failed (exit {result.returncode}); its log is {log_path}. "
                              f"Last lines: {tail}")
        self._mark_complete(log_name, args)
        self.echo(f"[run] {log_name}: done in {time.time() - started:.0f}s")

    def stage_prune(self) -> None:
        r = self.recipe
        if not r.prune:
            return
        options = dict(r.prune)
        args = ["prune", "--model", r.student, "--out", r.pruned_dir, "--ratio", str(options.pop("ratio", 0.2)),
                "--calibration", options.pop("calibration", r.prompts)]
        args += _flags(options)
        if self.is_complete("prune", args, os.path.join(r.pruned_dir, "config.json")):
            self.echo(f"[run] prune: {r.pruned_dir} complete, skipped")
            return
        if os.path.exists(r.pruned_dir):
            # This recipe's own pruned directory, without the marker of a finished prune with these
            # settings: what an interrupted prune (or other settings) left. Pruning never overwrites.
            self.echo(f"[run] prune: {r.pruned_dir} is not a finished prune with these settings; removed, pruning "
                      f"again")
            shutil.rmtree(r.pruned_dir)
        self.fastdadpo(args, distributed=False, log_name="prune")

    def stage_generate(self) -> None:
        r = self.recipe
        args = ["generate", "--teacher", r.teacher, "--student", r.start_student, "--prompts", r.prompts,
                "--out", r.pairs] + _flags(r.generate)
        if self.is_complete("generate", args, r.pairs):
            self.echo(f"[run] generate: {r.pairs} complete, skipped")
            return
        self.fastdadpo(args, distributed=True, log_name="generate")

    def _training_config(self, name: str, overrides: dict, student: str) -> str:
        path = self.recipe.path("configs", f"{_slug(name)}.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.recipe.training_config(name, overrides, student), handle, sort_keys=False)
        return path

    def _train(self, name: str, overrides: dict, student: str, precompute_only: bool = False) -> None:
        final = os.path.join(self.recipe.training_dir(name), "final")
        config = self._training_config(name, overrides, student)
        train_args = ["train", config]
        if self.is_complete(f"train-{_slug(name)}", train_args, os.path.join(final, "config.json")):
            if not precompute_only:
                self.echo(f"[run] {name}: {final} complete, skipped")
            return
        args = train_args + (["--precompute-only"] if precompute_only else [])
        log_name = f"{'precompute' if precompute_only else 'train'}-{_slug(name)}"
        if precompute_only and self.is_complete(log_name, args, self.recipe.training_dir(name)):
            return
        self.fastdadpo(args, distributed=True, log_name=log_name)

    def stage_dsft(self) -> None:
        self._train(*self.recipe.trainings()[0])

    def stage_precompute(self) -> None:
        for training in self.recipe.trainings()[1:]:
            self._train(*training, precompute_only=True)

    def stage_train(self) -> None:
        for training in self.recipe.trainings()[1:]:
            self._train(*training)

    def stage_eval(self) -> None:
        r = self.recipe
        if not r.eval_prompts:
            self.echo("[run] eval: no eval_prompts in the recipe, skipped")
            return
        results_path = r.path("eval.json")
        models = {"student (before)": r.start_student, "after dSFT": r.dsft_final}
        models.update({f"after {name}": os.path.join(r.training_dir(name), "final") for name in r.students})
        models_file = r.path("eval-models.json")
        args = ["eval", "--teacher", r.teacher, "--students", models_file, "--data", r.eval_prompts,
                "--out", results_path] + _flags(r.eval)
        if self.is_complete("eval", args, results_path) and _newer_than_models(results_path, models.values()):
            try:
                with open(results_path, encoding="utf-8") as handle:
                    evaluated = set(json.load(handle).get("models", {}))
            except (OSError, ValueError, AttributeError):
                evaluated = set()
            if evaluated >= set(models):
                self.echo(f"[run] eval: {results_path} complete, skipped")
                self._plots()
                return
        write_json_atomic(models_file, models)
        self.fastdadpo(args, distributed=False, log_name="eval")
        self._plots()

    def _plots(self) -> None:
        from .plots import plot_recipe

        curves, comparison = plot_recipe(self.recipe)
        self.echo(f"[run] plots: {curves}, {comparison}")


def _newer_than_models(path: str, model_dirs) -> bool:
    """Results written after every model they evaluate was (re)written: not stale."""
    written = os.path.getmtime(path)
    configs = [os.path.join(d, "config.json") for d in model_dirs]
    return all(os.path.getmtime(c) <= written for c in configs if os.path.exists(c))


def _flags(options: Dict[str, Any]) -> List[str]:
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif value is not None:
            args += [flag, str(value)]
    return args


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="the recipe YAML (see configs/recipes/)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, in this order: {', '.join(STAGES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key by its dot path (value read as YAML)")


def run(args) -> int:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; stages are {', '.join(STAGES)}")
    Runner(load_recipe(args.recipe, args.set), stages).run()
    return 0
