"""Host work off the model's path: an iterator run ahead in a thread, and an ordered background
writer.

Both run their work in one daemon thread. Tokenising (Hugging Face's fast tokenizers), Parquet
writing (pyarrow) and fsync release the GIL, so they overlap with the model (ONNX Runtime and
torch release it too). Errors are never lost: a worker's exception is raised again in the
calling thread, with its original type, at the next call that could see it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def run_ahead(items: Iterable[T], ahead: int = 1, name: str = "xmodal-prefetch") -> Iterator[T]:
    """Yield ``items`` in order while a thread produces up to ``ahead`` of them in advance.

    An exception raised while producing an item is raised here, in place of that item. Closing
    the generator early (``break``, an error in the consumer) stops the thread after the item
    it is producing.
    """
    if ahead < 1:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            slots.put(_Failure(error))
            return
        slots.put(_DONE)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting for a free slot
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


class OrderedWriter:
    """Runs submitted jobs one after another, in submission order, in a background thread.

    At most ``depth`` jobs wait (``submit`` blocks beyond that, bounding the memory held by
    pending shards). After a job raises, the jobs still queued are dropped (nothing is written
    out of order) and the error is raised by the next ``submit`` or by ``close``. ``close``
    waits for every job; use the writer as a context manager so that it always does.
    """

    def __init__(self, depth: int = 2, name: str = "xmodal-writer"):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None  # a job's error, until raised in the caller
        self._failed = False  # a job raised: every later job is dropped, even once it is raised
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _DONE:
                return
            if not self._failed:
                try:
                    job()
                except BaseException as error:  # noqa: BLE001 - raised again in the caller
                    self._error, self._failed = error, True

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], Any]) -> None:
        """Queue ``job``; raises the error of an earlier job instead, if one failed."""
        self._raise()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait until every queued job ran; raise the first error of one."""
        if self._thread.is_alive():
            self._jobs.put(_DONE)
            self._thread.join()
        self._raise()

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is None:
            self.close()
            return
        # The caller already fails: let the jobs queued before the failure finish (they are
        # complete shards), but raise the caller's error, not the writer's.
        self._jobs.put(_DONE)
        self._thread.join()
