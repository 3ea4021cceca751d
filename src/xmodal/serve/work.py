"""Bounded work per request: what a request costs, the limits on it, and where it runs.

The cost model (:class:`RequestCost`): a request makes the server decode uploaded images
(count x pixels, read from their headers), run captions through the text tower (count x
tokens; a caption is at most ``max_text_chars`` characters and the tokenizer truncates it to
the model's length) and, with ``rerank``, score k (query, candidate) pairs with the ITM head,
each candidate an indexed image decoded and run through the image tower. Every term has a limit
in :class:`~xmodal.serve.settings.ServeSettings`; over one, the request is refused with 422
naming it before any work starts.

Where it runs (:class:`Workers`): model work, image decoding and even header checks run in the
thread pool, never on the event loop. Requests that decode uploads or re-rank are *heavy*: at
most ``max_heavy_requests`` of them compute at once, so caption searches and thumbnails never
queue behind them. Each request gets a :class:`~xmodal.runtime.Deadline` of
``request_timeout`` seconds, counted from its arrival and checked between steps of the work;
a client that disconnects cancels it. Past the deadline the answer is 503.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from xmodal.errors import CancelledWorkError, DeadlineError, LimitError
from xmodal.runtime import Deadline
from xmodal.serve.settings import ServeSettings

T = TypeVar("T")
DISCONNECT_POLL = 0.05  # seconds between checks that the client is still there
log = logging.getLogger("xmodal.serve")


@dataclass(frozen=True)
class RequestCost:
    """The work one request asks for."""

    images: int = 0  # uploaded images decoded
    pixels: int = 0  # their pixels, all together
    captions: int = 0  # captions through the text tower
    rerank_pairs: int = 0  # (query, indexed item) pairs scored by the ITM head

    @property
    def heavy(self) -> bool:
        """Decoding uploads or re-ranking: the work that can take a second or more."""
        return self.images > 0 or self.rerank_pairs > 0

    def check(self, settings: ServeSettings) -> None:
        """LimitError naming the first limit this request is over."""
        if self.images > settings.max_batch:
            raise LimitError(
                f"{self.images} images; the limit is {settings.max_batch} per request (max_batch)"
            )
        if self.captions > settings.max_batch:
            raise LimitError(
                f"{self.captions} captions; the limit is {settings.max_batch} per request "
                "(max_batch)"
            )
        if self.pixels > settings.max_request_pixels:
            raise LimitError(
                f"the uploaded images hold {self.pixels:,} pixels; the limit is "
                f"{settings.max_request_pixels:,} per request (max_request_pixels)"
            )
        if self.rerank_pairs > settings.max_rerank:
            raise LimitError(
                f"rerank with k = {self.rerank_pairs} re-scores {self.rerank_pairs} results; the "
                f"limit is {settings.max_rerank} (max_rerank): ask for a smaller k"
            )


class Workers:
    """The service's compute slots: ``max_concurrency`` in all, ``max_heavy_requests`` of them
    for heavy requests."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.light = anyio.CapacityLimiter(settings.max_concurrency - settings.max_heavy_requests)
        self.heavy = anyio.CapacityLimiter(settings.max_heavy_requests)
        if settings.max_concurrency == settings.max_heavy_requests:  # no slot of their own
            self.light = self.heavy

    def deadline(self) -> Deadline:
        return Deadline(self.settings.request_timeout)

    async def run(
        self,
        request: Request,
        work: Deadline,
        heavy: bool,
        fn: Callable[..., T],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, work=work, **kwargs)`` in a worker thread of the right kind, within the
        request's deadline; cancelled when the client goes away."""
        limiter = self.heavy if heavy else self.light
        work.priority = 1 if heavy else 0  # at the model lock, short requests go first
        call = partial(fn, *args, work=work, **kwargs)
        result: list[T] = []
        failure: list[Exception] = []

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL)
            work.cancel("the client went away")
            group.cancel_scope.cancel()

        async def compute() -> None:
            # waiting for a slot counts against the deadline; once the thread runs, it stops
            # itself at the next check past the deadline
            with anyio.move_on_after(work.remaining()):
                try:
                    result.append(await anyio.to_thread.run_sync(call, limiter=limiter))
                except Exception as err:  # noqa: BLE001 - raised below, outside the task group
                    failure.append(err)
            group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            group.start_soon(compute)
        if failure:
            raise failure[0]
        if result:
            return result[0]
        if work.cancelled:
            raise CancelledWorkError("work cancelled: the client went away")
        raise DeadlineError(
            f"the server is busy: the request waited {work.seconds:g} s (request_timeout) "
            "without a free compute slot; try again"
        )

    async def check(self, request: Request, work: Deadline, fn: Callable[..., T], *args) -> T:
        """A short check that still must not run on the event loop (an image header, an id
        lookup): in a heavy slot, within the request's deadline."""
        return await self.run(request, work, True, _no_work(fn), *args)


def _no_work(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` taking (and ignoring) the ``work`` keyword :meth:`Workers.run` passes."""

    def call(*args: Any, work: Deadline) -> T:
        work.check()
        return fn(*args)

    return call
