"""``fastdadpo prune``: structured pruning of a causal LM into a smaller one of the same architecture
(``fastdadpo.models.prune`` says what is removed and how it is scored), written as a Hugging Face
model directory that appears only when complete."""
from __future__ import annotations

import json
import os
import shutil

import torch

from fastdadpo.base.errors import ConfigError, UserError
from fastdadpo.base.files import fsync_path, seal_directory
from fastdadpo.core.batch import pad_token_id
from fastdadpo.models.loading import (load_causal_lm, loading_failure, require_model_dir, resolve_device,
                                      resolve_dtype)
from fastdadpo.models.prune import (REPORT_FILE, apply_pruning, check_amounts, format_report, plan_pruning,
                                    pruning_report, read_calibration)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory to prune")
    parser.add_argument("--out", required=True, help="directory for the pruned model (new or empty)")
    parser.add_argument("--ratio", type=float, default=0.2,
                        help="fraction of the attention + MLP parameters (of the kept layers) to remove")
    parser.add_argument("--drop-layers", type=int, default=0,
                        help="also remove this many whole decoder layers (lowest block influence)")
    parser.add_argument("--calibration", help="JSONL with a 'prompt' (and optionally 'chosen') or 'text' field per "
                                              "line; needed unless --ratio 0 and --drop-layers 0")
    parser.add_argument("--calibration-samples", type=int, default=128, help="rows used (a seeded random subset)")
    parser.add_argument("--calibration-length", type=int, default=512, help="tokens per calibration row, at most")
    parser.add_argument("--channel-multiple", type=int, default=8,
                        help="round the pruned intermediate size to a multiple of this")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="dtype to load, score and save in (default: the checkpoint's own)")


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype a model directory's config names (float32 when it names none), so that pruning a
    bf16 checkpoint writes a bf16 one."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UserError(f"--out: {path} already exists and is not an empty directory; choose a new directory "
                        f"(pruning never overwrites a model)")


def _save_atomic(out: str, pruned, tokenizer, report: dict) -> None:
    """The pruned model, its tokenizer and the report, written into ``.NAME.partial`` beside ``out``,
    every file fsynced, then renamed to ``out``: a killed prune leaves no half-written model where a
    finished one is expected (a directory holding only config.json)."""
    out = os.path.abspath(out)
    partial = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pruned.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        with open(os.path.join(partial, REPORT_FILE), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        seal_directory(partial)
        if os.path.isdir(out):
            os.rmdir(out)  # empty: checked before pruning
        os.replace(partial, out)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"--out: cannot write the pruned model to {out}: {exc.strerror or exc} "
                        f"({exc.filename or partial}); nothing was left there") from None
    fsync_path(os.path.dirname(out))


def run(args) -> int:
    check_amounts(args.ratio, args.drop_layers)
    for flag, value in (("--calibration-samples", args.calibration_samples),
                        ("--calibration-length", args.calibration_length), ("--batch-size", args.batch_size),
                        ("--channel-multiple", args.channel_multiple)):
        if value < 1:
            raise ConfigError(f"{flag}: {value} must be at least 1")
    require_model_dir(args.model, "--model")
    _check_output_dir(args.out)
    needs_calibration = args.ratio > 0 or args.drop_layers > 0
    if needs_calibration and not args.calibration:
        raise UserError("pruning needs calibration data to score channels, heads and layers: give a JSONL file of "
                        "prompts (a 'prompt' field, optionally 'chosen') or texts ('text') with --calibration")
    from transformers import AutoTokenizer

    device = resolve_device(args.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as exc:  # noqa: BLE001 (see loading_failure)
        raise loading_failure("--model", args.model, "a tokenizer", exc) from None
    calibration = (read_calibration(args.calibration, tokenizer, samples=args.calibration_samples,
                                    max_length=args.calibration_length, seed=args.seed) if needs_calibration else [])
    dtype = resolve_dtype(args.dtype, device) if args.dtype else checkpoint_dtype(args.model)
    model = load_causal_lm(args.model, dtype=dtype, device=device, key="--model")
    plan = plan_pruning(model, calibration, ratio=args.ratio, drop_layers=args.drop_layers,
                        channel_multiple=args.channel_multiple, batch_size=args.batch_size,
                        pad_id=pad_token_id(tokenizer))
    pruned = apply_pruning(model, plan)
    report = pruning_report(model, pruned, plan, ratio=args.ratio, drop_layers=args.drop_layers)
    _save_atomic(args.out, pruned, tokenizer, report)
    print(f"pruned {args.model} -> {args.out}: {format_report(report)}")
    for note in plan.notes:
        print(f"note: {note}")
    return 0
