"""``fastdadpo demo``: the whole daDPO experiment in miniature, on a CPU, with nothing downloaded.

1. A conversational task with verifiable answers (``synthetic``): five task families with one right
   answer (repeat, reverse, count a word list, name its first or last word) and three with several
   (name any of its words, one starting with a given letter, any two in their order), a tokenizer
   trained on it, and disjoint prompt sets: the teacher's training data, and per seed the
   distillation prompts and held-out evaluation prompts (none of them a prompt the teacher saw).
2. A teacher: a small Qwen2 model trained from scratch on the task with ``fastdadpo train`` (sft), a
   multi-answer row's response drawn uniformly from its right answers, so the teacher spreads its
   probability over them: the situation the daDPO paper argues a teacher's sample alone mislabels.
   Learning to copy takes a small model thousands of steps (its induction heads form late), more
   than the demo's time on two cores, so the trained teacher ships with the package
   (``demo_data/teacher``, 1M parameters) and ``fastdadpo demo --train-teacher`` (or
   ``scripts/train_demo_teacher.sh``) regenerates it; ``--quick`` trains its tiny one on the spot.
3. Per seed, the paper's pipeline as a recipe (``fastdadpo run``): prune the teacher by 20% to get
   the student, sample teacher (chosen) and student (rejected) responses, distilled SFT, then dDPO,
   daDPO and token-level daDPO from the dSFT student (and, in the first seed, daDPO at the
   ``--beta2-sweep`` values), and a comparison on the held-out prompts: accuracy, preference rate against the
   teacher (exact-match judge), divergence to the teacher, overall and per task family.
4. The report (``demo_report``): mean ± std over the seeds, per kind and family of task, McNemar's
   exact test of each preference objective against dSFT and dDPO on the same prompts, the β2 sweep.

Every stage is skipped when its output exists, so a second run only prints the results; ``--fresh``
starts over. ``--quick`` shrinks everything (the CI runs it). Every stage runs with ``--threads``
CPU threads, so the same seed and thread count give the same table bit for bit on one machine.
"""
from __future__ import annotations

import json
import os
import platform
import time


from fastdadpo.base.errors import UserError
from fastdadpo.base.files import write_text_atomic
from fastdadpo.commands.recipe import Runner, load_recipe
from fastdadpo.demo import study
from fastdadpo.demo.report import format_report, load_seed_run, summarize
from fastdadpo.demo.world import (DADPO_BETA1, DADPO_BETA2, DEFAULT_THREADS, SHIPPED_TEACHER, Sizes, start_run,
                                  teacher_for, write_seed_recipe, write_task_data, write_teacher_data)


# One seed by default: a seed takes ~6 min on 2 cores (dSFT 100 s, each preference training 60 s, each
# process start ~10 s), so three and the sweep (~21 min) would not fit the main job's 15 minutes. The
# README's table comes from --seeds 3 --beta2-sweep 0.005,0.05,0.2 (README_RUN).
FULL = Sizes(teacher_examples=12000, prompts=1536, heldout=200, teacher_hidden=128, teacher_layers=4,
             teacher_steps=12000, dsft_steps=300, preference_steps=100, micro_batch=32, seeds=1, beta2_sweep=())
README_RUN = "--seeds 3 --beta2-sweep 0.005,0.05,0.2"
QUICK = Sizes(teacher_examples=256, prompts=48, heldout=24, teacher_hidden=32, teacher_layers=2, teacher_steps=8,
              dsft_steps=3, preference_steps=2, micro_batch=8, seeds=1, beta2_sweep=())


def add_arguments(parser) -> None:
    parser.add_argument("--out", help="where everything is written (default: runs/demo, runs/demo-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline runs (CI)")
    parser.add_argument("--study", action="store_true",
                        help=f"the method study instead (default --out runs/study, {study.STUDY.seeds} seeds, "
                             f"~{study.MINUTES} min on 2 cores): a preference stage that visibly trains, daDPO at "
                             f"β2 spanning β2·|δ_te| {study.SPANS[0]:g} to {study.SPANS[-1]:g} against dDPO, "
                             f"held-out prompts sized for a paired test's power, per pair type")
    parser.add_argument("--fresh", action="store_true", help="delete --out first and start over")
    parser.add_argument("--seed", type=int, default=0, help="the first distillation seed (prompts, pruning, samples, "
                                                              "training; the teacher is the same for every seed)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"distillation runs, seeds --seed, --seed+1, ... (default {FULL.seeds}, ~6 min each on 2 "
                             f"cores); with several the tables give mean ± std over them")
    parser.add_argument("--beta2-sweep", default=None, metavar="LIST",
                        help="comma-separated extra daDPO β2 values trained in the first seed ('none', the default: "
                             f"no sweep; the README's table: {README_RUN})")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads of every stage (default $OMP_NUM_THREADS, else {DEFAULT_THREADS}): the "
                             "same count gives the same table bit for bit on one machine")
    parser.add_argument("--train-teacher", action="store_true",
                        help=f"train the teacher from scratch ({FULL.teacher_steps} steps, 53 min on 2 cores) instead "
                             f"of using the one shipped in {SHIPPED_TEACHER}")


