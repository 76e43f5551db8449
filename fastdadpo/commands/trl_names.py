"""TRL's names beside ours: the config keys a TRL user writes (``TrainingArguments`` / ``DPOConfig``),
accepted as aliases of ours, and the metric names TRL logs, written beside ours.

One table per kind. A key given under both spellings in one place is an error (which one was meant
cannot be known); a ``--set`` of either spelling overrides the file's other one, as any ``--set`` wins.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

# {section: {TRL's key: ours}}. Keys TRL and fastdadpo spell alike (max_steps, warmup_ratio, lr_scheduler_type,
# weight_decay, max_grad_norm, seed, output_dir, gradient_checkpointing, max_length,
# max_prompt_length, beta, loss_type, label_smoothing) need no entry.
CONFIG_ALIASES: Dict[str, Dict[str, str]] = {
    "train": {
        "learning_rate": "lr",
        "per_device_train_batch_size": "micro_batch_size",
        "gradient_accumulation_steps": "grad_accum",
        "num_train_epochs": "epochs",
        "save_steps": "save_every",
        "logging_steps": "log_every",
        "eval_steps": "eval_every",
        "save_total_limit": "keep_checkpoints",
        "resume_from_checkpoint": "resume",
    },
}

# {ours: TRL's}: both are logged (ours kept for one release, then TRL's alone).
METRIC_ALIASES: Dict[str, str] = {
    "rewards/accuracy": "rewards/accuracies",
    "rewards/margin": "rewards/margins",
}


def canonical_key(section: str, key: str) -> str:
    """Our name for ``section.key`` (the key itself when it is not one of TRL's)."""
    return CONFIG_ALIASES.get(section, {}).get(key, key)


def aliases_of(section: str) -> Dict[str, str]:
    return CONFIG_ALIASES.get(section, {})


def translate_section(section: str, values: dict, set_by_override: Iterable[str], fail) -> dict:
    """``values`` with TRL's keys renamed to ours. Both spellings of one key: the one a ``--set`` gave
    wins (``set_by_override``: the dot paths given by --set); given both in the file, ``fail(path,
    message)``."""
    overridden = set(set_by_override)
    renamed: Dict[str, object] = {}
    given_as: Dict[str, str] = {}
    for key, value in values.items():
        ours = canonical_key(section, key) if isinstance(key, str) else key
        if ours in renamed:
            first = given_as[ours]
            winner = _override_winner(section, first, key, overridden)
            if winner is None:
                fail(f"{section}.{key}", f"and {section}.{first} are the same setting (TRL's name and ours); "
                                         f"give one of them")
            if winner == key:
                renamed[ours], given_as[ours] = value, key
            continue
        renamed[ours], given_as[ours] = value, key
    return renamed


def _override_winner(section: str, first: str, second: str, overridden: set) -> Optional[str]:
    first_set, second_set = f"{section}.{first}" in overridden, f"{section}.{second}" in overridden
    if first_set != second_set:
        return first if first_set else second
    return None


def with_trl_metric_names(row: dict) -> dict:
    """A metrics row with TRL's name beside each of ours that TRL spells otherwise (also under a
    prefix such as ``eval/``)."""
    extra = {}
    for key, value in row.items():
        for ours, theirs in METRIC_ALIASES.items():
            if key == ours or key.endswith("/" + ours):
                extra[key[:len(key) - len(ours)] + theirs] = value
    return {**row, **extra}
