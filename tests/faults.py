"""Fault injection for the reliability suite: a TCP proxy that misbehaves, and a fake POP3 server.

:class:`FaultProxy` sits on loopback between the connector and a real server (Dovecot, aiosmtpd,
the loopback sink) and forwards bytes both ways until its :class:`Fault` fires: after N bytes in
one direction, or once a byte pattern has passed.  Then it stalls (forwards nothing more, keeps the
sockets open: the client waits for its own deadline), cuts (FIN), resets (RST) or slows every later
chunk down.  It runs in threads, so tests on any event loop, and subprocesses, can use it.

:class:`FakePop3Server` is an ``asyncio.start_server`` POP3 server for the few faults Dovecot and
``connector.loopback`` cannot produce on demand (:class:`Pop3Misbehaviour`).  Everything else is
done with the real servers.

:class:`HoldingProxy` (also importable from ``tests.proxy``) is the original "hold a command"
proxy, now a :class:`FaultProxy` with a STALL fault on a client command.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, assert_never

__all__ = [
    "Action",
    "Direction",
    "FakePop3Server",
    "Fault",
    "FaultProxy",
    "HoldingProxy",
    "Pop3Misbehaviour",
]


class Direction(enum.Enum):
    """Which way bytes flow through the proxy."""

    UP = "client->server"
    DOWN = "server->client"


class Action(enum.Enum):
    """What the proxy does once a fault is triggered."""

    STALL = "stall"  # forward nothing more either way; keep both connections open
    CUT = "cut"  # close both connections (the client sees EOF)
    RESET = "reset"  # abort the client's connection with an RST (SO_LINGER 0)
    DELAY = "delay"  # keep forwarding, but wait ``delay`` seconds before every chunk


@dataclass(frozen=True, slots=True)
class Fault:
    """When and how a connection misbehaves.

    The trigger is counted in ``trigger`` direction, per connection: after ``after_bytes`` bytes,
    or once ``after_pattern`` has passed (``line_start``: only at the start of a line, as a
    command would be).  The bytes before the trigger point are forwarded; the pattern itself only
    with ``forward_trigger``.  ``connection`` limits the fault to the n-th accepted connection
    (0-based); None applies it to every connection.
    """

    action: Action
    trigger: Direction = Direction.DOWN
    after_bytes: int | None = None
    after_pattern: bytes | None = None
    line_start: bool = False
    forward_trigger: bool = True
    delay: float = 0.0
    connection: int | None = None

    def __post_init__(self) -> None:
        if (self.after_bytes is None) == (self.after_pattern is None):
            raise ValueError("give exactly one of after_bytes and after_pattern")


@dataclass(slots=True)
class _Link:
    """One proxied connection: both sockets and whether its fault has fired."""

    index: int
    client: socket.socket
    server: socket.socket
    fault: Fault | None
    fired: bool = False
    counted: dict[Direction, int] = field(default_factory=lambda: dict.fromkeys(Direction, 0))
    tail: bytes = b"\n"  # the last bytes seen in the trigger direction (a stream starts a line)
    lock: threading.Lock = field(default_factory=threading.Lock)


Observer = Callable[[Direction, bytes], None]


class FaultProxy:
    """A loopback TCP proxy to ``upstream`` that injects ``fault``; see the module docstring.

    ``observer`` is called with every chunk before it is forwarded (from the proxy's threads):
    the crash harness counts bytes with it and kills the connector at a chosen byte.
    ``triggered`` is set when a fault fires; ``connections`` counts accepted connections.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        fault: Fault | None = None,
        *,
        observer: Observer | None = None,
    ) -> None:
        self.upstream = upstream
        self.fault = fault
        self.observer = observer
        self.triggered = threading.Event()
        self.connections = 0
        self.upstream_ports: list[int] = []  # local ports of our connections to the upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> Self:
        """Start accepting; returns self."""
        self._accept_thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening, close every connection and join the threads."""
        self._closed = True
        # shutdown() wakes the thread blocked in accept(); close() alone does not (Linux).
        _close(self._listener)
        for link in self._links:
            _close(link.client)
            _close(link.server)
        for t in [self._accept_thread, *self._threads]:
            if t.is_alive():
                t.join(timeout=5)

    def closing(self) -> bool:
        """Whether close() has begun (a method: another thread sets it)."""
        return self._closed

    # -- threads ------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            self.upstream_ports.append(server.getsockname()[1])
            index = self.connections
            self.connections += 1
            fault = self.fault
            if fault is not None and fault.connection is not None and fault.connection != index:
                fault = None
            link = _Link(index, client, server, fault)
            self._links.append(link)
            if self.closing():
                # close() ran while this connection was being set up and may not have seen it
                # (it sets _closed before it closes the links it knows): close it here.
                _close(client)
                _close(server)
                return
            if fault is not None and fault.after_bytes == 0:
                self._fire(link)
            for src, dst, direction in (
                (client, server, Direction.UP),
                (server, client, Direction.DOWN),
            ):
                t = threading.Thread(
                    target=self._pump, args=(link, src, dst, direction), daemon=True
                )
                self._threads.append(t)
                t.start()

    def _fire(self, link: _Link) -> None:
        link.fired = True
        self.triggered.set()
        if link.fault is None:  # pragma: no cover (only called with a fault)
            return
        match link.fault.action:
            case Action.CUT:
                _close(link.client)
                _close(link.server)
            case Action.RESET:
                with contextlib.suppress(OSError):
                    # SO_LINGER with a zero timeout: close() sends RST, not FIN (RFC 793 §3.5).
                    link.client.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                _close(link.client)
                _close(link.server)
            case Action.STALL | Action.DELAY:
                pass  # enforced by the pumps
            case _:
                assert_never(link.fault.action)

    def _split(self, link: _Link, data: bytes, direction: Direction) -> tuple[bytes, bool]:
        """The part of ``data`` to forward before the fault fires, and whether it fires now."""
        fault = link.fault
        if fault is None or link.fired or fault.trigger is not direction:
            return data, False
        if fault.after_bytes is not None:
            room = fault.after_bytes - link.counted[direction]
            link.counted[direction] += len(data)
            if room >= len(data):
                return data, False
            return data[: max(room, 0)], True
        pattern = fault.after_pattern
        assert pattern is not None
        needle = (b"\n" + pattern) if fault.line_start else pattern
        window = link.tail + data
        found = window.upper().find(needle.upper()) if fault.line_start else window.find(needle)
        link.tail = window[-(len(needle) - 1) :] if len(needle) > 1 else b""
        if found < 0:
            return data, False
        start = found + (1 if fault.line_start else 0)  # index of the pattern in window
        end = start + len(pattern)
        offset = len(window) - len(data)  # where data begins in window
        cut = (end if fault.forward_trigger else start) - offset
        return data[: max(cut, 0)], True

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, d: Direction) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.observer is not None:
                    self.observer(d, data)
                with link.lock:
                    forward, fire = self._split(link, data, d)
                    fired_before = link.fired
                fault = link.fault
                if fired_before and fault is not None and fault.action is Action.STALL:
                    continue  # swallow: a stalled peer says nothing
                if fired_before and fault is not None and fault.action is Action.DELAY:
                    time.sleep(fault.delay)
                if forward or not fire:
                    dst.sendall(forward if fire else data)
                if fire:
                    with link.lock:
                        self._fire(link)
                    if fault is not None and fault.action is Action.DELAY:
                        rest = data[len(forward) :]
                        if rest:
                            time.sleep(fault.delay)
                            dst.sendall(rest)
            # EOF from src: pass it on, unless stalled (a stalled peer does not hang up either).
            if not (link.fired and link.fault is not None and link.fault.action is Action.STALL):
                dst.shutdown(socket.SHUT_WR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class HoldingProxy(FaultProxy):
    """Forward everything until the client sends a line starting with ``hold_command``
    (``b"QUIT"``), then go silent: the client now waits at a known instant and a test can kill
    it there.  ``held`` is set at that moment."""

    def __init__(self, upstream: tuple[str, int], hold_command: bytes | None = None) -> None:
        fault = (
            None
            if hold_command is None
            else Fault(
                Action.STALL,
                trigger=Direction.UP,
                after_pattern=hold_command,
                line_start=True,
                forward_trigger=False,
            )
        )
        super().__init__(upstream, fault)
        self.hold_command = hold_command
        self.held = self.triggered


# --------------------------------------------------------------------------------------------
# A fake POP3 server for the faults no real server produces on demand
# --------------------------------------------------------------------------------------------


class Pop3Misbehaviour(enum.Enum):
    """What :class:`FakePop3Server` does wrong (everything else follows RFC 1939)."""

    NONE = "none"
    IN_USE_AT_ONCE = "in-use"  # -ERR [IN-USE] to the login at once (RFC 2449 §8.1.1)
    WRONG_OCTET_COUNT = "octets"  # "+OK 7 octets" to RETR, then the whole (longer) message
    LINE_WITHOUT_END = "no-eol"  # the UIDL listing's status line never ends
    DUPLICATE_UIDLS = "dup-uidl"  # two messages listed with the same unique-id
    NO_GREETING = "no-greeting"  # accepts the connection, never says anything
    GARBAGE_AFTER_OK = "garbage"  # the reply to STAT is "+OK" followed by binary garbage lines
    EOF_IN_MESSAGE = "eof-in-message"  # RETR sends half the message, then closes


class FakePop3Server:
    """A small honest POP3 server on loopback (``asyncio.start_server``, port 0) with one
    :class:`Pop3Misbehaviour`.  ``deleted`` lists the message numbers removed at QUIT."""

    def __init__(
        self,
        messages: list[bytes],
        misbehaviour: Pop3Misbehaviour = Pop3Misbehaviour.NONE,
        *,
        user: str = "user",
        password: str = "pw",  # noqa: S107 (a fake server's fixed test password)
    ) -> None:
        self.messages = list(messages)
        self.misbehaviour = misbehaviour
        self.user, self.password = user, password
        self.deleted: list[int] = []
        self.commands: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        await self._server.wait_closed()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.append(writer)
        try:
            await self._session(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away: routine for a fault server
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bad = self.misbehaviour
        if bad is Pop3Misbehaviour.NO_GREETING:
            while await reader.read(4096):
                pass
            return
        writer.write(b"+OK fake POP3 ready\r\n")
        marked: set[int] = set()
        logged_in = False
        while line := await reader.readline():
            verb, _, arg = line.decode("utf-8", "replace").strip().partition(" ")
            verb = verb.upper()
            self.commands.append(verb)
            out: bytes
            match verb:
                case "CAPA":
                    out = b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\nRESP-CODES\r\n.\r\n"
                case "USER":
                    out = b"+OK\r\n"
                case "PASS" if bad is Pop3Misbehaviour.IN_USE_AT_ONCE:
                    out = b"-ERR [IN-USE] mailbox locked by another session\r\n"
                case "PASS":
                    logged_in = arg == self.password
                    out = b"+OK logged in\r\n" if logged_in else b"-ERR [AUTH] wrong\r\n"
                case "STAT" if bad is Pop3Misbehaviour.GARBAGE_AFTER_OK:
                    out = b"+OK \xff\xfe\x00garbage\r\n\x01\x02 not a reply\r\n"
                case "STAT":
                    size = sum(len(m) for m in self.messages)
                    out = f"+OK {len(self.messages)} {size}\r\n".encode()
                case "LIST":
                    body = "".join(f"{i} {len(m)}\r\n" for i, m in enumerate(self.messages, 1))
                    out = f"+OK\r\n{body}.\r\n".encode()
                case "UIDL" if bad is Pop3Misbehaviour.LINE_WITHOUT_END:
                    writer.write(b"+OK " + b"x" * 16384)  # and never a line end
                    await writer.drain()
                    while await reader.read(4096):
                        pass
                    return
                case "UIDL":
                    uids = [hashlib.sha256(m).hexdigest()[:20] for m in self.messages]
                    if bad is Pop3Misbehaviour.DUPLICATE_UIDLS and len(uids) > 1:
                        uids[1] = uids[0]
                    body = "".join(f"{i} {u}\r\n" for i, u in enumerate(uids, 1))
                    out = f"+OK\r\n{body}.\r\n".encode()
                case "RETR" if arg.isdigit() and 1 <= int(arg) <= len(self.messages):
                    raw = self.messages[int(arg) - 1]
                    stuffed = b"\r\n".join(
                        b"." + x if x.startswith(b".") else x for x in raw.split(b"\r\n")
                    )
                    octets = 7 if bad is Pop3Misbehaviour.WRONG_OCTET_COUNT else len(raw)
                    out = b"+OK %d octets\r\n" % octets + stuffed + b".\r\n"
                    if bad is Pop3Misbehaviour.EOF_IN_MESSAGE:
                        writer.write(out[: len(out) // 2])
                        await writer.drain()
                        return
                case "DELE" if arg.isdigit():
                    marked.add(int(arg))
                    out = b"+OK\r\n"
                case "QUIT":
                    if logged_in:  # RFC 1939 §6: the UPDATE state
                        self.deleted += sorted(marked)
                    writer.write(b"+OK bye\r\n")
                    await writer.drain()
                    return
                case _:
                    out = b"-ERR unknown command\r\n"
            writer.write(out)
            await writer.drain()
