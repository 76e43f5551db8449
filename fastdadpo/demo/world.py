"""The demo's world, shared by ``fastdadpo demo`` and its method study (``--study``): the task's
prompt sets, the teacher (shipped, or trained on the spot), the sizes that scale them, and the
claim a run directory holds on its settings."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import yaml

from fastdadpo.base.errors import UserError
from fastdadpo.base.files import write_text_atomic
from fastdadpo.commands.recipe import Runner
from fastdadpo.demo.synthetic import (ALL_TASKS, MULTI_ANSWER_TASKS, build_tokenizer, make_examples, save_model_dir,
                                      task_corpus, tiny_causal_lm)


@dataclass(frozen=True)
class Sizes:
    teacher_examples: int
    prompts: int
    heldout: int
    teacher_hidden: int
    teacher_layers: int
    teacher_steps: int
    dsft_steps: int
    preference_steps: int
    micro_batch: int
    seeds: int                 # distillation runs, each with its own prompts, pruning, samples and training
    beta2_sweep: tuple         # extra daDPO β2 values, trained in the first seed only


MAX_LENGTH, MAX_PROMPT_LENGTH, MAX_NEW_TOKENS = 64, 40, 24
DADPO_BETA1, DADPO_BETA2 = 0.1, 0.02
SHIPPED_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data", "teacher")
# The teacher is one fixed model whatever the distillation seed: its training rows come from this
# seed, and every seed's prompts are drawn from another stream with the teacher's prompts removed.
TEACHER_SEED = 0
PROMPT_STREAM = 1_000_003
DEFAULT_THREADS = 2


def claim_directory(out: str, settings: dict) -> None:
    """Stages skip what exists, so a directory must hold one demo's settings: reusing a quick run's
    teacher, or stages run with another thread count, under a full run's title would print a wrong
    table. (Seeds are directories of their own, so another --seed or --seeds adds to a run.)"""
    stamp = os.path.join(out, "demo.json")
    if os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous != settings:
            raise UserError(f"{out} holds a demo run with {previous}, and this one asks for {settings}; "
                            f"add --fresh to start it over, or give another --out")
        return
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"{out} exists and is not a demo run of this version (no demo.json); add --fresh to "
                        f"replace it, or give another --out")
    os.makedirs(out, exist_ok=True)
    with open(stamp, "w", encoding="utf-8") as handle:
        json.dump(settings, handle)


# --- 1. the task --------------------------------------------------------------------------------------------

def _unique_prompts(rows):
    seen = set()
    for row in rows:
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            yield row


def write_teacher_data(out: str, sizes: Sizes) -> str:
    """The teacher's training rows (every task family; a multi-answer row's response drawn uniformly
    from its right answers, so the teacher learns to spread its probability over them)."""
    path = os.path.join(out, "data", "teacher_train.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pool = _unique_prompts(make_examples(4 * sizes.teacher_examples, seed=TEACHER_SEED, tasks=ALL_TASKS))
        rows = [row for _, row in zip(range(sizes.teacher_examples), pool)]
        _write_jsonl(path, [{"prompt": r["prompt"], "chosen": r["answer"]} for r in rows])
    return path


def write_task_data(out: str, sizes: Sizes, seed: int, teacher_rows: str) -> dict:
    """One seed's disjoint prompt sets, none of them a prompt the teacher was trained on, written once.
    Each row's ``answer`` lists every right answer; held-out rows name their task family and kind."""
    data_dir = os.path.join(out, "data")
    files = {name: os.path.join(data_dir, f"{name}.jsonl") for name in ("prompts", "heldout")}
    if all(os.path.exists(path) for path in files.values()):
        return files
    os.makedirs(data_dir, exist_ok=True)
    with open(teacher_rows, encoding="utf-8") as handle:
        taught = {json.loads(line)["prompt"] for line in handle}
    wanted = sizes.heldout + sizes.prompts
    pool = _unique_prompts(row for row in make_examples(8 * wanted, seed=PROMPT_STREAM + seed, tasks=ALL_TASKS)
                           if row["prompt"] not in taught)
    rows = [row for _, row in zip(range(wanted), pool)]
    if len(rows) < wanted:
        raise UserError(f"the task has too few distinct prompts for {wanted} held-out and training prompts")
    heldout, prompts = rows[:sizes.heldout], rows[sizes.heldout:]
    _write_jsonl(files["prompts"], [{"prompt": r["prompt"], "answer": r["answers"]} for r in prompts])
    _write_jsonl(files["heldout"], [{"prompt": r["prompt"], "answer": r["answers"], "task": r["task"],
                                     "kind": "multi" if r["task"] in MULTI_ANSWER_TASKS else "single"}
                                    for r in heldout])
    return files


