"""What connector/smtp/connection.py takes from aiosmtplib's insides still has the shape it needs.

The connection reads pipelined replies and writes DATA's content on aiosmtplib's protocol,
through attributes that are not aiosmtplib's public API (the list is in connection.py's
docstring).  pyproject.toml pins aiosmtplib to the versions these tests passed on; when an
upgrade changes one of them, the test that fails names the attribute and says what we rely on,
instead of a delivery failing somewhere in the suite (or in production) for no clear reason.

Each test drives the attribute the way connection.py does, on a protocol with a stand-in
transport: no socket, no server.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any, Final

import aiosmtplib
import aiosmtplib.protocol
import pytest
from aiosmtplib.protocol import SMTPProtocol

VERSION: Final = aiosmtplib.__version__
ROOT: Final = Path(__file__).resolve().parents[2]


def need(ok: bool, attribute: str, relied_on: str) -> None:
    """Fail with a message that names the attribute and what connection.py does with it."""
    assert ok, (
        f"aiosmtplib {VERSION}: {attribute} is expected to {relied_on}, and does not. "
        "connector/smtp/connection.py relies on it (see its docstring): adapt it before "
        "changing the aiosmtplib pin in pyproject.toml."
    )


class StandInTransport(asyncio.Transport):
    """Enough of a transport for SMTPProtocol: collects what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closing = True


async def connected() -> tuple[SMTPProtocol, StandInTransport]:
    """A protocol after the greeting was read: no reply due, as between two commands."""
    protocol = SMTPProtocol(loop=asyncio.get_running_loop())
    transport = StandInTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"220 ready\r\n")
    greeting = await protocol.read_response(timeout=1)
    assert greeting.code == 220
    return protocol, transport


async def test_buffer_is_the_bytearray_of_unparsed_bytes() -> None:
    protocol, _ = await connected()
    buffer = getattr(protocol, "_buffer", None)
    need(
        isinstance(buffer, bytearray),
        "SMTPProtocol._buffer",
        "be a bytearray (_Replies appends what arrives to it)",
    )


async def test_read_response_from_buffer_parses_one_reply_at_a_time() -> None:
    protocol, _ = await connected()
    parse = getattr(protocol, "_read_response_from_buffer", None)
    need(
        callable(parse) and not inspect.iscoroutinefunction(parse),
        "SMTPProtocol._read_response_from_buffer",
        "be a plain method (_Replies.next calls it without awaiting)",
    )
    assert parse is not None
    protocol._buffer.extend(b"250-first\r\n250 second\r\n354 go")
    first = parse()
    need(
        first == aiosmtplib.SMTPResponse(250, "first\nsecond") and protocol._buffer == b"354 go",
        "SMTPProtocol._read_response_from_buffer()",
        "return the first complete reply and remove only its bytes from _buffer",
    )
    need(
        parse() is None,
        "SMTPProtocol._read_response_from_buffer()",
        "return None while the next reply is incomplete",
    )
    protocol._buffer.extend(b"\r\n")
    need(
        parse() == aiosmtplib.SMTPResponse(354, "go") and not protocol._buffer,
        "SMTPProtocol._read_response_from_buffer()",
        "parse a reply completed by later bytes",
    )
    protocol._buffer.extend(b"xyz nonsense\r\n")
    with pytest.raises(aiosmtplib.SMTPResponseException):
        parse()  # a malformed reply raises (connection.py lets it end the group)


async def test_drain_helper_waits_while_writing_is_paused() -> None:
    protocol, _ = await connected()
    drain = getattr(protocol, "_drain_helper", None)
    need(
        inspect.iscoroutinefunction(drain),
        "SMTPProtocol._drain_helper",
        "be a coroutine (the content writer awaits it, as StreamWriter.drain() does)",
    )
    assert drain is not None
    await asyncio.wait_for(drain(), 1)  # not paused: at once
    protocol.pause_writing()
    waiting = asyncio.ensure_future(drain())
    await asyncio.sleep(0)
    need(
        not waiting.done(),
        "SMTPProtocol._drain_helper()",
        "wait while the transport has paused writing (pause_writing)",
    )
    protocol.resume_writing()
    await asyncio.wait_for(waiting, 1)


