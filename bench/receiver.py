"""The benchmark's SMTP receiver: accepts everything, reads DATA in bulk, ACKs at once.

Run as its own process (``python -m bench.receiver``) so that its CPU is never charged to the
client being measured.  It prints ``PORTS <smtp> <control>`` on stdout once it listens, and
exits when its standard input closes (so it cannot outlive the benchmark) or on SIGTERM.

Why not aiosmtpd or ``connector.loopback.LoopbackSmtpSink``: aiosmtpd reads DATA line by line
(about 5x the CPU of a bulk read) and became the ceiling for every client at ~1,500 msg/s on two
cores; the loopback sink reads in bulk but keeps every message in memory (480 MB per run) and
un-stuffs it with a regex.  This receiver keeps only a message's header (for its Message-ID) and
a byte count, and finds the end of DATA with ``bytes.find``.

It sets TCP_QUICKACK after every read: fetchmail writes each line with its own system call and
leaves Nagle on, and against a receiver with normal delayed ACKs it stalls ~40 ms per message.
QUICKACK gives every client its best case (bench-facts.md).  TCP_NODELAY makes our replies leave
at once too.

Messages whose Message-ID starts with ``<poison.`` are refused ``554 5.1.0`` after DATA (the
"poison" scenario); everything else gets ``250``.

Control protocol (one line in, one line out, on the control port): ``RESET`` clears the
counters and answers ``OK``; ``STATS`` answers one JSON object: ``accepted`` (Message-ID ->
count), ``accepted_at`` (Message-ID -> the Unix time of its first 250, for the push scenario's
latencies), ``refused`` (count), ``bytes`` (accepted DATA bytes, dot-stuffed as on the wire),
``transactions``.

``LHLO`` is answered like ``EHLO`` (RFC 2033): getmail forwards over LMTP (its ``MDA_lmtp``),
and with one recipient an LMTP transaction is an SMTP one.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
import time
from collections import Counter
from typing import Final

_TERM: Final = b"\r\n.\r\n"
_HEADER_CAP: Final = 256 * 1024
_MSGID: Final = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
# Above the huge scenario's 150 MiB messages (Exchange Online takes 150 MB): a smaller limit
# would have pop3-connector refuse them itself (RFC 1870) and dead-letter them unsent.
SIZE_LIMIT: Final = 256 * 1024 * 1024
POISON_PREFIX: Final = "<poison."
_QUICKACK: Final = getattr(socket, "TCP_QUICKACK", None)


class Stats:
    """What the receiver saw since the last RESET."""

    def __init__(self) -> None:
        self.accepted: Counter[str] = Counter()
        self.accepted_at: dict[str, float] = {}
        self.refused = 0
        self.bytes = 0
        self.transactions = 0

    def reset(self) -> None:
        """Forget everything seen so far (between two runs)."""
        self.accepted.clear()
        self.accepted_at.clear()
        self.refused = self.bytes = self.transactions = 0

    def as_json(self) -> str:
        return json.dumps(
            {
                "accepted": dict(self.accepted),
                "accepted_at": self.accepted_at,
                "refused": self.refused,
                "bytes": self.bytes,
                "transactions": self.transactions,
            }
        )


def message_id(header: bytes) -> str:
    """The Message-ID in a header block, or "" when there is none."""
    m = _MSGID.search(header)
    return m.group(1).decode("ascii", "replace") if m else ""


class SmtpReceiver(asyncio.Protocol):
    """One client connection: RFC 5321 commands (pipelined, RFC 2920) and bulk DATA."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.in_data = False
        self.header = bytearray()
        self.header_done = False
        self.tail = b""
        self.size = 0
        self.has_rcpt = False
        self.has_mail = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError("a stream transport is expected")
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.sock = sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(b"220 bench.example ESMTP bench receiver\r\n")

    def _quickack(self) -> None:
        # Linux clears QUICKACK on its own after a while; set it again after every read.
        if self.sock is not None and _QUICKACK is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self.sock = None

    def data_received(self, data: bytes) -> None:
        self._quickack()
        replies: list[bytes] = []
        rest = data
        while rest:
            if self.in_data:
                rest = self._data_chunk(rest, replies)
            else:
                self.buf += rest
                rest = self._commands(replies)
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))

    def _commands(self, replies: list[bytes]) -> bytes:
        """Answer every complete command line in the buffer; return bytes that follow DATA."""
        while (i := self.buf.find(b"\n")) >= 0:
            line = bytes(self.buf[: i + 1]).rstrip(b"\r\n")
            del self.buf[: i + 1]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"LHLO"):
                replies.append(
                    b"250-bench.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                    b"250-ENHANCEDSTATUSCODES\r\n250 SIZE %d\r\n" % SIZE_LIMIT
                )
            elif verb == b"HELO":
                replies.append(b"250 bench.example\r\n")
            elif verb == b"MAIL":
                self.has_mail, self.has_rcpt = True, False
                replies.append(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                if self.has_mail:
                    self.has_rcpt = True
                    replies.append(b"250 2.1.5 OK\r\n")
                else:
                    replies.append(b"503 5.5.1 MAIL first\r\n")
            elif verb == b"DATA":
                if not self.has_rcpt:
                    replies.append(b"503 5.5.1 RCPT first\r\n")
                    continue
                replies.append(b"354 go ahead\r\n")
                self.in_data = True
                self.header.clear()
                self.header_done = False
                self.tail = b"\r\n"  # lets an empty message's ".\r\n" match the terminator
                self.size = 0
                rest = bytes(self.buf)
                self.buf.clear()
                return rest
            elif verb in {b"RSET", b"NOOP"}:
                if verb == b"RSET":
                    self.has_mail = self.has_rcpt = False
                replies.append(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 bye\r\n")
                if self.transport is not None:
                    self.transport.write(b"".join(replies))
                    replies.clear()
                    self.transport.close()
                self.buf.clear()
                return b""
            else:
                replies.append(b"500 5.5.2 unknown command\r\n")
        return b""

    def _data_chunk(self, chunk: bytes, replies: list[bytes]) -> bytes:
        """Consume DATA bytes; at the terminator answer and return what follows it."""
        scan = self.tail + chunk
        end = scan.find(_TERM)
        body = chunk if end < 0 else scan[len(self.tail) : end + 2]
        if not self.header_done:
            self.header += body
            if b"\r\n\r\n" in self.header or len(self.header) > _HEADER_CAP or end >= 0:
                self.header_done = True
        self.size += len(body)
        if end < 0:
            self.tail = scan[-4:]
            return b""
        self.in_data = False
        self.has_mail = self.has_rcpt = False
        self.stats.transactions += 1
        mid = message_id(bytes(self.header))
        if mid.startswith(POISON_PREFIX):
            self.stats.refused += 1
            replies.append(b"554 5.1.0 Sender denied\r\n")
        else:
            self.stats.accepted[mid] += 1
            self.stats.accepted_at.setdefault(mid, time.time())
            self.stats.bytes += self.size
            replies.append(b"250 2.0.0 accepted\r\n")
        return scan[end + 5 :]


async def _control(
    stats: Stats, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while line := await reader.readline():
            cmd = line.strip().upper()
            if cmd == b"RESET":
                stats.reset()
                writer.write(b"OK\n")
            elif cmd == b"STATS":
                writer.write(stats.as_json().encode() + b"\n")
            else:
                writer.write(b"ERR\n")
            await writer.drain()
    finally:
        writer.close()


async def serve() -> None:
    """Listen on loopback, print the ports, serve until stdin closes or SIGTERM."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    smtp = await loop.create_server(lambda: SmtpReceiver(stats), "127.0.0.1", 0, backlog=512)
    ctl = await asyncio.start_server(lambda r, w: _control(stats, r, w), "127.0.0.1", 0)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def watch_stdin() -> None:
        while await stdin.read(4096):
            pass
        stop.set()

    watcher = asyncio.create_task(watch_stdin())
    smtp_port = smtp.sockets[0].getsockname()[1]
    ctl_port = ctl.sockets[0].getsockname()[1]
    print(f"PORTS {smtp_port} {ctl_port}", flush=True)
    await stop.wait()
    watcher.cancel()
    smtp.close()
    ctl.close()


def main() -> None:
    """Entry point of ``python -m bench.receiver``."""
    asyncio.run(serve())


if __name__ == "__main__":
    main()
