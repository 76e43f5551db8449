"""``fastdadpo demo --study``: the method study, a run with the power to test daDPO against dDPO.

The default demo's preference stage barely moves the student (100 steps at lr 1e-4 change ~15 of 600
answers; every paired test is n.s.), and its β2 = 0.02 shifts a pair's margin by −β2·δ_te, small
next to the DPO term unless δ_te is tens of nats. The study keeps the demo's world (task, shipped
teacher, pruned student, one teacher and one student sample per prompt, dSFT) and changes three
things, each chosen before any daDPO result was seen:

1. A preference stage that visibly trains, chosen on dDPO alone by the issue's criteria (pilot on
   seed 0: lr 5e-4 × 240 steps of 32 pairs gives reward accuracy 0.99 on the distinct training pairs,
   a mean margin β·h growing from 0 to 1.8, and 68 of 200 held-out answers changed against dSFT;
   lr 1e-4 × 100 steps, the demo's, changed 12; 2e-3 collapsed the chosen log-probs). Every
   objective then trains with the same steps and rate.
2. β2 swept from the measured δ_te: after the first seed's dSFT, the median |δ_te| over its distinct
   training pairs m sets β2 = s/m for s in ``SPANS`` (β2·|δ_te| from ~0.1 to ~3 at the median), the
   same values in every seed; β1 stays 0.1.
3. Held-out prompts sized for McNemar's test: the pilot's daDPO (β2 0.17) and dDPO disagreed on 5.5%
   of 200 prompts; at 10% discordance (a margin over it) a 3-point difference needs 920 pairs for
   power 0.8 at α 0.05 (``study_report.prompts_needed``: 920), so 600 per seed × 3 seeds = 1,800 pairs; the
   report recomputes the power from the discordance each comparison actually shows.

Per seed it also measures (``study_measures``) δ_te per pair type, every model's implicit reward on the
training pairs per pair type, and the coverage of the several right answers under sampling. Every
stage is skipped when its output exists, as in the demo.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

from fastdadpo.base.errors import UserError
from fastdadpo.base.files import write_json_atomic, write_text_atomic
from fastdadpo.commands.recipe import Recipe, Runner, load_recipe
from fastdadpo.demo.study_measures import TrainingPairs, answer_coverage, measure_pairs, teacher_margins
from fastdadpo.demo.study_report import format_study, summarize_study
from fastdadpo.demo.world import (DADPO_BETA1, MAX_LENGTH, MAX_NEW_TOKENS, MAX_PROMPT_LENGTH, Sizes, start_run,
                                  teacher_for, write_seed_recipe, write_task_data, write_teacher_data)
from fastdadpo.models.loading import load_tokenizer

STUDY = Sizes(teacher_examples=12000, prompts=1536, heldout=600, teacher_hidden=128, teacher_layers=4,
              teacher_steps=12000, dsft_steps=300, preference_steps=240, micro_batch=32, seeds=3, beta2_sweep=())
QUICK_STUDY = Sizes(teacher_examples=256, prompts=48, heldout=24, teacher_hidden=32, teacher_layers=2,
                    teacher_steps=8, dsft_steps=3, preference_steps=2, micro_batch=8, seeds=1, beta2_sweep=())
PREFERENCE_LR = 5e-4
SPANS = (0.1, 0.3, 1.0, 3.0)  # β2·median|δ_te| of the swept daDPO runs
COVERAGE_SAMPLES = 8  # samples per several-answer held-out prompt, at temperature 1
MINUTES = 40  # on 2 cores, 3 seeds
STATE = "study.json"  # the sweep, fixed by the first seed and kept for every later one


def sweep_name(beta2: float) -> str:
    return f"daDPO-b2-{beta2:g}"


def students(sweep) -> dict:
    """dDPO and daDPO at each β2 of ``sweep`` (none before it is measured), one preference stage."""
    preference = {"train": {"lr": PREFERENCE_LR, "warmup_ratio": 0.1}}
    chosen = {"dDPO": {"objective": {"name": "dpo", "beta": DADPO_BETA1}, **preference}}
    for beta2 in sweep:
        chosen[sweep_name(beta2)] = {"objective": {"name": "dadpo", "beta1": DADPO_BETA1, "beta2": beta2},
                                     **preference}
    return chosen


def _recipe(seed_out: str, sizes: Sizes, seed: int, files: dict, teacher: str, sweep) -> Recipe:
    chosen = students(sweep or ())
    for entry in chosen.values():
        entry["train"]["max_steps"] = sizes.preference_steps
    return load_recipe(write_seed_recipe(seed_out, sizes, seed, files, teacher, chosen))


def _round2(value: float) -> float:
    return float(f"{value:.2g}")


def choose_sweep(out: str, recipe: Recipe, teacher: str, seed: int) -> dict:
    """β2 = s / median|δ_te| for s in ``SPANS``, from this seed's distinct training pairs; written once."""
    pairs = TrainingPairs(recipe.pairs, load_tokenizer(recipe.dsft_final, "dSFT"), max_length=MAX_LENGTH,
                          max_prompt_length=MAX_PROMPT_LENGTH)
    delta = teacher_margins(pairs, pairs.sequence_logps(teacher), pairs.sequence_logps(recipe.dsft_final))
    distinct = [abs(d) for d, kind in zip(delta, pairs.types) if kind != "same answer"]
    if not distinct or statistics.median(distinct) == 0:
        raise UserError(f"seed {seed}: no training pair has two different responses (or δ_te is 0 on all), so "
                        f"β2 cannot be scaled to δ_te; sample more prompts")
    median = statistics.median(distinct)
    state = {"beta2": [_round2(span / median) for span in SPANS], "spans": list(SPANS), "median_abs_delta_te": median,
             "measured_on": f"seed {seed}: {len(distinct)} distinct training pairs, teacher vs dSFT"}
    write_json_atomic(os.path.join(out, STATE), state)
    return state


