"""Unit tests open no sockets (README, Development): a test that binds, connects or sends to an
address fails, and belongs in tests/component/ (loopback servers in this process) or
tests/integration/ (real servers).

The guard is an audit hook (PEP 578): the socket module raises ``socket.bind``,
``socket.connect``, ``socket.sendto`` and ``socket.sendmsg`` before the system call, in every
thread of this process.  ``socket.socketpair()``, which asyncio's event loop uses to wake itself,
raises none of them, so a unit test may still run a loop.  What the hook cannot see: the sockets
of a child process, and those uvloop opens through libuv; a unit test that starts a child or
runs uvloop does neither with a network (tests/unit/test_runloop.py, test_oauth2.py).
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from typing import Final

import pytest

_EVENTS: Final = frozenset({"socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg"})


class SocketInUnitTestError(RuntimeError):
    """Not an OSError, so that no handler of connection errors in the code under test takes it
    for a refused connection and lets the test pass."""


class SocketGuard:
    """Refuses the socket events above while ``active``, and remembers each one it refused, so
    that a refusal the code under test swallowed (``except Exception``) still fails the test."""

    def __init__(self) -> None:
        self.active = False
        self.refused: list[str] = []

    def __call__(self, event: str, args: tuple[object, ...]) -> None:
        if self.active and event in _EVENTS:
            what = f"{event} to {args[1]!r}" if len(args) > 1 else event
            self.refused.append(what)
            raise SocketInUnitTestError(
                f"a unit test opened a socket ({what}): move it to tests/component or "
                "tests/integration"
            )


GUARD: Final = SocketGuard()
sys.addaudithook(GUARD)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    GUARD.refused.clear()
    GUARD.active = True
    try:
        return (yield)
    finally:
        GUARD.active = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    GUARD.active = True
    try:
        return (yield)
    finally:
        GUARD.active = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    GUARD.active = True
    try:
        result = yield
    finally:
        GUARD.active = False
    if GUARD.refused:
        refused = "; ".join(dict.fromkeys(GUARD.refused))
        GUARD.refused.clear()
        pytest.fail(
            f"a unit test opened a socket ({refused}): move it to tests/component or "
            "tests/integration",
            pytrace=False,
        )
    return result
