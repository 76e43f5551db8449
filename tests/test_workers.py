"""base/workers: daemon worker threads whose first failure is seen at once, whatever is in flight."""
import threading
import time

import pytest

from fastdadpo.base.workers import DaemonPool


def test_results_in_order_and_a_failure_not_held_behind_a_hung_task():
    release = threading.Event()

    def task(item):
        if item == 0:
            release.wait(30)  # a request hanging at its server
        if item == 1:
            raise ValueError("refused")
        return item * 10

    with DaemonPool(2) as pool:
        assert list(pool.map(lambda item: item * 10, range(5))) == [0, 10, 20, 30, 40]
        started = time.monotonic()
        with pytest.raises(ValueError, match="refused"):
            list(pool.map(task, range(4)))
        assert time.monotonic() - started < 5  # not the 30 s task 0 waits
    assert all(thread.daemon for thread in pool._threads)
    release.set()


def test_shutdown_cancels_what_has_not_started():
    gate = threading.Event()
    with DaemonPool(1) as pool:
        running = pool.submit(gate.wait, 30)
        while not running.running():
            time.sleep(0.01)
        waiting = [pool.submit(str, i) for i in range(3)]
    assert all(future.cancelled() for future in waiting)
    gate.set()
    assert running.result(timeout=10) is True
