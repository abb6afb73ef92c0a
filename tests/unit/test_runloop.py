"""connector.runloop: which loop runs the CLI, and that signals work on it (TLS on it, over
loopback sockets: tests/component/test_runloop.py).

The tests are synchronous on purpose: ``runloop.run`` makes its own loop, which it cannot do
inside pytest-asyncio's running one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
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
