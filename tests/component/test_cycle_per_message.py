"""One message costs only itself, and a reused UIDL is a new message (docs/design.md §5.2, §5.1).

Against the loopback POP3 server and SMTP sink, a real ledger and a real Maildir store:

* Issue 13 item 1: an unexpected exception while handling a message leaves it upstream, the
  cycle goes on; after ERROR_LIMIT cycles it is dead-lettered with stage ``error``.  The
  exceptions are injected (generated kinds, at generated places in the mailbox), since the
  parsers that used to raise them are fixed.
* Issue 13 item 3: a server that lists a new message under a UIDL the ledger knows (numbering
  restarted) gets it delivered, not only DELEd: a UIDL that a listing no longer holds is
  forgotten, and a known message this session has not read is DELEd only after a cheap
  identity check (LIST size, then a ``TOP n 0`` digest; RETR on a server without TOP).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import connector.cycle.lifecycle as lifecycle
from connector.cycle import ERROR_LIMIT, Deliverer, Outcome, error_summary
from connector.ledger import MessageState
from connector.smtp import Delivered, Envelope
from connector.spool import Spooled
from tests.component.test_cycle_lifecycle import USER, Recorder, Rig, mail, make_rig

_HYPOTHESIS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# What a parser bug may raise: the RecursionError of the report, and its cousins.
FAILURES: dict[str, Callable[[], Exception]] = {
    "recursion": lambda: RecursionError("maximum recursion depth exceeded"),
    "value": lambda: ValueError("unexpected \x1b[2J input"),
    "unicode": lambda: UnicodeEncodeError("ascii", "é", 0, 1, "ordinal not in range(128)"),
    "index": lambda: IndexError("list index out of range"),
    "memory": MemoryError,
}


def poisoned(i: int, kind: str) -> bytes:
    return mail(i).replace(b"Subject:", b"X-Poison: " + kind.encode() + b"\r\nSubject:", 1)


def run_async(tmp_path: Path, body: Callable[[Rig], Awaitable[None]], **pop: Any) -> None:
    async def main() -> None:
        async for rig in make_rig(tmp_path, **pop):
            await body(rig)

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# Unexpected errors are isolated per message
# --------------------------------------------------------------------------------------------


@_HYPOTHESIS
@given(kinds=st.lists(st.sampled_from(["good", *FAILURES]), min_size=1, max_size=6))
def test_an_unexpected_error_costs_only_its_message(
    kinds: list[str], tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = lifecycle.envelope_sender  # type: ignore[attr-defined]

    def envelope_sender(raw: bytes, *args: Any) -> tuple[str, bool]:
        for kind, make in FAILURES.items():
            if b"X-Poison: " + kind.encode() + b"\r\n" in raw:
                raise make()
        return original(raw, *args)

    monkeypatch.setattr(lifecycle, "envelope_sender", envelope_sender)
    raws = [mail(i) if kind == "good" else poisoned(i, kind) for i, kind in enumerate(kinds)]
    good = [r for r, k in zip(raws, kinds, strict=True) if k == "good"]
    bad = [r for r, k in zip(raws, kinds, strict=True) if k != "good"]

    async def body(rig: Rig) -> None:
        uids = {rig.pop.add_message(USER, raw): raw for raw in raws}
        for cycle in range(1, ERROR_LIMIT + 1):
            rec = Recorder()
            stats = await (await rig.cycle(rec)).run()  # never raises
            delivered = [m.data.split(b"\r\n", 2)[2] for m in rig.sink.messages]
            assert delivered == good  # each once, in order, whatever failed around it
            if cycle < ERROR_LIMIT:
                assert rig.pop.mailboxes[USER] == bad  # still upstream
                assert stats.deferred == len(bad)
                for uid, raw in uids.items():
                    if raw in bad:
                        entry = await rig.ledger.entry("info", uid)
                        assert entry is not None
                        assert (entry.state, entry.errors) == (MessageState.DEFERRED, cycle)
                        assert entry.last_response.startswith("error: ")
        assert rig.pop.mailboxes[USER] == []
        dead = await rig.store.list()
        assert sorted(d.uidl for d in dead) == sorted(u for u, r in uids.items() if r in bad)
        for record in dead:
            assert record.stage == "error"
            kind = uids[record.uidl].split(b"X-Poison: ")[1].split(b"\r\n")[0].decode()
            assert record.response == error_summary(FAILURES[kind]())
            assert "\x1b" not in record.response

    run_async(tmp_path_factory.mktemp("isolated"), body)


def test_error_summary_is_one_escaped_line() -> None:
    summary = error_summary(ValueError("bad\r\n\x1b[31mred\x00" + "x" * 1000))
    assert summary.startswith("ValueError: bad \\x1b[31mred\\x00xxx")
    assert len(summary) <= 300
    assert summary.isascii()
    assert summary.isprintable()
    assert error_summary(MemoryError()) == "MemoryError"


class Failing:
    """A deliverer whose caller's bookkeeping fails after SMTP took a poisoned message."""

    def __init__(self, real: Deliverer) -> None:
        self.real = real

    async def deliver(self, raw: bytes | Spooled, envelope: Envelope, **kw: Any) -> Delivered:
        delivered = await self.real.deliver(raw, envelope, **kw)
        assert isinstance(raw, bytes)  # no spool in these cycles
        if b"X-Poison" in raw:
            raise RuntimeError("bookkeeping bug")
        return delivered

    async def close(self) -> None:
        await self.real.close()


