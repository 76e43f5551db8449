"""``fastdadpo run RECIPE.yaml``: the whole daDPO experiment, stage by stage.

    prune → generate → dsft → precompute → train → eval

Each stage writes under the recipe's ``output_dir`` and is skipped when its output is complete, so
an interrupted run continues (trainings resume from their latest checkpoint). Complete: the stage
exited 0, the runner wrote its marker ``stages/NAME.json`` (its command, the hashes of its config
and of the configs up its chain) and the output is there; a directory proves nothing (a killed stage
leaves partial ones). A stage whose command or config changed runs again. Each stage runs as its own
``fastdadpo`` process, under ``launcher`` (e.g. ``torchrun --nproc_per_node=8``) for the stages
that shard models over ranks. The generate stage is skipped when no training reads the recipe's
pairs, and the precompute stage runs only for objectives that cache sequence log-probs.

A recipe (see configs/recipes/):

    output_dir: runs/vicuna-dadpo
    launcher: ""                     # prefix for generate/train, e.g. "torchrun --nproc_per_node=8"
    teacher: lmsys/vicuna-7b-v1.5
    student: lmsys/vicuna-7b-v1.5    # the starting student (pruned first when `prune` is given)
    prompts: data/prompts.jsonl      # training prompts ("prompt", optional "answer")
    eval_prompts: data/heldout.jsonl # held-out prompts for the final comparison
    prune: {ratio: 0.2}              # optional; drop_layers, calibration_samples, seed
    generate: {max_new_tokens: 512, temperature: 0.7, top_p: 0.95, seed: 0}  # generate's flags (keep_chosen: ADPA's)
    train_common: {...}              # a training config (model/data/train/deepspeed sections) under every training
    dsft: {train: {lr: 2.0e-5}}      # overrides for the distilled SFT; false: none
    students:                        # preference trainings from the dSFT student, by display name
      dDPO: {objective: {name: dpo}}
      daDPO: {objective: {name: dadpo}}
    eval: {judge: exact, max_new_tokens: 128}

Chained trainings (ADPA+, see configs/recipes/adpa-plus.yaml). ``dsft: false`` trains no distilled
SFT: the students then start from the starting student. A ``students`` entry may also hold two keys
of the recipe's own (the rest of the entry is training overrides):

    init: DCKD          # start from that training's final model ("dSFT" or an EARLIER students entry;
                        # default: the dSFT student, or the starting student under dsft: false)
    regenerate: true    # train on pairs generated again from the model it starts from, with the
                        # recipe's generate settings (e.g. ADPA's student-greedy rejected responses)

An entry starts only from one listed before it (no cycles; the order written). A regenerated pair
file is named by a hash of the generate settings and the configs up the chain, so a changed upstream
training gets new pairs and its downstream trainings run again. A training counts as its config
(generate refuses to continue a pair file whose student's weights changed since). The train stage
runs the chain entry by entry, regenerating then training; a chained entry precomputes in its train
stage, once its inputs exist.
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

from fastdadpo.base.errors import ConfigError, UserError
from fastdadpo.base.files import move_aside, write_json_atomic
from fastdadpo.base.yaml_files import apply_override, merge_mappings, read_yaml_mapping
from fastdadpo.commands.recipe_generate import as_flags, check_generate_section
from fastdadpo.commands.config import config_from_mapping
from fastdadpo.commands.plots import plot_recipe

STAGES = ("prune", "generate", "dsft", "precompute", "train", "eval")
RECIPE_KEYS = {"output_dir", "launcher", "teacher", "student", "prompts", "eval_prompts", "prune", "generate",
               "train_common", "dsft", "students", "eval", "plots"}
# A students entry's own keys (how the entry chains), split off from its training overrides.
STUDENT_KEYS = ("init", "regenerate")
DSFT = "dSFT"


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
    dsft: Any = field(default_factory=dict)  # overrides, or False: no distilled SFT
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

    def final(self, name: str) -> str:
        return os.path.join(self.training_dir(name), "final")

    @property
    def dsft_final(self) -> str:
        return self.final(DSFT)

    @property
    def has_dsft(self) -> bool:
        return self.dsft is not False

    # --- what each training is ---
    def trainings(self) -> List[tuple]:
        """(name, training overrides, starting student) of every training in the order they run, dSFT first."""
        dsft = [(DSFT, merge_mappings({"objective": {"name": "sft"}}, self.dsft), self.start_student)] \
            if self.has_dsft else []
        return dsft + [(name, _training_overrides(entry), self.start_of(name)) for name, entry in self.students.items()]

    def init_of(self, name: str) -> Optional[str]:
        """The training a students entry starts from; None: the recipe's starting student."""
        if name == DSFT and self.has_dsft:
            return None
        return self.students.get(name, {}).get("init", DSFT if self.has_dsft else None)

    def start_of(self, name: str) -> str:
        init = self.init_of(name)
        return self.start_student if init is None else self.final(init)

    def regenerates(self, name: str) -> bool:
        return bool(self.students.get(name, {}).get("regenerate", False))

    def is_chained(self, name: str) -> bool:
        """Its starting model or its pairs come from a students entry, so it waits for that entry's training."""
        return self.regenerates(name) or self.init_of(name) in self.students

    def pairs_for(self, name: str) -> str:
        """The training's data.train: the recipe's pairs, or its own regenerated ones."""
        if not self.regenerates(name):
            return self.pairs
        depends = {"generate": self.generate, "prompts": self.prompts, "student": self.upstream(name)}
        return self.path(f"pairs-{_slug(name)}-{_digest(depends)[:12]}.jsonl")

    def upstream(self, name: str) -> dict:
        """What the model a training starts from depends on: the configs of every training up the chain."""
        init = self.init_of(name)
        if init is None:
            return {"student": self.start_student}
        return {"config": self.training_config(*self._training_of(init)), "upstream": self.upstream(init)}

    def uses_pairs(self) -> bool:
        """Some training reads the recipe's pairs (rather than a data.train of its own or regenerated pairs)."""
        return any(self.training_config(*training)["data"]["train"] == self.pairs for training in self.trainings())

    def _training_of(self, name: str) -> tuple:
        return next(training for training in self.trainings() if training[0] == name)

    def training_config(self, name: str, overrides: dict, student: str) -> dict:
        """The training config (a mapping, as in a YAML file) of one training of the recipe."""
        config = merge_mappings(self.train_common, {"model": {"student": student, "teacher": self.teacher},
                                                    "data": {"train": self.pairs_for(name)},
                                                    "train": {"output_dir": self.training_dir(name), "resume": True}})
        return merge_mappings(config, overrides)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _training_overrides(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key not in STUDENT_KEYS}


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
        if not isinstance(getattr(recipe, key), dict) and not (key == "dsft" and recipe.dsft is False):
            allowed = "a mapping, or false (no distilled SFT)" if key == "dsft" else "a mapping"
            raise ConfigError(f"{path}: {key} must be {allowed}, got {getattr(recipe, key)!r}")
    check_generate_section(recipe.generate, f"{path}: generate")
    _check_chains(recipe)
    if not isinstance(recipe.launcher, str):
        raise ConfigError(f"{path}: launcher must be a string (a command prefix), got {recipe.launcher!r}")
    try:
        shlex.split(recipe.launcher)
    except ValueError as exc:
        raise ConfigError(f"{path}: launcher {recipe.launcher!r} is not a command line ({exc})") from None
    # Every training's config is checked now, not when its stage comes hours later.
    for name, overrides, student in recipe.trainings():
        config_from_mapping(recipe.training_config(name, overrides, student), f"{path} (training {name})")
    return recipe


