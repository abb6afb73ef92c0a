"""SASL XOAUTH2 for Microsoft 365 and Gmail: the token sources (a file, a helper command and
its children) and the config.  The exchange with a server: tests/component/test_oauth2.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from connector import runloop
from connector.config import Settings, load_settings
from connector.errors import ConfigError
from connector.oauth2 import OAuth2TokenSource
from connector.pop3 import AuthMethod
from connector.runloop import ENV_VAR
from connector.runtime import build_runtime

USER = "info@firma.example"
TOKEN = "EwBgA8l6BAAURSN-secret.token_value~42=="  # must never appear in an error or log


# ---------------------------------------------------------------------------------------------
# Token sources
# ---------------------------------------------------------------------------------------------


async def test_token_file_written_by_windows_powershell_has_its_bom_dropped(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(b"\xef\xbb\xbf" + TOKEN.encode() + b"\r\n")  # Set-Content -Encoding utf8
    assert await OAuth2TokenSource("accounts[0].oauth2_token_file", file=token_file)() == TOKEN


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import sys; sys.exit(3)", "the command exited with status 3"),
        ("pass", "no access token (empty output)"),
        (f"print({TOKEN!r}); print('and more')", "the output is not a single OAuth2 access token"),
    ],
)
async def test_failing_token_command_is_a_clear_error(code: str, message: str) -> None:
    source = OAuth2TokenSource(
        "accounts[0].oauth2_token_command", argv=(sys.executable, "-c", code)
    )
    with pytest.raises(ConfigError) as info:
        await source()
    assert str(info.value) == f"accounts[0].oauth2_token_command: {message}"
    assert TOKEN not in str(info.value)


async def test_missing_program_and_missing_file_name_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-helper"
    with pytest.raises(ConfigError, match=r"^accounts\[1\]\.oauth2_token_command: cannot run"):
        await OAuth2TokenSource("accounts[1].oauth2_token_command", argv=(str(missing),))()
    with pytest.raises(ConfigError, match=r"^accounts\[1\]\.oauth2_token_file: cannot read"):
        await OAuth2TokenSource("accounts[1].oauth2_token_file", file=missing)()


async def test_hanging_token_command_is_killed_at_its_timeout() -> None:
    # A 0.2 s deadline against a process that would sleep a minute: a deadline, not a sleep.
    argv = (sys.executable, "-c", "import time; time.sleep(60)")
    source = OAuth2TokenSource("accounts[0].oauth2_token_command", argv=argv, timeout=0.2)
    with pytest.raises(ConfigError, match=r"no token within 0\.2s; the command was killed"):
        await source()


# A helper that forks: its background child inherits stdout and outlives it (a token refresher,
# or `sh -c 'refresh & ...'`).  It writes its own pid ($$: the leader of its process group) and
# the child's ($!) to the file named by $1 before anything else, then prints the token.  The
# child would run a minute, far past each test's bounds; not longer, should a test leak it.
FORKING_HELPER = f'sleep 60 & echo "$$ $!" > "$1"; echo \'{TOKEN}\'; '
LOOPS = [
    pytest.param({ENV_VAR: "uvloop"}, id="uvloop"),
    pytest.param({ENV_VAR: "asyncio"}, id="asyncio"),
]


def forking_helper(pidfile: Path, then: str) -> tuple[str, ...]:
    return ("sh", "-c", FORKING_HELPER + then, "sh", str(pidfile))


def check_loop(env: Mapping[str, str]) -> None:
    # runloop falls back to the stock loop without uvloop; then this case would test nothing new.
    on_uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    assert on_uvloop == (env[ENV_VAR] == "uvloop")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (killed, its parent now init, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return not Path("/proc/self").is_dir()  # Linux: gone meanwhile; elsewhere: no /proc
    return stat.rpartition(")")[2].split()[0] != "Z"  # the field after "(comm)" is the state


def read_pids(pidfile: Path) -> list[int]:
    """The pids the helper wrote: its own and its child's; [] until it has written both."""
    words = pidfile.read_text(encoding="ascii").split() if pidfile.exists() else []
    return [int(w) for w in words] if len(words) == 2 else []


async def helper_pids(pidfile: Path) -> list[int]:
    """The helper's pids, once written.  Polled (bounded): the helper is another process, and
    the file is all it tells us; there is no event to await."""
    async with asyncio.timeout(10):
        while not (pids := read_pids(pidfile)):  # noqa: ASYNC110 (see the docstring)
            await asyncio.sleep(0.01)
    return pids


async def all_gone(pids: list[int]) -> bool:
    """True once none of ``pids`` runs; False if one still does after 10 s.  Polled (bounded):
    the child is not ours to wait for (init reaps it once its parent is gone)."""
    try:
        async with asyncio.timeout(10):
            while any(map(alive, pids)):  # noqa: ASYNC110 (see the docstring)
                await asyncio.sleep(0.01)
    except TimeoutError:
        return False
    return True