def measure_seed(seed_out: str, recipe: Recipe, teacher: str, sweep, seed: int) -> None:
    """The seed's training-pair measures and answer coverage (``study-measures.json``), once."""
    path = os.path.join(seed_out, "study-measures.json")
    eval_path = recipe.path("eval.json")
    if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(eval_path):
        return
    trained = {f"after {name}": recipe.final(name) for name in students(sweep)}
    pairs = TrainingPairs(recipe.pairs, load_tokenizer(recipe.dsft_final, "dSFT"), max_length=MAX_LENGTH,
                          max_prompt_length=MAX_PROMPT_LENGTH)
    measures = measure_pairs(pairs, trained, recipe.dsft_final, teacher, DADPO_BETA1)
    coverage_of = {"teacher": teacher, "after dSFT": recipe.dsft_final, **trained}
    measures["coverage"] = {name: answer_coverage(path_, recipe.eval_prompts, samples=COVERAGE_SAMPLES,
                                                  max_new_tokens=MAX_NEW_TOKENS, seed=seed)
                            for name, path_ in coverage_of.items()}
    write_json_atomic(path, measures)


def run(args, settings: dict) -> int:
    sizes = QUICK_STUDY if args.quick else STUDY
    out = os.path.abspath(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    start_run(out, fresh=args.fresh, mode="study-quick" if args.quick else "study", threads=settings["threads"],
              trained_teacher=args.quick or args.train_teacher)
    started = time.time()
    teacher_rows = write_teacher_data(out, sizes)
    teacher_dir = os.path.join(out, "teacher", "final")
    state_path = os.path.join(out, STATE)
    state = None
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    teacher = None
    for number, seed in enumerate(settings["seeds"], 1):
        seed_out = os.path.join(out, f"seed-{seed}")
        files = write_task_data(seed_out, sizes, seed, teacher_rows)
        sweep = state["beta2"] if state else ()
        runner = Runner(_recipe(seed_out, sizes, seed, files, teacher_dir, sweep), ["prune", "generate", "dsft"])
        if teacher is None:
            teacher = teacher_for(runner, out, sizes, train=args.quick or args.train_teacher)
        runner.echo(f"[study] seed {seed} ({number} of {len(settings['seeds'])}): {seed_out}")
        runner.run()
        if state is None:
            state = choose_sweep(out, runner.recipe, teacher, seed)
            runner.echo(f"[study] median |δ_te| {state['median_abs_delta_te']:.2f} nats ({state['measured_on']}): "
                        f"β2 {', '.join(f'{b:g}' for b in state['beta2'])}")
        recipe = _recipe(seed_out, sizes, seed, files, teacher_dir, state["beta2"])
        Runner(recipe, ["train", "eval"]).run()
        measure_seed(seed_out, recipe, teacher, state["beta2"], seed)
    report(out, settings, state, args, time.time() - started)
    return 0


def report(out: str, settings: dict, state: dict, args, seconds: float) -> None:
    summary = summarize_study(out, settings["seeds"], state, {f"after {sweep_name(b)}": b for b in state["beta2"]})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = "fastdadpo demo --study" + (" --quick" if args.quick else "") + (
        f" --seeds {len(settings['seeds'])}" if len(settings["seeds"]) != (QUICK_STUDY if args.quick else STUDY).seeds
        else "")
    text = (f"{command}: seeds {settings['seeds'][0]}-{settings['seeds'][-1]}, {settings['threads']} threads, "
            f"{machine}, {seconds / 60:.1f} min this run\n\n{format_study(summary)}\n")
    write_text_atomic(os.path.join(out, "results.txt"), text)
    write_text_atomic(os.path.join(out, "results.json"), json.dumps(summary, indent=1))
    print("\n" + text)
