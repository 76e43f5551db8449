"""Progress of a long stage (tokenization, cached log-probs, generation, evaluation, training), on the
process that reports (rank 0): a tqdm bar with rate and ETA when stderr is a terminal wide enough to
draw one, else a plain line with the ETA on stderr at most every ``PLAIN_EVERY_S`` seconds and at the
end, so logs of recipe stages and CI stay short and a zero-width terminal still shows progress."""
from __future__ import annotations

import shutil
import sys
import time
from typing import Optional

PLAIN_EVERY_S = 10.0
MIN_BAR_COLUMNS = 40  # narrower (or a terminal reporting 0 columns, as some CI ptys do): plain lines


def bar_columns(stream) -> Optional[int]:
    """The terminal's width when ``stream`` is a terminal wide enough for a bar, else None."""
    if not getattr(stream, "isatty", lambda: False)():
        return None
    columns = shutil.get_terminal_size(fallback=(0, 0)).columns
    return columns if columns >= MIN_BAR_COLUMNS else None


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class StageProgress:
    """``with StageProgress(total, "tokenize", "rows") as progress: ... progress.update(n)``."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, active: bool = True, initial: int = 0,
                 stream=None):
        self.total, self.desc, self.unit, self.active = total, desc, unit, active and total > 0
        self.done = self.first = initial
        self.stream = stream or sys.stderr
        self.started = self.last_line = time.perf_counter()
        self.postfix = ""
        self.bar = None
        columns = bar_columns(self.stream) if self.active else None
        if columns is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, ncols=columns, file=self.stream)

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if not self.active:
            return
        if postfix:
            self.postfix = " ".join(f"{key} {value}" for key, value in postfix.items())
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_line >= PLAIN_EVERY_S or self.done >= self.total:
            self.last_line = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: Optional[float] = None) -> str:
        """The plain line: "[tokenize] 1200/3000 rows (40%), 310 rows/s, eta 6s"."""
        elapsed = max((now or time.perf_counter()) - self.started, 1e-9)
        rate = (self.done - self.first) / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if remaining == float("inf") else format_seconds(remaining)
        text = (f"[{self.desc}] {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:.3g} {self.unit}/s, eta {eta}")
        return f"{text}, {self.postfix}" if self.postfix else text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
