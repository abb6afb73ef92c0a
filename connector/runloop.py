"""Which event loop runs the connector: uvloop when it is there, else asyncio's own.

uvloop (libuv underneath) runs the same asyncio code with a cheaper scheduler and socket layer;
in the benchmark (bench/README.md) it cuts the CPU the connector spends per message.  It is an
optional speed-up, never a requirement: it has no Windows build, and a platform or interpreter
without a wheel gets the stock loop.  ``POP3_CONNECTOR_EVENT_LOOP=asyncio`` forces the stock loop
(for debugging, or to rule uvloop out when something misbehaves); ``uvloop`` asks for uvloop and
``auto`` (or unset) takes uvloop when it can be imported.

Every ``asyncio.run`` in the CLI goes through :func:`run`, so one place decides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from enum import Enum
from typing import Any, Final, TypeVar, assert_never

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_VAR: Final = "POP3_CONNECTOR_EVENT_LOOP"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopChoice(Enum):
    """What ``POP3_CONNECTOR_EVENT_LOOP`` asks for."""

    AUTO = "auto"
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class LoopKind(Enum):
    """The loop :func:`run` uses."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


def requested(env: Mapping[str, str] | None = None) -> LoopChoice:
    """The choice in ``env`` (default: ``os.environ``); an unknown value counts as ``auto``."""
    raw = (os.environ if env is None else env).get(ENV_VAR, "").strip().lower()
    if not raw:
        return LoopChoice.AUTO
    try:
        return LoopChoice(raw)
    except ValueError:
        # A typo must not stop the service; say what was ignored and carry on.
        log.warning("%s=%r is not one of auto, uvloop, asyncio; using auto", ENV_VAR, raw)
        return LoopChoice.AUTO


def _uvloop_factory(platform: str) -> LoopFactory | None:
    if platform == "win32":  # uvloop has no Windows build (its pyproject marker says so too)
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def choose(
    env: Mapping[str, str] | None = None, platform: str = sys.platform
) -> tuple[LoopKind, LoopFactory | None]:
    """The loop :func:`run` will use and its factory (``None``: asyncio's default loop)."""
    choice = requested(env)
    match choice:
        case LoopChoice.ASYNCIO:
            return LoopKind.ASYNCIO, None
        case LoopChoice.AUTO | LoopChoice.UVLOOP:
            factory = _uvloop_factory(platform)
            if factory is None:
                if choice is LoopChoice.UVLOOP:
                    log.warning(
                        "%s=uvloop, but uvloop is not available here; using asyncio", ENV_VAR
                    )
                return LoopKind.ASYNCIO, None
            return LoopKind.UVLOOP, factory
        case _:
            assert_never(choice)


MMAP_THRESHOLD: Final = 16 * 1024 * 1024
"""glibc: a block at least this large gets its own mapping and goes back to the system when
freed (mallopt(3), M_MMAP_THRESHOLD)."""

_M_MMAP_THRESHOLD: Final = -3  # <malloc.h>


def return_large_blocks(platform: str = sys.platform) -> bool:
    """Have glibc give every freed block of MMAP_THRESHOLD or more back to the system at once.

    By default glibc raises its mmap threshold to the size of each large block freed (up to
    32 MiB, mallopt(3)), so the next 25 MiB message is built in the heap, and freed heap
    memory stays with the process: with several large messages in flight the peak grows past
    twice the bytes in flight.  A fixed threshold turns that adjustment off.  At 16 MiB the
    POP3 read buffers of ordinary mail (a few MiB with RETRs pipelined) stay in the heap and
    are reused; a lower threshold maps and unmaps them for every message, which costs CPU.
    bench/README.md has the figures of both (the "large" scenario and the throughput run).
    Returns whether the setting took (Linux with glibc).
    """
    if platform != "linux":
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):  # no ctypes, no C library, no mallopt (musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def run(coro: Coroutine[Any, Any, T], *, env: Mapping[str, str] | None = None) -> T:
    """Run ``coro`` to completion on the chosen loop, as :func:`asyncio.run` does.

    Same contract as ``asyncio.run``: a new loop, remaining tasks cancelled, async generators
    and the default executor shut down, the loop closed.  With the stock loop this *is*
    ``asyncio.run``'s code path (``loop_factory=None`` also makes the loop current, which the
    child watcher of asyncio's subprocess support expects on Python 3.11).
    """
    _, factory = choose(env)
    return_large_blocks()  # idempotent; before the first large buffer
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