async def test_response_pending_keeps_a_reply_that_arrives_while_we_write() -> None:
    protocol, _ = await connected()
    # connection.py sets it before the content goes out, as execute_data_command does: a 552
    # or 421 that the server sends while we still write must be read, not dropped.
    protocol._response_pending = True
    protocol.data_received(b"552 5.3.4 too big\r\n")
    try:
        reply = await protocol.read_response(timeout=1)
    except aiosmtplib.SMTPReadTimeoutError:
        reply = None
    need(
        reply == aiosmtplib.SMTPResponse(552, "5.3.4 too big"),
        "SMTPProtocol._response_pending = True",
        "make data_received keep a reply that arrives before read_response() is awaited",
    )


async def test_instance_attributes_shadow_the_protocol_callbacks() -> None:
    protocol, _ = await connected()
    names = ("data_received", "eof_received", "connection_lost")
    for name in names:
        need(
            callable(getattr(type(protocol), name, None)),
            f"SMTPProtocol.{name}",
            "be a method of the class",
        )
    need(
        hasattr(protocol, "__dict__"),
        "SMTPProtocol instances' __dict__",
        "exist (_Replies shadows data_received, eof_received, connection_lost in vars())",
    )
    seen: list[bytes] = []
    vars(protocol)["data_received"] = seen.append
    protocol.data_received(b"250 ok\r\n")
    del vars(protocol)["data_received"]
    need(
        seen == [b"250 ok\r\n"],
        "SMTPProtocol.data_received",
        "be shadowed by an instance attribute (a transport calls protocol.data_received)",
    )


async def test_read_response_and_write_take_what_connection_py_passes() -> None:
    protocol, transport = await connected()
    need(
        "timeout" in inspect.signature(protocol.read_response).parameters,
        "SMTPProtocol.read_response(timeout=...)",
        "take a timeout (the final reply's deadline, data_termination_timeout)",
    )
    protocol.write(b"MAIL FROM:<>\r\nRCPT TO:<a@b.c>\r\nDATA\r\n")
    need(
        transport.written == b"MAIL FROM:<>\r\nRCPT TO:<a@b.c>\r\nDATA\r\n",
        "SMTPProtocol.write(data)",
        "write the bytes as they are (a pipelined group goes out in one write)",
    )
    need(
        isinstance(getattr(aiosmtplib.protocol, "MAX_RESPONSE_LENGTH", None), int),
        "aiosmtplib.protocol.MAX_RESPONSE_LENGTH",
        "be an int (_Replies caps an unfinished reply with it)",
    )


def test_normalize_message_line_endings_is_what_sendmail_sends() -> None:
    # Not in aiosmtplib.protocol.__all__: connector/smtp/content.py normalises a message with
    # bare CR or LF through it, so that it arrives exactly as sendmail() would send it.
    normalize = getattr(aiosmtplib.protocol, "normalize_message_line_endings", None)
    need(
        callable(normalize) and normalize(b"a\nb\rc\r\n.d") == b"a\r\nb\r\nc\r\n.d\r\n",
        "aiosmtplib.protocol.normalize_message_line_endings(message)",
        "turn each lone CR or LF into CRLF and end the message with CRLF",
    )


def test_smtp_takes_the_options_and_the_override_connection_py_uses() -> None:
    keywords = ("hostname", "port", "local_hostname", "timeout", "use_tls", "start_tls")
    parameters = inspect.signature(aiosmtplib.SMTP.__init__).parameters
    for keyword in (*keywords, "tls_context"):
        need(keyword in parameters, f"aiosmtplib.SMTP(..., {keyword}=)", "be accepted")
    execute = inspect.signature(aiosmtplib.SMTP.execute_command).parameters
    need(
        [p.kind for p in execute.values()][:2]
        == [inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL]
        and "timeout" in execute,
        "aiosmtplib.SMTP.execute_command(*args, timeout=...)",
        "have this signature (TracingSMTP overrides it)",
    )
    need(
        "protocol" in vars(aiosmtplib.SMTP(hostname="localhost"))
        or isinstance(getattr(aiosmtplib.SMTP, "protocol", None), property),
        "aiosmtplib.SMTP.protocol",
        "hold the SMTPProtocol of the connection",
    )


def test_only_connection_py_touches_the_internals() -> None:
    """Every use of aiosmtplib's private attributes stays in one module, so that this file's
    list is the whole of it."""
    private = re.compile(
        r"\b_buffer\b|_read_response_from_buffer|_drain_helper|_response_pending"
        r"|\bset_protocol\b|\bvars\(\s*(?:self\._)?protocol"
    )
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted(ROOT.glob("connector/**/*.py"))
        if path.name != "connection.py" or path.parent.name != "smtp"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if private.search(line)
    ]
    assert found == [], "aiosmtplib internals touched outside connector/smtp/connection.py"
