"""``fastdadpo demo``: the whole daDPO experiment in miniature, on a CPU, with nothing downloaded.

1. A conversational task with verifiable answers (``synthetic``: repeat, reverse, count a word
   list, name its first or last word), a tokenizer trained on it, and disjoint prompt sets: the
   teacher's training data, the distillation prompts, held-out evaluation prompts.
2. A teacher: a small Qwen2 model trained from scratch on the task with ``fastdadpo train`` (sft).
   Learning to copy takes a small model thousands of steps (its induction heads form late), more
   than the demo's time on two cores, so the trained teacher ships with the package
   (``demo_data/teacher``, 1M parameters) and ``fastdadpo demo --train-teacher`` (or
   ``scripts/train_demo_teacher.sh``) regenerates it; ``--quick`` trains its tiny one on the spot.
3. The paper's pipeline as a recipe (``fastdadpo run``): prune the teacher by 20% to get the student,
   sample teacher (chosen) and student (rejected) responses, distilled SFT, then dDPO, daDPO and
   token-level daDPO from the dSFT student, and a final comparison on the held-out prompts:
   accuracy, preference rate against the teacher (exact-match judge), divergence to the teacher.

Every stage is skipped when its output exists, so a second run only prints the results; ``--fresh``
starts over. ``--quick`` shrinks everything (the CI runs it).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass

import yaml

from .checkpoint import write_text_atomic
from .errors import UserError
from .recipe import Runner, load_recipe


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


FULL = Sizes(teacher_examples=8000, prompts=1536, heldout=200, teacher_hidden=128, teacher_layers=4,
             teacher_steps=12000, dsft_steps=300, preference_steps=100, micro_batch=32)
QUICK = Sizes(teacher_examples=256, prompts=48, heldout=24, teacher_hidden=32, teacher_layers=2, teacher_steps=8,
              dsft_steps=3, preference_steps=2, micro_batch=8)
MAX_LENGTH, MAX_PROMPT_LENGTH, MAX_NEW_TOKENS = 64, 40, 24
SHIPPED_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data", "teacher")


def add_arguments(parser) -> None:
    parser.add_argument("--out", help="where everything is written (default: runs/demo, runs/demo-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline runs (CI)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first and start over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task data, the models and the training")
    parser.add_argument("--train-teacher", action="store_true",
                        help=f"train the teacher from scratch ({FULL.teacher_steps} steps, ~30 min on 2 cores) instead "
                             f"of using the one shipped in {SHIPPED_TEACHER}")


def run(args) -> int:
    sizes = QUICK if args.quick else FULL
    out = os.path.abspath(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    _claim(out, {"mode": "quick" if args.quick else "full", "seed": args.seed,
                 "teacher": "trained" if args.quick or args.train_teacher else "shipped"})
    started = time.time()
    files = write_task_data(out, sizes, args.seed)
    recipe_path = write_recipe(out, sizes, args.seed, files)
    recipe = load_recipe(recipe_path)
    # No separate precompute stage: each training computes (and caches) its log-probs first anyway,
    # and a process start costs ~10 s here.
    runner = Runner(recipe, stages=["prune", "generate", "dsft", "train", "eval"])
    if args.quick or args.train_teacher or not os.path.exists(os.path.join(SHIPPED_TEACHER, "config.json")):
        train_teacher(runner, out, sizes, args.seed, files)
    else:
        copy_shipped_teacher(runner, out)
    runner.run()
    report(out, recipe, sizes, args, time.time() - started)
    return 0


def _claim(out: str, settings: dict) -> None:
    """Stages skip what exists, so a directory must hold one demo's settings: reusing a quick run's
    teacher or another seed's data under a full run's title would print a wrong table."""
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

def write_task_data(out: str, sizes: Sizes, seed: int) -> dict:
    """Disjoint prompt sets (no held-out prompt is seen in training), written once."""
    from .synthetic import make_examples

    data_dir = os.path.join(out, "data")
    files = {name: os.path.join(data_dir, f"{name}.jsonl") for name in ("teacher_train", "prompts", "heldout")}
    if all(os.path.exists(path) for path in files.values()):
        return files
    os.makedirs(data_dir, exist_ok=True)
    pool = make_examples(4 * (sizes.teacher_examples + sizes.prompts + sizes.heldout), seed=seed)
    seen, unique = set(), []
    for row in pool:
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            unique.append(row)
    heldout = unique[:sizes.heldout]
    prompts = unique[sizes.heldout:sizes.heldout + sizes.prompts]
    teacher_rows = unique[sizes.heldout + sizes.prompts:sizes.heldout + sizes.prompts + sizes.teacher_examples]
    _write_jsonl(files["teacher_train"], [{"prompt": r["prompt"], "chosen": r["answer"]} for r in teacher_rows])
    _write_jsonl(files["prompts"], [{"prompt": r["prompt"], "answer": r["answer"]} for r in prompts])
    _write_jsonl(files["heldout"], [{"prompt": r["prompt"], "answer": r["answer"], "task": r["task"]}
                                    for r in heldout])
    return files


def _write_jsonl(path: str, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


# --- 2. the teacher ---------------------------------------------------------------------------------------

def _training_defaults(sizes: Sizes, seed: int) -> dict:
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


def train_teacher(runner: Runner, out: str, sizes: Sizes, seed: int, files: dict) -> str:
    from .synthetic import build_tokenizer, save_model_dir, task_corpus, tiny_causal_lm

    final = os.path.join(out, "teacher", "final")
    if os.path.exists(os.path.join(final, "config.json")):
        runner.echo(f"[demo] teacher: {final} exists, skipped")
        return final
    init = os.path.join(out, "teacher-init")
    if not os.path.exists(os.path.join(init, "config.json")):
        tokenizer = build_tokenizer(task_corpus(2000, seed=seed), vocab_size=512)
        model = tiny_causal_lm(len(tokenizer), hidden_size=sizes.teacher_hidden, layers=sizes.teacher_layers,
                               heads=8, kv_heads=2, intermediate_size=4 * sizes.teacher_hidden,
                               max_positions=2 * MAX_LENGTH, seed=seed, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
        save_model_dir(model, tokenizer, init)
    config = _training_defaults(sizes, seed)
    config["model"] = {"student": init}
    config["data"]["train"] = files["teacher_train"]
    config["objective"] = {"name": "sft"}
    config["train"].update(lr=3e-3, max_steps=sizes.teacher_steps, warmup_ratio=0.05,
                           output_dir=os.path.join(out, "teacher"), resume=True)
    path = os.path.join(out, "configs", "teacher.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    runner.fastdadpo(["train", path], distributed=False, log_name="train-teacher")
    return final


# --- 3. the recipe ------------------------------------------------------------------------------------------

def write_recipe(out: str, sizes: Sizes, seed: int, files: dict) -> str:
    teacher = os.path.join(out, "teacher", "final")
    preference = {"train": {"lr": 1e-4, "max_steps": sizes.preference_steps, "warmup_ratio": 0.1}}
    recipe = {
        "output_dir": out,
        "teacher": teacher,
        "student": teacher,  # pruned below: the paper's 20%-pruned student
        "prompts": files["prompts"],
        "eval_prompts": files["heldout"],
        "prune": {"ratio": 0.2, "calibration_samples": 128, "seed": seed},
        "generate": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "top_p": 1.0, "seed": seed,
                     "batch_size": 64},
        "train_common": _training_defaults(sizes, seed),
        "dsft": {"train": {"lr": 1e-3, "max_steps": sizes.dsft_steps, "warmup_ratio": 0.05}},
        "students": {
            "dDPO": {"objective": {"name": "dpo", "beta": 0.1}, **preference},
            # The demo's teacher is nearly deterministic: its margin log π_te(y^t) − log π_te(y^s) runs to
            # tens of nats, so β2 must be small for the teacher term not to swamp the others.
            "daDPO": {"objective": {"name": "dadpo", "beta1": 0.1, "beta2": 0.02}, **preference},
            "daDPO-token": {"objective": {"name": "dadpo_token", "beta": 0.1, "alpha": 0.5}, **preference},
        },
        "eval": {"judge": "exact", "max_new_tokens": MAX_NEW_TOKENS, "batch_size": 64},
    }
    path = os.path.join(out, "recipe.yaml")
    write_text_atomic(path, yaml.safe_dump(recipe, sort_keys=False))
    return path


def report(out: str, recipe, sizes: Sizes, args, seconds: float) -> None:
    from .evaluate import format_table

    with open(recipe.path("eval.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    table = format_table(results)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    text = (f"fastdadpo demo ({'quick' if args.quick else 'full'}), seed {args.seed}, {machine}, "
            f"{seconds / 60:.1f} min this run\n\n{table}\n\nplots: {recipe.path('curves.png')}, "
            f"{recipe.path('comparison.png')}\n")
    with open(os.path.join(out, "results.txt"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print("\n" + text)
