"""SASL XOAUTH2 for Microsoft 365 and Gmail: the exact exchange, the token sources, the config.

No real server speaks XOAUTH2 without a real identity provider, so a small scripted server on
loopback (asyncio.start_server, port 0) checks every byte the client sends and answers as
outlook.office365.com does: ``+ `` to ``AUTH XOAUTH2``; ``+OK`` to a good payload; to a bad
token a ``+ <base64 JSON>`` error challenge, then ``-ERR`` after the client's empty line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from connector import runloop
from connector.config import Settings, load_settings
from connector.errors import ConfigError, Pop3AuthError, Pop3ProtocolError
from connector.oauth2 import OAuth2TokenSource
from connector.pop3 import AuthMethod, Pop3Client, Pop3Endpoint, Pop3Timeouts
from connector.runloop import ENV_VAR
from connector.runtime import build_runtime
from connector.tls import TlsMode

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

FAST = Pop3Timeouts(connect=2.0, command=2.0, idle_read=2.0)
USER = "info@firma.example"
TOKEN = "EwBgA8l6BAAURSN-secret.token_value~42=="  # must never appear in an error or log
ERROR_JSON = {"status": "401", "schemes": "bearer", "scope": "https://outlook.office.com/"}


def payload(user: str, token: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[Pop3Endpoint]:
    """Run ``handler`` per connection; its assertion failures fail the test."""
    failures: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client hung up, or the test is over
        except Exception as exc:  # noqa: BLE001 (handed to the test below)
            failures.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Pop3Endpoint("127.0.0.1", port, TlsMode.NONE)
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
    if failures:
        raise failures[0]


async def expect(reader: asyncio.StreamReader, line: bytes) -> None:
    got = await reader.readline()
    assert got == line + b"\r\n", got


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"+OK The Microsoft Exchange POP3 service is ready.\r\n")
    await expect(reader, b"CAPA")
    writer.write(b"+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n.\r\n")


async def until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def accepting(tokens: list[str]) -> Handler:
    """A server that accepts exactly ``payload(USER, tokens[i])`` on the i-th connection."""
    sessions = iter(tokens)

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        token = next(sessions)
        await hello(r, w)
        await expect(r, b"AUTH XOAUTH2")  # the two-step form: no initial response
        w.write(b"+ \r\n")
        line = await r.readline()
        assert line == payload(USER, token) + b"\r\n", line
        assert base64.b64decode(line) == f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()
        w.write(b"+OK User successfully authenticated.\r\n")
        await expect(r, b"STAT")
        w.write(b"+OK 0 0\r\n")
        await until_eof(r)

    return script


async def refusing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await hello(r, w)
    await expect(r, b"AUTH XOAUTH2")
    w.write(b"+ \r\n")
    await expect(r, payload(USER, TOKEN))
    w.write(b"+ " + base64.b64encode(json.dumps(ERROR_JSON).encode()) + b"\r\n")
    await expect(r, b"")  # RFC 7628 §3.2.3: the client ends the exchange with an empty line
    w.write(b"-ERR Authentication failure: unknown user name or bad password.\r\n")
    await until_eof(r)


# ---------------------------------------------------------------------------------------------
# The exchange
# ---------------------------------------------------------------------------------------------


async def test_two_step_exchange_with_a_token_string() -> None:
    async with serve(accepting([TOKEN])) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login(USER, TOKEN, AuthMethod.XOAUTH2)
        assert await pop.stat() == (0, 0)


async def test_refused_token_is_an_auth_error_without_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.xoauth2.transcript")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        async with (
            serve(refusing) as ep,
            await Pop3Client.connect(ep, FAST, transcript=logger) as pop,
        ):
            with pytest.raises(Pop3AuthError) as info:
                await pop.login(USER, TOKEN, AuthMethod.XOAUTH2)
    text = str(info.value)
    assert "refused or has expired" in text
    assert "status 401" in text
    assert "bad password" in text  # the server's own words are kept
    assert info.value.command == "AUTH XOAUTH2"
    lines = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert "C: AUTH XOAUTH2" in lines
    assert lines.count("C: ****") == 1  # the payload, redacted
    assert "C: [empty line]" in lines
    secret_forms = (TOKEN, payload(USER, TOKEN).decode())
    for blob in [text, repr(info.value), *lines]:
        assert not any(s in blob for s in secret_forms), blob


async def test_err_without_a_challenge_is_also_an_auth_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)
        await expect(r, b"AUTH XOAUTH2")
        w.write(b"+ \r\n")
        await expect(r, payload(USER, TOKEN))
        w.write(b"-ERR [AUTH] Authentication failed.\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        with pytest.raises(Pop3AuthError) as info:
            await pop.login(USER, TOKEN, AuthMethod.XOAUTH2)
    assert info.value.resp_code == "AUTH"
    assert "refused or has expired" in str(info.value)
    assert TOKEN not in str(info.value)


async def test_a_second_challenge_is_a_protocol_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)
        await expect(r, b"AUTH XOAUTH2")
        w.write(b"+ \r\n")
        await expect(r, payload(USER, TOKEN))
        w.write(b"+ e30=\r\n")
        await expect(r, b"")
        w.write(b"+ e30=\r\n")  # should have been -ERR
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        with pytest.raises(Pop3ProtocolError):
            await pop.login(USER, TOKEN, AuthMethod.XOAUTH2)


# ---------------------------------------------------------------------------------------------
# Token sources
# ---------------------------------------------------------------------------------------------


async def test_token_file_is_read_again_for_every_login(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    source = OAuth2TokenSource("accounts[0].oauth2_token_file", file=token_file)
    first, second = TOKEN, "fresh-token.after_refresh"
    async with serve(accepting([first, second])) as ep:
        token_file.write_text(first + "\n", encoding="utf-8")
        async with await Pop3Client.connect(ep, FAST) as pop:
            await pop.login(USER, source, AuthMethod.XOAUTH2)
            await pop.stat()
        token_file.write_text(second + "\n", encoding="utf-8")  # the helper refreshed it
        async with await Pop3Client.connect(ep, FAST) as pop:
            await pop.login(USER, source, AuthMethod.XOAUTH2)
            await pop.stat()


async def test_token_file_written_by_windows_powershell_has_its_bom_dropped(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(b"\xef\xbb\xbf" + TOKEN.encode() + b"\r\n")  # Set-Content -Encoding utf8
    assert await OAuth2TokenSource("accounts[0].oauth2_token_file", file=token_file)() == TOKEN


async def test_token_command_output_is_used(tmp_path: Path) -> None:
    argv = (sys.executable, "-c", f"print({TOKEN!r})")
    source = OAuth2TokenSource("accounts[0].oauth2_token_command", argv=argv)
    async with serve(accepting([TOKEN])) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login(USER, source, AuthMethod.XOAUTH2)
        assert await pop.stat() == (0, 0)


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


async def test_a_failing_source_stops_the_login_before_auth() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)
        assert await r.readline() == b""  # nothing is sent: the client just hangs up

    async def broken() -> str:
        raise ConfigError("accounts[0].oauth2_token_file: cannot read /x: No such file")

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        with pytest.raises(ConfigError):
            await pop.login(USER, broken, AuthMethod.XOAUTH2)


async def test_other_methods_refuse_a_token_source() -> None:
    async with serve(accepting([TOKEN])) as ep, await Pop3Client.connect(ep, FAST) as pop:
        with pytest.raises(TypeError, match="needs a password"):
            await pop.login(USER, OAuth2TokenSource("k", file=Path("/x")), AuthMethod.USER)


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
    assert spec.password == OAuth2TokenSource("accounts[0].oauth2_token_file", file=token_file)
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