def _check_chains(recipe: Recipe) -> None:
    """init names dSFT (when trained) or an entry listed before; regenerate is a boolean."""
    where = f"{recipe.source}: students"
    earlier = [DSFT] if recipe.has_dsft else []
    slugs: Dict[str, str] = {_slug(name): name for name in earlier}
    for name in recipe.students:
        if name == DSFT and recipe.has_dsft:
            raise ConfigError(f"{where}: {DSFT!r} is the distilled SFT's name; give this entry another one")
        if slugs.setdefault(_slug(name), name) != name:
            raise ConfigError(f"{where}: {name!r} and {slugs[_slug(name)]!r} would share the output directory "
                              f"{recipe.training_dir(name)}; rename one")
    for name, entry in recipe.students.items():
        init = entry.get("init")
        if init is not None:
            if not isinstance(init, str):
                raise ConfigError(f"{where}.{name}.init must name a training, got {init!r}")
            if init == name:
                raise ConfigError(f"{where}.{name}.init: a training cannot start from itself")
            if init not in earlier:
                problem = (f"{init!r} is listed after {name!r}; list a training after the one it starts from (so a "
                           f"chain runs in the order written and cannot loop)" if init in recipe.students else
                           f"there is no training {init!r}" + ("" if recipe.has_dsft or init != DSFT else
                                                              " (dsft: false trains none)"))
                raise ConfigError(f"{where}.{name}.init: {problem}; it can start from "
                                  f"{', '.join(earlier) or 'no training yet (leave init out: the starting student)'}")
        regenerate = entry.get("regenerate", False)
        if not isinstance(regenerate, bool):
            raise ConfigError(f"{where}.{name}.regenerate must be true or false, got {regenerate!r}")
        if regenerate and recipe.init_of(name) is None:
            raise ConfigError(f"{where}.{name}.regenerate: this entry starts from the starting student, whose pairs "
                              f"are the recipe's own ({recipe.pairs}); give init, or drop regenerate")
        earlier.append(name)


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

    def _identity(self, args: List[str], depends: Optional[dict] = None) -> dict:
        """What a stage's result depends on: its command, the contents of a config file it reads, and
        ``depends`` (for a training that starts from another, the configs up the chain)."""
        identity = {"command": list(args), **(depends or {})}
        if args and args[0] == "train":
            with open(args[1], "rb") as handle:
                identity["config_sha256"] = hashlib.sha256(handle.read()).hexdigest()
        return identity

    def is_complete(self, log_name: str, args: List[str], output: str, depends: Optional[dict] = None) -> bool:
        """The stage finished with these arguments (its marker says so) and its output is there."""
        try:
            with open(self._marker_path(log_name), encoding="utf-8") as handle:
                marker = json.load(handle)
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("identity") == self._identity(args, depends) \
            and os.path.exists(output)

    def _mark_complete(self, log_name: str, args: List[str], depends: Optional[dict] = None) -> None:
        path = self._marker_path(log_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"stage": log_name, "identity": self._identity(args, depends), "finished": time.time()})

    def fastdadpo(self, args: List[str], distributed: bool, log_name: str, depends: Optional[dict] = None) -> None:
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
        self._mark_complete(log_name, args, depends)
        self.echo(f"[run] {log_name}: done in {time.time() - started:.0f}s")

    def stage_prune(self) -> None:
        r = self.recipe
        if not r.prune:
            return
        options = dict(r.prune)
        args = ["prune", "--model", r.student, "--out", r.pruned_dir, "--ratio", str(options.pop("ratio", 0.2)),
                "--calibration", options.pop("calibration", r.prompts)]
        args += as_flags(options)
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
        if not self.recipe.uses_pairs():
            # E.g. ADPA+ as released: DCKD on the dataset's own pairs, ADPA on regenerated ones.
            self.echo(f"[run] generate: no training reads {self.recipe.pairs} (each names its own data), skipped")
            return
        self._generate(self.recipe.start_student, self.recipe.pairs, "generate")

    def _generate(self, student: str, out: str, log_name: str) -> None:
        r = self.recipe
        # keep_chosen takes the chosen responses from the prompts: no teacher to pass.
        teacher = [] if r.generate.get("keep_chosen") else ["--teacher", r.teacher]
        args = ["generate", *teacher, "--student", student, "--prompts", r.prompts, "--out", out] + as_flags(r.generate)
        if self.is_complete(log_name, args, out):
            self.echo(f"[run] {log_name}: {out} complete, skipped")
            return
        # A served teacher samples in one process; a server, not torchrun, spreads its work.
        self.fastdadpo(args, distributed=not r.generate.get("teacher_url"), log_name=log_name)

    def _training_config(self, name: str, overrides: dict, student: str) -> str:
        path = self.recipe.path("configs", f"{_slug(name)}.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.recipe.training_config(name, overrides, student), handle, sort_keys=False)
        return path

    def _train(self, name: str, overrides: dict, student: str, precompute_only: bool = False) -> None:
        final = self.recipe.final(name)
        config = self._training_config(name, overrides, student)
        train_args = ["train", config]
        # The model it starts from is named by path: a retrained upstream with another config must
        # not leave this training marked complete.
        depends = {"upstream_sha256": _digest(self.recipe.upstream(name))} if self.recipe.init_of(name) else None
        if self.is_complete(f"train-{_slug(name)}", train_args, os.path.join(final, "config.json"), depends):
            if not precompute_only:
                self.echo(f"[run] {name}: {final} complete, skipped")
            return
        finished = self._marker_path(f"train-{_slug(name)}")
        if os.path.exists(finished) and os.path.isdir(self.recipe.training_dir(name)):
            # Finished with another config or from another upstream model: its checkpoints are another
            # run's (train refuses to resume them), so it trains again from the start, the old run kept.
            aside = move_aside(self.recipe.training_dir(name), "replaced")
            os.remove(finished)
            self.echo(f"[run] {name}: its config or the model it starts from changed since it finished; training "
                      f"again (the old run is in {aside})")
        args = train_args + (["--precompute-only"] if precompute_only else [])
        log_name = f"{'precompute' if precompute_only else 'train'}-{_slug(name)}"
        if precompute_only and self.is_complete(log_name, args, self.recipe.training_dir(name), depends):
            return
        self.fastdadpo(args, distributed=True, log_name=log_name, depends=depends)

    def _students(self) -> List[tuple]:
        return [training for training in self.recipe.trainings() if training[0] in self.recipe.students]

    def stage_dsft(self) -> None:
        if not self.recipe.has_dsft:
            self.echo("[run] dsft: dsft: false in the recipe, skipped")
            return
        self._train(*self.recipe.trainings()[0])

    def stage_precompute(self) -> None:
        for training in self._students():
            if self.recipe.is_chained(training[0]):
                # Its inputs come from a training not run yet: its train stage precomputes.
                continue
            if self._caches_log_probs(*training):
                self._train(*training, precompute_only=True)

    def _caches_log_probs(self, name: str, overrides: dict, student: str) -> bool:
        """The objective trains on cached sequence log-probs (dDPO, daDPO); DCKD, ADPA, KD cache none."""
        objective = config_from_mapping(self.recipe.training_config(name, overrides, student),
                                        f"{self.recipe.source} (training {name})").objective
        return bool(objective.needs().cached)

    def stage_train(self) -> None:
        for name, overrides, student in self._students():
            if self.recipe.regenerates(name):
                self._generate(student, self.recipe.pairs_for(name), f"generate-{_slug(name)}")
            self._train(name, overrides, student)

    def stage_eval(self) -> None:
        r = self.recipe
        if not r.eval_prompts:
            self.echo("[run] eval: no eval_prompts in the recipe, skipped")
            return
        results_path = r.path("eval.json")
        models = {"student (before)": r.start_student}
        models.update({f"after {name}": r.final(name) for name, _, _ in r.trainings()})
        models_file = r.path("eval-models.json")
        args = ["eval", "--teacher", r.teacher, "--students", models_file, "--data", r.eval_prompts,
                "--out", results_path] + as_flags(r.eval)
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
        curves, comparison = plot_recipe(self.recipe)
        self.echo(f"[run] plots: {curves}, {comparison}")


def _newer_than_models(path: str, model_dirs) -> bool:
    """Results written after every model they evaluate was (re)written: not stale."""
    written = os.path.getmtime(path)
    configs = [os.path.join(d, "config.json") for d in model_dirs]
    return all(os.path.getmtime(c) <= written for c in configs if os.path.exists(c))


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