def test_after_its_content_went_to_smtp_a_failing_message_costs_at_most_the_limit(
    tmp_path: Path,
) -> None:
    """A failure after SMTP took the content (a bug in the bookkeeping after it): the server may
    have the message, so it can come again, but at most ERROR_LIMIT times, then it is a dead
    letter; the message behind it is delivered once."""

    async def body(rig: Rig) -> None:
        rig.pop.add_message(USER, poisoned(0, "value"))
        rig.pop.add_message(USER, mail(1))
        for _ in range(ERROR_LIMIT + 1):
            cycle = await rig.cycle()
            cycle.deliverer = Failing(cycle.deliverer)
            await cycle.run()
        subjects = [m.data.split(b"Subject: ")[1][:2] for m in rig.sink.messages]
        assert subjects.count(b"m0") == ERROR_LIMIT
        assert subjects.count(b"m1") == 1
        assert rig.pop.mailboxes[USER] == []
        (dead,) = await rig.store.list()
        assert (dead.stage, dead.response) == ("error", "RuntimeError: bookkeeping bug")

    run_async(tmp_path, body)


def test_ledger_failure_still_stops_the_cycle(tmp_path: Path) -> None:
    """Not the message's fault: the cycle stops as before, nothing isolated or dead-lettered."""
    from connector.errors import LedgerError

    async def body(rig: Rig) -> None:
        rig.pop.add_message(USER, mail(0))
        rig.pop.add_message(USER, mail(1))

        async def failing(*args: Any, **kw: Any) -> Any:
            raise LedgerError("disk full")

        rig.ledger.record_deferred = failing  # type: ignore[method-assign]
        rig.ledger.record_failed = failing  # type: ignore[method-assign]
        rig.ledger.record_delivered_soon = lambda *a, **k: (_ for _ in ()).throw(  # type: ignore[method-assign]
            LedgerError("disk full")
        )
        with pytest.raises(LedgerError):
            await (await rig.cycle()).run()
        assert len(rig.pop.mailboxes[USER]) == 2
        assert await rig.store.list() == []

    run_async(tmp_path, body)


# --------------------------------------------------------------------------------------------
# A reused UIDL is a new message
# --------------------------------------------------------------------------------------------

_HEADS = st.sampled_from(
    [
        b"Return-Path: <a@customer.example>\r\nSubject: s\r\n\r\n",
        b"Return-Path: <a@customer.example>\r\nSubject: t\r\n\r\n",
        b"Return-Path: <b@customer.example>\r\nSubject: s\r\n\r\n",
    ]
)
_BODIES = st.sampled_from([b"one\r\n", b"two\r\n", b"three\r\n", b""])
MESSAGES = st.tuples(_HEADS, _BODIES).map(b"".join)