def _settings(args, sizes: Sizes) -> dict:
    sweep = sizes.beta2_sweep if args.beta2_sweep is None else _beta2_values(args.beta2_sweep)
    return {**seeds_and_threads(args, sizes), "beta2_sweep": list(sweep)}


def seeds_and_threads(args, sizes: Sizes) -> dict:
    seeds = sizes.seeds if args.seeds is None else args.seeds
    if seeds < 1:
        raise UserError(f"--seeds: {seeds} must be at least 1")
    threads = args.threads if args.threads is not None else int(os.environ.get("OMP_NUM_THREADS") or DEFAULT_THREADS)
    if threads < 1:
        raise UserError(f"--threads: {threads} must be at least 1")
    return {"seeds": list(range(args.seed, args.seed + seeds)), "threads": threads}


def _beta2_values(text: str) -> tuple:
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--beta2-sweep: {text!r} is not a comma-separated list of numbers (or 'none')") from None
    if any(not value > 0 or value != value or value == float("inf") for value in values):
        raise UserError(f"--beta2-sweep: every β2 must be a positive finite number, got {text!r} (β2 = 0 is dDPO, "
                        f"which every seed trains)")
    return values


def run(args) -> int:
    if args.study:
        if args.beta2_sweep is not None:
            raise UserError("--beta2-sweep: the study chooses its β2 values from the measured δ_te (see --help)")
        return study.run(args, seeds_and_threads(args, study.QUICK_STUDY if args.quick else study.STUDY))
    sizes = QUICK if args.quick else FULL
    out = os.path.abspath(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    settings = _settings(args, sizes)
    start_run(out, fresh=args.fresh, mode="quick" if args.quick else "full", threads=settings["threads"],
              trained_teacher=args.quick or args.train_teacher)
    started = time.time()
    teacher_rows = write_teacher_data(out, sizes)
    teacher = None
    for seed in settings["seeds"]:
        seed_out = os.path.join(out, f"seed-{seed}")
        files = write_task_data(seed_out, sizes, seed, teacher_rows)
        sweep = settings["beta2_sweep"] if seed == settings["seeds"][0] else []
        recipe = load_recipe(write_recipe(seed_out, sizes, seed, files, os.path.join(out, "teacher", "final"), sweep))
        # No separate precompute stage: each training computes (and caches) its log-probs first anyway,
        # and a process start costs ~10 s here.
        runner = Runner(recipe, stages=["prune", "generate", "dsft", "train", "eval"])
        if teacher is None:
            teacher = teacher_for(runner, out, sizes, train=args.quick or args.train_teacher)
        runner.echo(f"[demo] seed {seed} ({settings['seeds'].index(seed) + 1} of {len(settings['seeds'])}): {seed_out}")
        runner.run()
    report(out, settings, args, time.time() - started)
    return 0


# --- 3. the recipe ------------------------------------------------------------------------------------------

def sweep_name(beta2: float) -> str:
    return f"daDPO-b2-{beta2:g}"


def write_recipe(out: str, sizes: Sizes, seed: int, files: dict, teacher: str, beta2_sweep=()) -> str:
    preference = {"train": {"lr": 1e-4, "max_steps": sizes.preference_steps, "warmup_ratio": 0.1}}

    def dadpo(beta2: float) -> dict:
        return {"objective": {"name": "dadpo", "beta1": DADPO_BETA1, "beta2": beta2}, **preference}

    return write_seed_recipe(out, sizes, seed, files, teacher, {
        "dDPO": {"objective": {"name": "dpo", "beta": DADPO_BETA1}, **preference},
        # The teacher's margin log π_te(y^t) − log π_te(y^s) runs to tens of nats when the student's
        # response is wrong, so β2 must be small for the teacher term not to swamp the others.
        "daDPO": dadpo(DADPO_BETA2),
        "daDPO-token": {"objective": {"name": "dadpo_token", "beta": DADPO_BETA1, "alpha": 0.5}, **preference},
        **{sweep_name(beta2): dadpo(beta2) for beta2 in beta2_sweep if beta2 != DADPO_BETA2},
    })


# --- 4. the report ------------------------------------------------------------------------------------------

def report(out: str, settings: dict, args, seconds: float) -> None:
    runs = [load_seed_run(os.path.join(out, f"seed-{seed}"), seed) for seed in settings["seeds"]]
    summary = summarize(runs, beta2=DADPO_BETA2, sweep={sweep_name(b): b for b in settings["beta2_sweep"]})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    first = os.path.join(out, f"seed-{settings['seeds'][0]}")
    text = (f"fastdadpo demo ({'quick' if args.quick else 'full'}), seeds {_seed_range(settings['seeds'])}, "
            f"{settings['threads']} threads, {machine}, {seconds / 60:.1f} min this run\n\n{format_report(summary)}\n\n"
            f"plots (seed {settings['seeds'][0]}): {os.path.join(first, 'curves.png')}, "
            f"{os.path.join(first, 'comparison.png')}\n")
    write_text_atomic(os.path.join(out, "results.txt"), text)
    write_text_atomic(os.path.join(out, "results.json"), json.dumps(summary, indent=1))
    print("\n" + text)


def _seed_range(seeds) -> str:
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
