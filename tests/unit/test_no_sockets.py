"""The guard of tests/unit/conftest.py refuses every socket a unit test would open."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from tests.unit.conftest import GUARD, SocketInUnitTestError


@pytest.mark.parametrize(
    ("family", "address"),
    [(socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_UNIX, "\0pop3-connector-guard")],
)
def test_bind_and_connect_are_refused(
    family: socket.AddressFamily, address: tuple[str, int] | str
) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        with pytest.raises(SocketInUnitTestError, match=r"socket\.bind"):
            s.bind(address)
        with pytest.raises(SocketInUnitTestError, match=r"socket\.connect"):
            s.connect(address)
    assert len(GUARD.refused) == 2
    GUARD.refused.clear()  # the refusals were the point: the teardown must not fail the test


async def test_a_server_on_the_event_loop_is_refused_but_the_loop_runs() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    with pytest.raises(SocketInUnitTestError):
        await asyncio.start_server(serve, "127.0.0.1", 0)
    GUARD.refused.clear()
    await asyncio.sleep(0)  # the loop's own socketpair still wakes it


def test_a_refusal_swallowed_by_the_code_is_still_remembered() -> None:
    with socket.socket() as s, contextlib.suppress(Exception):  # as careless code might
        s.connect(("127.0.0.1", 9))
    assert GUARD.refused
    GUARD.refused.clear()
