"""What a training run reports: ``metrics.jsonl`` (one row per optimizer step, rank 0), TensorBoard
when installed, log lines, and the progress bar or line."""
from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from typing import Dict, Optional

import torch

from fastdadpo.base import collectives
from fastdadpo.base.errors import UserError
from fastdadpo.base.files import write_text_atomic
from fastdadpo.base.progress import bar_columns, format_seconds
from fastdadpo.commands.trl_names import with_trl_metric_names


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def accumulate(sums: Dict[str, torch.Tensor], metrics: Dict[str, torch.Tensor]) -> None:
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + value.detach().float()


def reduce_step_metrics(sums: Dict[str, torch.Tensor], tokens: int, nonfinite, stop: bool,
                        device: torch.device):
    """One collective for the step's summed metrics, its token count, how many micro-batch losses
    were not finite (a tensor, so the loop never waits on the device for it) and whether any rank
    asked to stop: (metrics, finite everywhere, stop requested)."""
    keys = sorted(sums)
    values = [sums[k].to(device).reshape(()).double() for k in keys]
    values += [torch.as_tensor(nonfinite, dtype=torch.float64, device=device).reshape(())]
    values += [torch.tensor(float(v), dtype=torch.float64, device=device) for v in (tokens, stop)]
    reduced = collectives.all_reduce_sum(torch.stack(values)).tolist()
    metrics = dict(zip(keys, reduced[:len(keys)]))
    metrics["tokens"] = reduced[len(keys) + 1]
    return metrics, reduced[len(keys)] == 0, reduced[len(keys) + 2] > 0


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step (rank 0). On resume, rows after the resumed
    step (from the interrupted run) are dropped so the file tells one consistent story, and so is a
    torn last line (what a kill or a full disk during an append leaves), said once in the log."""

    def __init__(self, path: str, active: bool, keep_until: int, log=None, report_to=("jsonl",),
                 run_config: Optional[dict] = None):
        self.path, self.active = path, active
        self.writer = self.wandb = None
        if not active:
            return
        kept, torn = (self._rows_until(keep_until) if keep_until and os.path.exists(path) else ([], 0))
        if torn and log is not None:
            log.info(f"{path}: dropped {torn} unreadable line(s) (a torn append from the interrupted run)")
        write_text_atomic(path, "".join(kept))
        output_dir = os.path.dirname(path)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if "wandb" in report_to:
            import wandb

            # One W&B run per output directory, continued on resume: its id is kept beside metrics.jsonl.
            id_path = os.path.join(output_dir, "wandb-run-id")
            run_id = secrets.token_hex(4)  # W&B's own id helper moved between releases; any short id will do
            if os.path.exists(id_path):
                with open(id_path, encoding="utf-8") as handle:
                    run_id = handle.read().strip() or run_id
            write_text_atomic(id_path, run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastdadpo"), id=run_id, resume="allow",
                                    name=os.path.basename(os.path.abspath(output_dir)), dir=output_dir,
                                    config=run_config or {})

    def _rows_until(self, step: int):
        kept, torn = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    torn += 1
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        return kept, torn

    def write(self, row: dict) -> None:
        if not self.active:
            return
        row = with_trl_metric_names(row)
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        except OSError as exc:  # a full disk: the next checkpoint could not be written either
            raise UserError(f"{self.path}: writing step {row.get('step')}'s metrics failed ({exc.strerror or exc}); "
                            f"training stops here, its last complete checkpoint kept under checkpoints/: free "
                            f"space and resume (train.resume: true)") from None
        scalars = {key: value for key, value in row.items() if isinstance(value, (int, float)) and key != "step"}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


class Log:
    """Rank 0's log lines, written above the progress bar when there is one."""

    def __init__(self, active: bool):
        self.active = active
        self.bar = None

    def info(self, message: str) -> None:
        if not self.active:
            return
        if self.bar is not None and self.bar.bar is not None:
            self.bar.bar.write(f"[fastdadpo] {message}")
        else:
            print(f"[fastdadpo] {message}", flush=True)

    def progress(self, total: int, initial: int, every: int) -> "Progress":
        self.bar = Progress(total, initial, self.active, every)
        return self.bar


class Progress:
    """Rank 0's progress: a bar (steps, loss, tokens/s, ETA) on a terminal, a plain line every
    ``every`` steps otherwise (logs of recipe stages, CI)."""

    def __init__(self, total: int, initial: int, active: bool, every: int):
        self.total, self.step, self.active, self.every = total, initial, active, every
        self.started, self.first = time.perf_counter(), initial
        self.bar = None
        columns = bar_columns(sys.stderr) if active else None
        if columns is not None:  # a terminal too narrow to draw a bar (or 0 columns) gets the plain lines
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", ncols=columns)

    def update(self, metrics: dict) -> None:
        self.step += 1
        if not self.active:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            self.bar.update(1)
        elif self.step % self.every == 0 or self.step == self.total:
            rate = (self.step - self.first) / max(time.perf_counter() - self.started, 1e-9)
            eta = (self.total - self.step) / max(rate, 1e-9)
            print(f"[fastdadpo] step {self.step}/{self.total} loss {metrics['loss']:.4f} "
                  f"tok/s {metrics['tokens_per_s']:.0f} eta {format_seconds(eta)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
