"""Threads for requests to servers that may hang (served models, an HTTP judge).

Hand-written on purpose rather than ``concurrent.futures.ThreadPoolExecutor``: Python joins that
pool's workers when the interpreter exits, so one request stuck on a hung server holds a failed or
interrupted command for the request's whole timeout, retries included (tens of minutes by default).
These workers are daemon threads: when the command ends, with its one-paragraph error or a Ctrl-C,
the process ends too and a request still in flight is abandoned (it was only ever a read)."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, Iterable, Iterator, List, Optional

_STOP = object()


class Failures:
    """The first failure among the tasks of one or more pools. ``result(future)`` waits for that
    task, or for any task to fail, whichever comes first: results are read in order, and a failure
    must not wait behind an earlier request that hangs."""

    def __init__(self):
        self._changed = threading.Condition()
        self.first: Optional[BaseException] = None

    def ended(self, failure: Optional[BaseException]) -> None:
        with self._changed:
            if failure is not None and self.first is None:
                self.first = failure
            self._changed.notify_all()

    def result(self, future: Future):
        with self._changed:
            while not future.done() and self.first is None:
                self._changed.wait()
        if not future.done():
            raise self.first
        return future.result()


class DaemonPool:
    """``submit(function, *args, **kwargs)`` -> a Future; at most ``workers`` run at once. ``shutdown()``
    cancels what has not started and lets the running ones finish (or be abandoned at exit).
    ``failures`` may be shared between pools (one per server) that one command reads together."""

    def __init__(self, workers: int, failures: Optional[Failures] = None):
        self.failures = failures or Failures()
        self._tasks: "queue.SimpleQueue" = queue.SimpleQueue()
        self._pending: List[Future] = []
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"fastdadpo-worker-{i}")
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is _STOP:
                return
            future, function, args, kwargs = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001: handed to whoever waits on the future
                future.set_exception(exc)
                self.failures.ended(exc)
            else:
                self.failures.ended(None)

    def submit(self, function: Callable, *args, **kwargs) -> Future:
        future: Future = Future()
        self._pending.append(future)
        self._tasks.put((future, function, args, kwargs))
        return future

    def map(self, function: Callable, items: Iterable) -> Iterator:
        """``function(item)`` for each item, in order; the first failure is raised and the rest cancelled."""
        futures = [self.submit(function, item) for item in items]
        try:
            for future in futures:
                yield self.failures.result(future)
        finally:
            for future in futures:
                future.cancel()

    def shutdown(self) -> None:
        for future in self._pending:
            future.cancel()
        for _ in self._threads:
            self._tasks.put(_STOP)

    def __enter__(self) -> "DaemonPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
