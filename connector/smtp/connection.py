"""Our connection on aiosmtplib: a redacted transcript, pipelined replies, and DATA's content
written by us.  Every use of aiosmtplib's private attributes is in this module.

aiosmtplib does the session (connect, implicit TLS, EHLO, STARTTLS, AUTH, RSET, QUIT) through
its public API.  Two things it cannot do, so we do them on its connection:

* **Read a pipelined group's replies** (RFC 2920).  aiosmtplib reads one reply per command it
  sent and drops bytes that arrive while none is awaited, so :class:`_Replies` stands in front
  of the protocol for the group: it appends what arrives to the protocol's own buffer and
  parses it with the protocol's own parser.
* **Write DATA's content** from the pieces of :mod:`connector.smtp.content`, with flow control,
  then read the final reply through the protocol, so that no message is copied or scanned by a
  regular expression (``sendmail()`` does both).

What of aiosmtplib's insides that takes, all on ``aiosmtplib.protocol.SMTPProtocol``
(tests/unit/test_smtp_connection.py fails, naming the attribute, when one changes):

* ``_buffer``: the bytearray of received bytes not yet parsed (``_Replies`` appends to it);
* ``_read_response_from_buffer()``: one complete reply parsed off ``_buffer``, or None;
* ``_drain_helper()``: asyncio's ``FlowControlMixin`` wait while the transport's buffer is
  above its high-water mark (the content writer);
* ``_response_pending``: set while a reply is due, else ``data_received`` drops what arrives
  (set before the content goes out, as ``execute_data_command`` does);
* ``data_received``, ``eof_received``, ``connection_lost``: shadowed by instance attributes
  (``vars(protocol)``) while ``_Replies`` is active, and ``transport.set_protocol(protocol)``
  called again so that uvloop, which caches the bound methods, picks them up (``_rebind``).

and two names of ``aiosmtplib.protocol`` that are not in its ``__all__``: ``MAX_RESPONSE_LENGTH``
(here, the cap on an unfinished reply) and ``normalize_message_line_endings`` (in
:mod:`connector.smtp.content`, for a message with bare line ends).  ``pyproject.toml`` pins
aiosmtplib to the releases on which those tests pass.

Every command but DATA's content and STARTTLS goes through ``execute_command``, which makes it
the one hook for the transcript and for the stage in flight (what a failure is pinned to).
A timeout, a drop or a cancellation in the middle of a reply or of the content leaves the
stream out of step: the connection is closed, never reused (docs/design.md §10.2).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping, Sequence
from typing import Final, Literal, cast

import aiosmtplib
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.typing import Default

from connector.errors import SmtpStage, printable
from connector.smtp.content import (
    Content,
    StreamedContent,
    write_coalesced,
    write_coalesced_async,
)
from connector.smtp.failures import EndOfDataTimeout

__all__ = ["TracingSMTP"]

_STAGE_OF_VERB: Final[Mapping[bytes, SmtpStage]] = {
    b"EHLO": SmtpStage.EHLO,
    b"HELO": SmtpStage.EHLO,
    b"AUTH": SmtpStage.AUTH,
    b"MAIL": SmtpStage.MAIL,
    b"RCPT": SmtpStage.RCPT,
}


async def _write_content(
    protocol: SMTPProtocol, content: Content | StreamedContent, stall: float | None
) -> None:
    """Write the content's pieces with flow control
    (:func:`~connector.smtp.content.write_coalesced`)."""

    async def write(data: bytes | memoryview) -> None:
        # Not isinstance(asyncio.WriteTransport): uvloop's transports do not derive from
        # asyncio's classes, though they offer the same methods.
        transport = cast(asyncio.WriteTransport | None, protocol.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        transport.write(data)
        if transport.get_write_buffer_size():
            # The transport keeps what the socket did not take; wait below its high-water
            # mark (FlowControlMixin, as StreamWriter.drain() does): at most a slice is held.
            async with asyncio.timeout(stall):  # the server stopped reading
                await protocol._drain_helper()

    if isinstance(content, StreamedContent):
        await write_coalesced_async(content.pieces(), write)
    else:
        await write_coalesced(content.pieces(), write)


def _rebind(protocol: SMTPProtocol) -> None:
    """Have the transport take ``protocol``'s methods afresh (uvloop caches them)."""
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        transport.set_protocol(protocol)


