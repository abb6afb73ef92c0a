"""SASL XOAUTH2 for Microsoft 365 and Gmail: the exact exchange, and the token sources in a login
(the sources alone and the config: tests/unit/test_oauth2.py).

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
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from connector.errors import ConfigError, Pop3AuthError, Pop3ConnectionError, Pop3ProtocolError
from connector.oauth2 import OAuth2TokenSource
from connector.pop3 import AuthMethod, Pop3Client, Pop3Endpoint, Pop3Timeouts
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


@pytest.mark.parametrize(
    "challenge",
    [
        base64.b64encode(b"[" * 2500),  # json.loads raises RecursionError
        b"not base64 at all",
        base64.b64encode(b"\xff\xfe not JSON"),
    ],
    ids=["nested", "not-base64", "not-json"],
)
async def test_an_undecodable_error_challenge_is_a_protocol_error(challenge: bytes) -> None:
    # The server's bytes: its protocol error costs its session, never the service (a
    # RecursionError escaping the client was classified as a bug of ours).
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)
        await expect(r, b"AUTH XOAUTH2")
        w.write(b"+ \r\n")
        await expect(r, payload(USER, TOKEN))
        w.write(b"+ " + challenge + b"\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        with pytest.raises(Pop3ProtocolError, match="XOAUTH2 challenge that is not base64 JSON"):
            await pop.login(USER, TOKEN, AuthMethod.XOAUTH2)
        with pytest.raises(Pop3ConnectionError, match="connection unusable"):
            await pop.stat()  # poisoned: nothing else is read from this server


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


async def test_token_command_output_is_used(tmp_path: Path) -> None:
    argv = (sys.executable, "-c", f"print({TOKEN!r})")
    source = OAuth2TokenSource("accounts[0].oauth2_token_command", argv=argv)
    async with serve(accepting([TOKEN])) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login(USER, source, AuthMethod.XOAUTH2)
        assert await pop.stat() == (0, 0)


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