def _write_jsonl(path: str, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


# --- 2. the teacher ---------------------------------------------------------------------------------------

def training_defaults(sizes: Sizes, seed: int) -> dict:
    return {"data": {"max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH},
            "train": {"micro_batch_size": sizes.micro_batch, "seed": seed, "log_every": 20},
            "deepspeed": {"zero_stage": 3}}


def copy_shipped_teacher(runner: Runner, out: str) -> str:
    final = os.path.join(out, "teacher", "final")
    if not os.path.exists(os.path.join(final, "config.json")):
        partial = final + ".partial"  # an interrupted copy must not look like a teacher
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(SHIPPED_TEACHER, partial)
        os.replace(partial, final)
        runner.echo(f"[demo] teacher: the shipped one ({SHIPPED_TEACHER}; fastdadpo demo --train-teacher "
                    f"retrains it)")
    return final


def train_teacher(runner: Runner, out: str, sizes: Sizes) -> str:
    final = os.path.join(out, "teacher", "final")
    if os.path.exists(os.path.join(final, "config.json")):
        runner.echo(f"[demo] teacher: {final} exists, skipped")
        return final
    init = os.path.join(out, "teacher-init")
    if not os.path.exists(os.path.join(init, "config.json")):
        tokenizer = build_tokenizer(task_corpus(2000, seed=TEACHER_SEED, tasks=ALL_TASKS), vocab_size=512)
        model = tiny_causal_lm(len(tokenizer), hidden_size=sizes.teacher_hidden, layers=sizes.teacher_layers,
                               heads=8, kv_heads=2, intermediate_size=4 * sizes.teacher_hidden,
                               max_positions=2 * MAX_LENGTH, seed=TEACHER_SEED, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
        save_model_dir(model, tokenizer, init)
    config = training_defaults(sizes, TEACHER_SEED)
    config["model"] = {"student": init}
    config["data"]["train"] = os.path.join(out, "data", "teacher_train.jsonl")
    config["objective"] = {"name": "sft"}
    config["train"].update(lr=3e-3, max_steps=sizes.teacher_steps, warmup_ratio=0.05,
                           output_dir=os.path.join(out, "teacher"), resume=True)
    path = os.path.join(out, "configs", "teacher.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    runner.fastdadpo(["train", path], distributed=False, log_name="train-teacher")
    return final


def start_run(out: str, *, fresh: bool, mode: str, threads: int, trained_teacher: bool) -> None:
    """``out`` claimed for a run of ``mode`` (emptied first with ``fresh``), its stages' threads pinned."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    claim_directory(out, {"mode": mode, "threads": threads, "teacher": "trained" if trained_teacher else "shipped"})
    pin_threads(threads)


def teacher_for(runner: Runner, out: str, sizes: Sizes, *, train: bool) -> str:
    """The run's teacher: trained on the spot with ``train`` (or when no teacher ships), else the shipped one."""
    if train or not os.path.exists(os.path.join(SHIPPED_TEACHER, "config.json")):
        return train_teacher(runner, out, sizes)
    return copy_shipped_teacher(runner, out)


def pin_threads(threads: int) -> None:
    """Every stage is a child process: the thread count they inherit fixes the order of floating-point
    reductions, so a run is repeatable bit for bit on one machine."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def write_seed_recipe(out: str, sizes: Sizes, seed: int, files: dict, teacher: str, students: dict) -> str:
    """One seed's recipe (``fastdadpo run``): prune the teacher by 20% to get the student, sample one
    teacher and one student response per prompt, distilled SFT, then ``students`` (display name →
    training overrides) from dSFT, and the held-out comparison."""
    recipe = {
        "output_dir": out,
        "teacher": teacher,
        "student": teacher,  # pruned below: the paper's 20%-pruned student
        "prompts": files["prompts"],
        "eval_prompts": files["heldout"],
        "prune": {"ratio": 0.2, "calibration_samples": 128, "seed": seed},
        "generate": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "top_p": 1.0, "seed": seed,
                     "batch_size": 64},
        "train_common": training_defaults(sizes, seed),
        "dsft": {"train": {"lr": 1e-3, "max_steps": sizes.dsft_steps, "warmup_ratio": 0.05}},
        "students": students,
        "eval": {"judge": "exact", "max_new_tokens": MAX_NEW_TOKENS, "batch_size": 64, "group_by": "task"},
    }
    path = os.path.join(out, "recipe.yaml")
    write_text_atomic(path, yaml.safe_dump(recipe, sort_keys=False))
    return path