@_HYPOTHESIS
@given(first=MESSAGES, second=MESSAGES, top=st.booleans())
def test_a_known_uidl_listed_with_another_message_is_delivered(
    first: bytes, second: bytes, top: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The ledger knows U as delivered, the session has not read the message now under U (as
    after a crash before QUIT): it is DELEd only if LIST's size and its header digest match."""
    same = len(first) == len(second) and first.split(b"\r\n\r\n")[0] == second.split(b"\r\n\r\n")[0]

    async def body(rig: Rig) -> None:
        uid = rig.pop.add_message(USER, first)
        await (await rig.cycle(leave_on_server=True)).run()  # delivered, kept upstream
        assert len(rig.sink.messages) == 1
        # The server restarts its numbering: another message under the same UIDL.
        rig.pop._boxes[USER].clear()
        rig.pop.add_message(USER, second, uidl=uid)
        rig.pop.commands.clear()
        rec = Recorder()
        await (await rig.cycle(rec)).run()
        assert rig.pop.mailboxes[USER] == []
        if same:
            assert rec.outcomes() == [Outcome.SKIPPED]
            assert len(rig.sink.messages) == 1
        else:
            assert rec.outcomes() == [Outcome.DELIVERED]
            assert rig.sink.messages[-1].data.split(b"\r\n", 2)[2] == second
        if len(first) == len(second):
            assert ("TOP" if top else "RETR") in rig.pop.commands
        else:
            assert "TOP" not in rig.pop.commands  # the size alone told them apart

    run_async(tmp_path_factory.mktemp("reused"), body, top=top)


@_HYPOTHESIS
@given(first=MESSAGES, second=MESSAGES)
def test_a_uidl_no_longer_listed_is_forgotten(
    first: bytes, second: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """docs/design.md §5.1 step 6: once a cycle's listing no longer holds U, U listed again is
    a new message, whatever it looks like (even a byte-identical one: it is a new arrival)."""

    async def body(rig: Rig) -> None:
        uid = rig.pop.add_message(USER, first)
        await (await rig.cycle()).run()  # delivered, DELEd, QUIT
        await (await rig.cycle()).run()  # the listing no longer holds it
        assert await rig.ledger.entry("info", uid) is None
        rig.pop.add_message(USER, second, uidl=uid)
        rec = Recorder()
        await (await rig.cycle(rec)).run()
        assert rec.outcomes() == [Outcome.DELIVERED]
        assert [m.data.split(b"\r\n", 2)[2] for m in rig.sink.messages] == [first, second]

    run_async(tmp_path_factory.mktemp("forgotten"), body)


def test_the_identity_check_costs_nothing_for_kept_messages(tmp_path: Path) -> None:
    """leave_on_server: the kept messages cost no command per cycle; only those whose
    delete_after has come are checked (one TOP each) and DELEd."""

    async def body(rig: Rig) -> None:
        for i in range(20):
            rig.pop.add_message(USER, mail(i))
        await (await rig.cycle(leave_on_server=True, delete_after=3600.0)).run()
        rig.pop.commands.clear()
        rig.now += 60
        stats = await (await rig.cycle(leave_on_server=True, delete_after=3600.0)).run()
        assert stats.kept == 20
        assert [c for c in rig.pop.commands if c in ("TOP", "RETR", "DELE")] == []
        rig.now += 3600
        stats = await (await rig.cycle(leave_on_server=True, delete_after=3600.0)).run()
        assert stats.removed == 20  # DELEd once delete_after came: "removed", not "skipped"
        assert rig.pop.commands.count("TOP") == 20
        assert rig.pop.mailboxes[USER] == []
        assert len(rig.sink.messages) == 20

    run_async(tmp_path, body)


def test_a_row_from_before_identities_is_trusted(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        uid = rig.pop.add_message(USER, mail(1))
        await rig.ledger.record_delivered("info", uid, 10, "250 ok", rig.now)  # no identity
        rec = Recorder()
        await (await rig.cycle(rec)).run()
        assert rec.outcomes() == [Outcome.SKIPPED]
        assert "TOP" not in rig.pop.commands

    run_async(tmp_path, body)
