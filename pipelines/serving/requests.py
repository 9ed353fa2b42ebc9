"""What the scoring server's routes share (``/invocations`` in :mod:`.server`, ``/v1`` in :mod:`.openai_api`):
reading a body within its size limit, and the counters of the work in flight. Each route words its own errors."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from starlette.requests import Request

DRAIN = 4  # a body over the limit is read to its end (discarded) up to DRAIN x the limit, so the client gets the 413


class BodyTooLarge(Exception):
    """The body is over the limit (the route answers 413)."""


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, at most ``max_bytes``, else :class:`BodyTooLarge`: one declared over ``DRAIN x`` the limit is not
    read (the client may see the connection close instead); a longer one is read on to ``DRAIN x`` but not kept."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN * max_bytes:
        raise BodyTooLarge
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size <= max_bytes:
            chunks.append(part)
        elif size > DRAIN * max_bytes:
            break
    if size > max_bytes:
        raise BodyTooLarge
    return b"".join(chunks)


class Work:
    """The server's counters (``/health``): ``requests``, ``timed_out`` (answered 503), ``stopped`` (work halted at
    a check), ``scoring`` (jobs running), ``steps`` (checks passed: chunks and decode steps). The scoring threads
    update theirs under one lock; the event loop counts requests and timeouts."""

    def __init__(self) -> None:
        self.stats = {"requests": 0, "timed_out": 0, "stopped": 0, "scoring": 0, "steps": 0}
        self._lock = threading.Lock()

    def step(self) -> None:
        with self._lock:
            self.stats["steps"] += 1

    def _add(self, name: str, n: int) -> None:
        with self._lock:
            self.stats[name] += n

    @contextlib.contextmanager
    def scoring(self, stop: type[BaseException]) -> Iterator[None]:
        """One job running; counted as stopped when it raises ``stop`` (the route's deadline exception)."""
        self._add("scoring", 1)
        try:
            yield
        except stop:
            self._add("stopped", 1)
            raise
        finally:
            self._add("scoring", -1)