class _Replies:
    """Reads the replies to a pipelined group of commands (RFC 2920) off aiosmtplib's protocol.

    aiosmtplib reads one reply per command it sent, and drops bytes that arrive while no reply
    is awaited or while the last one waits to be picked up (``SMTPProtocol.data_received``), so
    it cannot read a pipelined group.  While this context is active, what the server sends is
    appended to the protocol's own buffer (nothing is dropped) and parsed with the protocol's
    own parser, one reply at a time; EOF and a lost connection wake the reader too.  On exit
    the protocol's methods are restored; its reply waiter was never touched, so the next
    ``execute_command`` works as it always does.
    """

    def __init__(self, protocol: SMTPProtocol) -> None:
        self._protocol = protocol
        self._wake = asyncio.Event()
        self._closed = False

    def __enter__(self) -> _Replies:
        protocol = self._protocol
        eof_received, connection_lost = protocol.eof_received, protocol.connection_lost

        def on_eof() -> bool:
            self._closed = True
            self._wake.set()
            return eof_received()

        def on_lost(exc: Exception | None) -> None:
            self._closed = True
            self._wake.set()
            connection_lost(exc)

        # Instance attributes shadow the methods.  asyncio's transports look them up on each
        # call; uvloop's keep the bound ``data_received`` they took when the protocol was set,
        # so set it again: both then call ours (and, in __exit__, the protocol's own again).
        vars(protocol).update(
            data_received=self._data, eof_received=on_eof, connection_lost=on_lost
        )
        _rebind(protocol)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name in ("data_received", "eof_received", "connection_lost"):
            vars(self._protocol).pop(name, None)
        _rebind(self._protocol)

    def _data(self, data: bytes) -> None:
        self._protocol._buffer.extend(data)
        self._wake.set()

    async def next(self, reply_timeout: float | None) -> aiosmtplib.SMTPResponse:
        """The next reply in order; raises SMTPServerDisconnected, SMTPReadTimeoutError, or
        SMTPResponseException for a malformed or overlong reply."""
        protocol = self._protocol
        deadline = None
        while True:
            # Usually the reply is in already (pipelined replies come in one segment): no
            # timer is set up for it.
            response = protocol._read_response_from_buffer()
            if response is not None:
                return response
            if len(protocol._buffer) > MAX_RESPONSE_LENGTH:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            if self._closed or protocol.transport is None:
                raise aiosmtplib.SMTPServerDisconnected("Unexpected EOF received")
            if deadline is None and reply_timeout is not None:
                deadline = asyncio.get_running_loop().time() + reply_timeout
            self._wake.clear()
            try:
                async with asyncio.timeout_at(deadline):  # the whole reply, as aiosmtplib's
                    await self._wake.wait()
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from None


