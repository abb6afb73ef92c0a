"""connector.runloop: which loop runs the CLI, and that signals work on it (TLS on it, over
loopback sockets: tests/component/test_runloop.py).

The tests are synchronous on purpose: ``runloop.run`` makes its own loop, which it cannot do
inside pytest-asyncio's running one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Mapping

import pytest
import uvloop

from connector import runloop
from connector.runloop import ENV_VAR, LoopChoice, LoopKind

AUTO: Mapping[str, str] = {}
STOCK: Mapping[str, str] = {ENV_VAR: "asyncio"}


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_uvloop_by_default_where_it_is_installed() -> None:
    assert runloop.choose(AUTO)[0] is LoopKind.UVLOOP
    assert runloop.run(_loop_type(), env=AUTO) is uvloop.Loop


@pytest.mark.parametrize("value", ["asyncio", " AsyncIO "])
def test_the_env_var_forces_the_stock_loop(value: str) -> None:
    assert runloop.choose({ENV_VAR: value}) == (LoopKind.ASYNCIO, None)
    loop_type = runloop.run(_loop_type(), env={ENV_VAR: value})
    assert loop_type is not uvloop.Loop
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_run_reads_os_environ_when_no_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "asyncio")
    assert runloop.run(_loop_type()) is not uvloop.Loop
    monkeypatch.setenv(ENV_VAR, "uvloop")
    assert runloop.run(_loop_type()) is uvloop.Loop


def test_windows_gets_the_stock_loop() -> None:
    assert runloop.choose(AUTO, platform="win32") == (LoopKind.ASYNCIO, None)


def test_without_uvloop_the_stock_loop_and_a_warning_when_it_was_asked_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    with caplog.at_level(logging.WARNING, logger="connector.runloop"):
        assert runloop.choose(AUTO) == (LoopKind.ASYNCIO, None)
        assert not caplog.records  # auto: no uvloop is no news
        assert runloop.choose({ENV_VAR: "uvloop"}) == (LoopKind.ASYNCIO, None)
    assert "uvloop is not available" in caplog.text


def test_an_unknown_value_is_named_and_counts_as_auto(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="connector.runloop"):
        assert runloop.requested({ENV_VAR: "trio"}) is LoopChoice.AUTO
    assert "'trio'" in caplog.text
    assert runloop.requested({ENV_VAR: ""}) is LoopChoice.AUTO


@pytest.mark.parametrize("env", [AUTO, STOCK], ids=["uvloop", "asyncio"])
def test_run_keeps_asyncio_runs_contract(env: Mapping[str, str]) -> None:
    seen: dict[str, object] = {}

    async def leaves_a_task() -> int:
        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                seen["cancelled"] = True

        seen["task"] = asyncio.create_task(forever())
        seen["loop"] = asyncio.get_running_loop()
        await asyncio.sleep(0)
        return 42

    assert runloop.run(leaves_a_task(), env=env) == 42
    assert seen["cancelled"] is True  # the leftover task was cancelled and awaited
    loop = seen["loop"]
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert loop.is_closed()

    async def fails() -> None:
        raise LookupError("boom")

    with pytest.raises(LookupError, match="boom"):
        runloop.run(fails(), env=env)


@pytest.mark.parametrize("env", [AUTO, STOCK], ids=["uvloop", "asyncio"])
def test_signal_handlers_on_the_chosen_loop(env: Mapping[str, str]) -> None:
    """Service.install_signal_handlers uses loop.add_signal_handler (SIGUSR1 polls now)."""

    async def signalled() -> bool:
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, got.set)
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            async with asyncio.timeout(10):
                await got.wait()
        finally:
            assert loop.remove_signal_handler(signal.SIGUSR1)
        return got.is_set()

    assert runloop.run(signalled(), env=env)


# ---------------------------------------------------------------------------------------------
# return_large_blocks: a freed large message buffer goes back to the system (glibc)
# ---------------------------------------------------------------------------------------------


_PROBE = """
import os
import sys
from connector import runloop
from connector.pop3.protocol import Command, Connection, State, Verb

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

if sys.argv[1] == "tuned":
    assert runloop.return_large_blocks()
conn = Connection(max_message_size=2**30)
conn.receive_data(b"+OK ready\\r\\n")
conn.next_event()
conn._state = State.TRANSACTION
line = b"x" * 76 + b"\\r\\n"
chunk = line * (65536 // len(line))
grown = []
for _ in range(3):
    # A 25 MiB message as the client feeds it to the parser, in 64 KiB reads; then the event
    # that holds it, as the fetcher does while it delivers.
    conn.send(Command(Verb.RETR, (1,)))
    conn.receive_data(b"+OK\\r\\n")
    before = rss_mib()
    for _ in range(25 * 2**20 // len(chunk)):
        conn.receive_data(chunk)
    conn.receive_data(b".\\r\\n")
    event = conn.next_event()
    grown.append(rss_mib() - before)
    del event
print(round(max(grown[1:])))
"""


def _grown(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_a_message_costs_its_size_once_the_read_buffer_is_freed() -> None:
    if platform.libc_ver()[0] != "glibc":
        # Nothing to tune (musl has no mallopt; macOS and Windows are not Linux).
        assert runloop.return_large_blocks() is False
        return
    # While a 25 MiB message is delivered the process should hold it once: the parser's read
    # buffer, freed when the message was taken out of it, goes back to the system.  glibc's
    # default keeps it after the first large message (its threshold has moved up), which the
    # large benchmark scenario saw as 475 MiB of peak RSS.  Both are measured, so the test
    # shows that the setting is what makes the difference.
    assert _grown("tuned") <= 30
    assert _grown("default") >= 45


def test_not_on_other_platforms() -> None:
    assert runloop.return_large_blocks("darwin") is False
    assert runloop.return_large_blocks("win32") is False