def kill_leftovers(pidfile: Path) -> None:
    """Only after a failure is anything left.  Called before the loop closes: uvloop's close()
    blocks, deaf to pytest-timeout, while a child process's pipe is open."""
    for pid in read_pids(pidfile):
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("then", ["wait", "exit 0"], ids=["helper-waits", "helper-exits"])
@pytest.mark.parametrize("env", LOOPS)
def test_a_token_command_whose_child_holds_stdout_is_killed_with_it(
    env: Mapping[str, str], then: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # stdout never reaches EOF while the child lives.  Killing the helper alone left the child
    # running and, on the stock loop, Process.wait() waiting for the pipe to close: a hang.
    pidfile = tmp_path / "pids"
    source = OAuth2TokenSource(
        "accounts[0].oauth2_token_command", argv=forking_helper(pidfile, then), timeout=1.0
    )

    async def attempt() -> ConfigError:
        # The checks run before the loop closes: on uvloop, a pipe left open makes close() fail.
        check_loop(env)
        try:
            # 10 s: only the failure detector; the command's own deadline is 1 s.
            await asyncio.wait_for(source(), 10)
        except ConfigError as exc:
            pids = read_pids(pidfile)
            assert len(pids) == 2, "the helper had not forked by its deadline"
            assert await all_gone(pids), "the helper or its child still runs"
            return exc
        except TimeoutError:
            pytest.fail("the token command hung past its deadline")
        finally:
            kill_leftovers(pidfile)
        pytest.fail("a token from a command that never finished")

    caplog.set_level(logging.DEBUG)
    err = runloop.run(attempt(), env=env)
    assert (
        str(err) == "accounts[0].oauth2_token_command: no token within 1s; the command was killed"
    )
    # The token was printed before the deadline; it is in no error and no log line.
    for text in ["".join(traceback.format_exception(err)), repr(err), caplog.text]:
        assert TOKEN not in text


@pytest.mark.parametrize("when", ["while-starting", "after-start"])
@pytest.mark.parametrize("env", LOOPS)
def test_a_cancelled_token_command_is_killed_with_its_child(
    env: Mapping[str, str], when: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A login cancelled at shutdown (docs/design.md §10.3) must not leave the helper's family
    # behind either: not while it runs, nor while it is being started (the caller has no pid
    # yet then).
    pidfile = tmp_path / "pids"
    source = OAuth2TokenSource(
        "accounts[0].oauth2_token_command", argv=forking_helper(pidfile, "wait"), timeout=60
    )
    real_spawn = asyncio.create_subprocess_exec

    async def attempt() -> None:
        check_loop(env)
        started, gate = asyncio.Event(), asyncio.Event()

        async def spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
            proc = await real_spawn(*args, **kwargs)
            started.set()
            if when == "while-starting":
                await gate.wait()  # the helper runs, but its start has not returned yet
            return proc

        monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
        task = asyncio.create_task(source())
        try:
            pids = await helper_pids(pidfile)
            await started.wait()
            # While starting: the gate holds the start.  After it: usually while the token is
            # read, the start may just be returning; either way the group must end.
            task.cancel()
            gate.set()
            done, _ = await asyncio.wait({task}, timeout=10)  # the failure detector
            if task not in done:
                kill_leftovers(pidfile)  # unblocks the task, so that the loop can close
                await asyncio.wait({task}, timeout=10)
                pytest.fail("the cancelled token command hung")
            assert task.cancelled()  # CancelledError is never swallowed
            assert await all_gone(pids), "the helper or its child still runs"
        finally:
            kill_leftovers(pidfile)

    runloop.run(attempt(), env=env)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

SMTP = '[smtp]\nhost = "exchange.example.local"\n'


def account(*lines: str) -> str:
    body = "\n".join(lines)
    return (
        f'[[accounts]]\nname = "m365"\nhost = "outlook.office365.com"\nusername = "{USER}"\n'
        f'deliver_to = ["info@firma.local"]\n{body}\n'
    )


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(SMTP + text, encoding="utf-8")
    path.chmod(0o600)
    return load_settings(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.problems


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def test_config_token_file_needs_no_password(tmp_path: Path) -> None:
    token_file = tmp_path / "m365.token"
    settings = load(tmp_path, account('auth = "xoauth2"', f'oauth2_token_file = "{token_file}"'))
    (spec,) = build_runtime(settings).accounts
    assert spec.auth is AuthMethod.XOAUTH2
    where = 'accounts[0] (name "m365").oauth2_token_file'
    assert spec.password == OAuth2TokenSource(where, file=token_file)
    # Equal across loads, so a reload that changes nothing does not restart the account.
    assert build_runtime(settings).accounts[0].password == spec.password


def test_config_token_command_is_split_without_a_shell(tmp_path: Path) -> None:
    command = "/usr/local/bin/oauth2-helper --account 'info m365' token"
    settings = load(tmp_path, account('auth = "xoauth2"', f"oauth2_token_command = {command!r}"))
    (spec,) = build_runtime(settings).accounts
    assert isinstance(spec.password, OAuth2TokenSource)
    assert spec.password.argv == tuple(shlex.split(command))
    assert spec.password.argv[2] == "info m365"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            ['auth = "xoauth2"'],
            'accounts[0] (name "m365").oauth2_token_file: auth = "xoauth2" needs exactly one of '
            "oauth2_token_file, oauth2_token_command",
        ),
        (
            ['auth = "xoauth2"', 'oauth2_token_file = "/t"', 'oauth2_token_command = "h"'],
            'accounts[0] (name "m365").oauth2_token_command: auth = "xoauth2" needs exactly one of '
            "oauth2_token_file, oauth2_token_command (got oauth2_token_file, "
            "oauth2_token_command)",
        ),
        (
            ['auth = "xoauth2"', 'oauth2_token_file = "/t"', 'password = "pw"'],
            'accounts[0] (name "m365").password: not used with auth = "xoauth2" '
            "(the token replaces it)",
        ),
        (
            ['password = "pw"', 'oauth2_token_file = "/t"'],
            'accounts[0] (name "m365").oauth2_token_file: only used with auth = "xoauth2"',
        ),
        (
            ['auth = "xoauth2"', 'oauth2_token_command = "helper \'unclosed"'],
            'accounts[0] (name "m365").oauth2_token_command: cannot split into words: '
            "No closing quotation",
        ),
    ],
)
def test_config_validation_names_the_key(tmp_path: Path, lines: list[str], expected: str) -> None:
    assert problems(tmp_path, account(*lines)) == [expected]
