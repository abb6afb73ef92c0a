"""Fuzzing the two ways in for hostile bytes, with time and memory bounds (issue 13).

1. **The per-message path**: generated messages (header fields of the kinds we read, values in
   the shapes that break parsers, folding, 8-bit bytes, line-end variants) through routing,
   the envelope sender, Message-ID and duplicate key, the trace line, and a dead letter written
   to a real Maildir and read back.  Each message must pass in bounded time and memory, every
   recipient and sender must be sendable, and the dead letter must give back the original.
2. **The POP3 client and the cycle against a random server**: a loopback server that knows a
   mailbox and answers each command correctly or, where hypothesis says so, with garbage, a
   lie about sizes, an inflated or dripping reply, a duplicate UIDL, an ``-ERR``, a closed
   connection or unsolicited bytes.  The whole cycle (real ledger, fake SMTP) must end within
   its deadline, stay within a memory bound, raise only our own errors, and never DELE (with
   a QUIT) a message whose bytes it did not deliver or dead-letter.

Budget: the plain tests run a fixed number of examples (a few seconds in CI whatever
HYPOTHESIS_PROFILE says); ``-m slow`` runs the long versions (their size is in the
settings below).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.cycle import (
    AccountSpec,
    Cycle,
    DeliveryPolicy,
    duplicate_key,
    error_summary,
    trace_header,
)
from connector.deadletter import (
    DeadLetterInfo,
    parse_dead_letter_headers,
    strip_dead_letter_headers,
)
from connector.deadletter.maildir import MaildirStore
from connector.errors import ConnectorError
from connector.ledger import Ledger, MessageState
from connector.pop3 import AuthMethod, Pop3Endpoint, Pop3Timeouts
from connector.recipients import SharedMailbox, message_id, route
from connector.smtp import Delivered, Envelope, SenderPolicy, address_problem, envelope_sender
from connector.spool import Spooled
from connector.tls import TlsMode
from tests.fakes import InMemoryDeadLetterStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SHARED = SharedMailbox(domains=frozenset({"firma.example"}))
FALLBACK = ("fallback@firma.local",)
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
CI = settings(max_examples=40, deadline=None, suppress_health_check=_HEALTH)
LONG = settings(max_examples=3000, deadline=None, suppress_health_check=_HEALTH)

# --------------------------------------------------------------------------------------------
# 1. The per-message path
# --------------------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    [b"(", b")", b"<", b">", b" ", b'"', b"\\", b"\r\n ", b"@", b".", b",", b":", b";", b"[",
     b"bob@firma.example", b"x@elsewhere.test", b"\xc3\xa9", b"\xff", b"\x00", b"\r", b"\n",
     b"=?utf-8?q?x?=", b"..", b"\r\n.\r\n"]
)  # fmt: skip


@st.composite
def values(draw: st.DrawFn) -> bytes:
    unit = b"".join(draw(st.lists(_PIECES, min_size=1, max_size=5)))
    repeat = draw(st.sampled_from([1, 2, 10, 100, 1000, 20_000]))
    return draw(st.binary(max_size=10)) + unit * repeat + draw(st.binary(max_size=10))


_NAMES = st.sampled_from(
    [b"Return-Path", b"To", b"Cc", b"Delivered-To", b"X-Original-To", b"Message-ID", b"Received",
     b"Subject", b"rEtUrN-pAtH", b"X-\xff", b"To ", b""]
)  # fmt: skip
_EOL = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\t"])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(st.tuples(_NAMES, values(), _EOL), max_size=6))
    head = b"".join(n + b": " + v + e for n, v, e in fields)
    sep = draw(st.sampled_from([b"\r\n", b"\n", b""]))
    return head + sep + draw(st.binary(max_size=200))


def per_message_path(raw: bytes) -> None:
    routing = route(raw, SHARED, FALLBACK)
    assert routing.recipients
    assert all(address_problem(r) is None for r in routing.recipients)
    sender, _ = envelope_sender(raw, SenderPolicy.RETURN_PATH)
    assert sender == "" or address_problem(sender, utf8=True) is None
    mid = message_id(raw)
    assert mid is None or mid.isascii()
    duplicate_key(mid or "<none@x>", raw)
    trace = trace_header(
        raw,
        pop_host="pop.test",
        by_host="me.test",
        uidl="u",
        recipients=routing.recipients,
        now=NOW,
    )
    assert trace.startswith(b"Received: ")


def fuzz_message(raw: bytes, store: MaildirStore) -> None:
    # Time and memory measured apart: tracemalloc slows Python code several times over.
    start = time.perf_counter()
    per_message_path(raw)
    took = time.perf_counter() - start
    assert took < 0.5, f"{took * 1000:.0f} ms for {len(raw)} octets"
    tracemalloc.start()
    try:
        per_message_path(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024 + 4 * len(raw), f"{peak} octets for {len(raw)}"

    # The dead-letter write and read back, with a reply text made of the message itself.
    info = DeadLetterInfo("info", "u1", "error", error_summary(ValueError(raw[:2000])), NOW)
    dl_id = asyncio.run(store.put(raw, info))
    stored = asyncio.run(store.get(dl_id))
    assert strip_dead_letter_headers(stored) == raw
    parsed = parse_dead_letter_headers(stored)
    assert parsed is not None
    assert (parsed[0].stage, parsed[0].response) == ("error", info.response)
    asyncio.run(store.remove(dl_id))


@CI
@given(raw=messages())
def test_fuzz_the_per_message_path(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    fuzz_message(raw, MaildirStore(tmp_path_factory.mktemp("dl")))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@LONG
@given(raw=messages())
def test_fuzz_the_per_message_path_long(
    raw: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fuzz_message(raw, MaildirStore(tmp_path_factory.mktemp("dl")))


# --------------------------------------------------------------------------------------------
# 2. The POP3 client and the cycle against a random server
# --------------------------------------------------------------------------------------------

FAULTS = ["garbage", "truncate", "inflate", "lie_size", "dup_uid", "drip", "err", "close", "extra"]


@dataclass
class Script:
    """The mailbox a server holds, and how it misbehaves: (verb, n-th time) -> fault."""

    mailbox: list[bytes]
    faults: dict[tuple[str, int], str]
    garbage: bytes = b"\x00garbage"
    pipelining: bool = True
    top: bool = True


@dataclass
class Seen:
    """What the server saw and did."""

    commands: list[str] = field(default_factory=list)
    retr_faults: dict[int, str] = field(default_factory=dict)  # message -> fault of its RETR
    deleted: list[int] = field(default_factory=list)  # removed at a QUIT


def _stuff(body: bytes) -> bytes:
    out = body.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


def _multi(body: bytes) -> bytes:
    return b"+OK\r\n" + _stuff(body) + b".\r\n"


@contextlib.asynccontextmanager
async def random_server(script: Script, seen: Seen) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[None]] = set()
    box = [m if m.endswith(b"\r\n") else m + b"\r\n" for m in script.mailbox]

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts: dict[str, int] = {}
        marked: set[int] = set()

        async def send(reply: bytes, fault: str | None) -> bool:
            """Write ``reply`` as ``fault`` says; False ends the session."""
            match fault:
                case None | "lie_size" | "dup_uid":
                    writer.write(reply)
                case "garbage":
                    writer.write(script.garbage + b"\r\n")
                case "truncate":
                    writer.write(reply[: len(reply) // 2])
                    return False
                case "inflate":
                    head, _, rest = reply.partition(b"\r\n")
                    writer.write(head + b"\r\n")
                    chunk = (b"x" * 70 + b"\r\n") * 1000
                    for _ in range(64):  # 4.5 MB, unless the client hangs up first
                        writer.write(chunk)
                        await writer.drain()
                    writer.write(rest)
                case "drip":
                    # A byte at a time, each well within the client's read timeout, and for a
                    # multi-line reply without end: the attack a cycle deadline is for.
                    head, _, rest = reply.partition(b"\r\n")
                    endless = rest != b""
                    data = head + b"\r\n" + (b"x" if endless else b"")
                    i = 0
                    while i < len(data) or endless:
                        writer.write(data[i : i + 1] if i < len(data) else b"x")
                        await writer.drain()
                        await asyncio.sleep(0.02)
                        i += 1
                case "err":
                    writer.write(b"-ERR [SYS/TEMP] not now\r\n")
                case "close":
                    return False
                case "extra":
                    writer.write(reply + b"+OK unsolicited\r\n")
            await writer.drain()
            return True

        writer.write(b"+OK fuzz ready <1.2@fuzz>\r\n")
        while line := await reader.readline():
            words = line.decode("latin-1").split()
            verb = words[0].upper() if words else ""
            seen.commands.append(verb)
            n = counts[verb] = counts.get(verb, 0) + 1
            fault = script.faults.get((verb, n))
            arg = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
            live = [i for i in range(1, len(box) + 1) if i not in marked]
            exists = 1 <= arg <= len(box) and arg not in marked
            reply: bytes
            if verb == "CAPA":
                caps = [b"USER", b"UIDL", b"RESP-CODES"]
                caps += [b"PIPELINING"] if script.pipelining else []
                caps += [b"TOP"] if script.top else []
                reply = _multi(b"".join(c + b"\r\n" for c in caps))
            elif verb in ("USER", "PASS", "NOOP"):
                reply = b"+OK\r\n"
            elif verb == "STAT":
                reply = b"+OK %d %d\r\n" % (len(live), sum(len(box[i - 1]) for i in live))
            elif verb == "LIST" and not arg:
                sizes = [(i, len(box[i - 1])) for i in live]
                if fault == "lie_size":
                    sizes = [(i, s // 10) for i, s in sizes]
                reply = _multi(b"".join(b"%d %d\r\n" % p for p in sizes))
            elif verb == "UIDL" and not arg:
                uids = [(i, b"uid-%d" % (1 if fault == "dup_uid" else i)) for i in live]
                reply = _multi(b"".join(b"%d %s\r\n" % p for p in uids))
            elif verb == "RETR" and exists:
                seen.retr_faults[arg] = fault or "none"
                reply = b"+OK %d octets\r\n" % len(box[arg - 1]) + _stuff(box[arg - 1]) + b".\r\n"
            elif verb == "TOP" and exists and script.top:
                head = box[arg - 1].split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                reply = _multi(head)
            elif verb == "DELE" and exists:
                marked.add(arg)
                reply = b"+OK\r\n"
            elif verb == "RSET":
                marked.clear()
                reply = b"+OK\r\n"
            elif verb == "QUIT":
                if await send(b"+OK bye\r\n", fault if fault in ("close", "garbage") else None):
                    seen.deleted += sorted(marked)
                return
            else:
                reply = b"-ERR what\r\n"
            if not await send(reply, fault):
                return

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await session(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


class Accepting:
    """An SMTP server that takes everything: records each message's bytes."""

    def __init__(self) -> None:
        self.raws: list[bytes] = []

    async def deliver(self, raw: bytes | Spooled, envelope: Envelope, **kw: Any) -> Delivered:
        before: Callable[[], Any] | None = kw.get("before_content")
        if before is not None:
            await before()
        assert isinstance(raw, bytes)  # no spool in these cycles
        self.raws.append(raw)
        return Delivered("250 2.0.0 ok")

    async def close(self) -> None:
        return None