class TracingSMTP(aiosmtplib.SMTP):
    """aiosmtplib.SMTP that remembers the stage in flight and logs a redacted transcript.

    Every command but DATA and STARTTLS goes through ``execute_command``, which makes it the
    one hook for both.  Credentials never reach the log: the arguments of AUTH and every
    line sent after a 334 continuation (RFC 4954 §4) are replaced by ``****``.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        helo_name: str,
        timeout: float,
        implicit_tls: bool,
        context: ssl.SSLContext | None,
        trace: logging.Logger | None,
    ) -> None:
        super().__init__(
            hostname=host,
            port=port,
            local_hostname=helo_name,
            timeout=timeout,
            use_tls=implicit_tls,
            # Never let aiosmtplib decide about STARTTLS: start_tls=None would skip it when not
            # offered.  We send it ourselves after EHLO, or fail (SmtpDeliverer.connect).
            start_tls=False,
            tls_context=context,
        )
        self.stage = SmtpStage.CONNECT
        self._trace = trace
        self._auth_continues = False

    def say(self, direction: Literal["C", "S", "--"], line: str) -> None:
        """One transcript line, at DEBUG, its control characters escaped (server text)."""
        if self._trace is not None:
            self._trace.debug("%s: %s", direction, printable(line))

    def reply(self, response: aiosmtplib.SMTPResponse) -> None:
        """Log a (possibly multi-line) reply the way it looked on the wire."""
        if self._trace is None:
            return  # no transcript: do not even format it (every message passes here)
        lines = response.message.splitlines() or [""]
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self.say("S", f"{response.code}{sep}{line}")

    async def execute_command(
        self,
        *args: bytes,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 (override)
    ) -> aiosmtplib.SMTPResponse:
        verb = args[0].upper() if args else b""
        if verb == b"AUTH":
            mechanism = args[1].decode("ascii", "replace") if len(args) > 1 else ""
            self.say("C", f"AUTH {mechanism} ****" if len(args) > 2 else f"AUTH {mechanism}")
        elif self._auth_continues:
            self.say("C", "****")
        elif self._trace is not None:
            self.say("C", b" ".join(args).decode("ascii", "replace"))
        self.stage = _STAGE_OF_VERB.get(verb, self.stage)
        self._auth_continues = False
        response = await super().execute_command(*args, timeout=timeout)
        self._auth_continues = response.code == 334
        self.reply(response)
        return response

    async def pipeline(
        self, commands: Sequence[tuple[SmtpStage, bytes]], *, reply_timeout: float | None
    ) -> list[aiosmtplib.SMTPResponse]:
        """Send ``commands`` in one write and read their replies in order (RFC 2920 §3.1).

        Each command is ``(stage, line without CRLF)``; the stage is the one in flight while
        its reply is awaited.  A timeout or a drop closes the connection (out of step), as
        ``execute_command`` does; so does a 421 (RFC 5321 §3.8).
        """
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        if self._trace is not None:
            for _, line in commands:
                self.say("C", line.decode("ascii", "replace"))
        responses: list[aiosmtplib.SMTPResponse] = []
        try:
            with _Replies(protocol) as replies:
                protocol.write(b"".join(line + b"\r\n" for _, line in commands))
                for stage, _ in commands:
                    self.stage = stage
                    response = await replies.next(reply_timeout)
                    self.reply(response)
                    responses.append(response)
        except BaseException:
            self.close()
            raise
        if any(r.code == 421 for r in responses):
            self.close()
        return responses

    async def send_content(
        self,
        content: Content | StreamedContent,
        *,
        reply_timeout: float | None,
        final_timeout: float | None,
    ) -> aiosmtplib.SMTPResponse:
        """After a 354: write the content, read the final reply through aiosmtplib's protocol.

        ``content`` comes from :func:`~connector.smtp.content.content_of` (or
        :func:`~connector.smtp.content.streamed_content`, read from its file as it goes).  A
        write that stalls for ``reply_timeout`` raises TimeoutError; no reply to the final
        dot within ``final_timeout`` raises :class:`EndOfDataTimeout` (the connection is closed
        then).
        Raises SMTPDataError unless the reply is 250, aiosmtplib's errors for a drop.
        """
        self.stage = SmtpStage.DATA
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        if self._trace is not None:  # never the body (docs/design.md §11.3)
            if isinstance(content, StreamedContent):
                octets = content.size
            else:
                octets = sum(map(len, content.parts))
            self.say("C", f"<{octets} octets>")
        try:
            # As SMTPProtocol.execute_data_command does: a reply is due from now on, so one
            # that arrives while we still write (a 552, a 421) is kept rather than dropped.
            protocol._response_pending = True
            await _write_content(protocol, content, reply_timeout)
            try:
                response = await protocol.read_response(timeout=final_timeout)
            except aiosmtplib.SMTPReadTimeoutError as exc:
                raise EndOfDataTimeout(final_timeout) from exc
        except BaseException:
            # A timeout, a drop or a cancellation with half a message on the wire: the
            # stream is out of step; never reuse it (aiosmtplib's data() does the same).
            self.close()
            raise
        self.reply(response)
        if response.code == 421:  # RFC 5321 §3.8: the server is closing the session
            self.close()
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response
