"""The background shard writer drops every job after a failed one, also once the failure has
been raised in the caller (a job queued before that raise must not run after it)."""

from __future__ import annotations

import threading
import time

import pytest

from xmodal.extract.background import OrderedWriter


def test_jobs_queued_behind_a_failure_never_run_after_it_is_raised():
    done: list[str] = []
    started, release = threading.Event(), threading.Event()

    def fail() -> None:
        started.set()
        release.wait(5)
        raise OSError("disk full")

    writer = OrderedWriter(depth=4)
    writer.submit(fail)
    started.wait(5)
    writer.submit(lambda: done.append("queued behind the failure"))
    release.set()
    deadline = time.monotonic() + 5
    while writer._error is None and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(lambda: done.append("submitted at the raise"))
    writer.submit(lambda: done.append("submitted after the raise"))  # the caller ignored it
    writer.close()
    assert done == []


def test_a_caller_error_lets_the_complete_jobs_before_it_finish():
    done: list[int] = []
    with pytest.raises(KeyError), OrderedWriter(depth=4) as writer:
        for i in range(3):
            writer.submit(lambda i=i: done.append(i))
        raise KeyError("the model failed")
    assert done == [0, 1, 2]