_MAIL = st.sampled_from(
    [
        b"Subject: a\r\n\r\nbody\r\n",
        b"Subject: b\r\n\r\n.\r\n..\r\n.x\r\n",
        b".first line dot\r\n\r\nx\r\n",
        b"To: " + b"(" * 3000 + b"\r\n\r\nx\r\n",
        b"Return-Path: <" + b" <" * 700 + b"\r\n\r\n",
        b"Subject: c\r\n\r\n" + b"y" * 100_000 + b"\r\n",
        b"no header block at all",
    ]
)


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    mailbox = draw(st.lists(_MAIL, max_size=5))
    verbs = st.sampled_from(["CAPA", "USER", "PASS", "STAT", "LIST", "UIDL", "RETR", "TOP",
                             "DELE", "QUIT"])  # fmt: skip
    faults = draw(
        st.dictionaries(st.tuples(verbs, st.integers(1, 3)), st.sampled_from(FAULTS), max_size=3)
    )
    return Script(
        mailbox,
        faults,
        garbage=draw(st.binary(min_size=1, max_size=100).filter(lambda b: b"\n" not in b)),
        pipelining=draw(st.booleans()),
        top=draw(st.booleans()),
    )


async def run_cycle(script: Script, tmp_path: Path, cycles: int = 2) -> None:
    seen = Seen()
    smtp = Accepting()
    store = InMemoryDeadLetterStore()
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        async with random_server(script, seen) as port:
            spec = AccountSpec(
                name="fuzz",
                endpoint=Pop3Endpoint("127.0.0.1", port, TlsMode.NONE),
                username="u",
                password="p",
                auth=AuthMethod.USER,
                deliver_to=("info@firma.local",),
                max_deferral=3600.0,
                timeouts=Pop3Timeouts(connect=2, command=0.3, idle_read=0.3),
                max_message_size=1024 * 1024,
                cycle_timeout=0.6,
            )
            for _ in range(cycles):
                cycle = Cycle(
                    spec,
                    ledger=ledger,
                    store=store,
                    deliverer=smtp,
                    policy=DeliveryPolicy(SenderPolicy.RETURN_PATH, None, "me.test"),
                )
                started = time.monotonic()
                with contextlib.suppress(ConnectorError):  # our errors: allowed
                    async with asyncio.timeout(10):  # the test's limit, far above the cycle's
                        await cycle.run()
                assert time.monotonic() - started < 4  # cycle_timeout and the cleanup after it
        # Never lost: a message deleted by a QUIT was delivered or dead-lettered as it was.
        # (Unless the server forged a reply: bytes sent beside a reply are refused when they
        # come with it, but a server that can forge replies holds the mail anyway.)
        stored = [m if m.endswith(b"\r\n") else m + b"\r\n" for m in script.mailbox]
        forged = "extra" in script.faults.values()
        for number in [] if forged else seen.deleted:
            if seen.retr_faults.get(number, "none") not in ("none", "drip"):
                continue  # the server sent something else than its message: its own lie
            raw = stored[number - 1]
            dead = [strip_dead_letter_headers(d) for d in store.messages.values()]
            assert raw in smtp.raws or raw in dead, (number, raw[:60])
        for entry in (await ledger.sync_listing("fuzz", [f"uid-{i}" for i in range(9)])).values():
            assert entry.state in MessageState
    finally:
        await ledger.close()


def fuzz_server(script: Script, tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        asyncio.run(run_cycle(script, tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A 1 MiB message cap, listings bounded by STAT, RETRs by LIST: a few MiB in flight.
    assert peak < 48 * 1024 * 1024, peak


@settings(max_examples=25, deadline=None, suppress_health_check=_HEALTH)
@given(script=scripts())
def test_fuzz_the_cycle_against_a_random_server(
    script: Script, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fuzz_server(script, tmp_path_factory.mktemp("pop"))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@settings(max_examples=600, deadline=None, suppress_health_check=_HEALTH)
@given(script=scripts())
def test_fuzz_the_cycle_against_a_random_server_long(
    script: Script, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fuzz_server(script, tmp_path_factory.mktemp("pop"))
