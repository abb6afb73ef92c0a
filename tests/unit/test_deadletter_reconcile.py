"""connector.deadletter.reconcile: ReconcilingStore returns an unrecorded dead letter for the
same message only, and gives way to a plain put when it cannot look (the cycle with a ledger
that fails: tests/component/test_cycle_storage_faults.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from connector.deadletter import (
    DeadLetterInfo,
    DeadLetterRecord,
    parse_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.deadletter.maildir import MaildirStore
from connector.deadletter.reconcile import ReconcilingStore
from connector.errors import DeadLetterError
from tests.component.test_cycle_lifecycle import mail
from tests.fakes import InMemoryDeadLetterStore
from tests.unit.test_spool import spooled


def _info(uidl: str, recipients: tuple[str, ...] = (), account: str = "info") -> DeadLetterInfo:
    return DeadLetterInfo(
        account, uidl, "data", "554 5.1.0 Sender denied", datetime(2026, 1, 2, tzinfo=UTC),
        recipients,
    )  # fmt: skip


class CountingStore(InMemoryDeadLetterStore):
    def __init__(self) -> None:
        super().__init__()
        self.list_calls = 0

    async def list(self) -> list[DeadLetterRecord]:
        self.list_calls += 1
        return await super().list()


async def test_an_unrecorded_dead_letter_is_reused_only_for_the_same_message() -> None:
    inner = CountingStore()
    orphan = await inner.put(mail(1), _info("u1"))  # a run killed before the commit
    recorded_one = await inner.put(mail(2), _info("u2"))  # recorded: never reused
    named = await inner.put(mail(3), _info("u3", ("bob@firma.local",)))
    recorded = {recorded_one}

    async def ids() -> frozenset[str]:
        return frozenset(recorded)

    store = ReconcilingStore(inner, ids)
    assert await store.put(mail(1), _info("u1")) == orphan
    # Once matched it is recorded by the caller: the next copy is a new dead letter.
    assert await store.put(mail(1), _info("u1")) != orphan
    assert await store.put(mail(2), _info("u2")) != recorded_one
    # The same UIDL for other bytes (RFC 1939 §7: a server may reuse one), another account,
    # other recipients: other dead letters.
    assert await store.put(mail(9), _info("u3", ("bob@firma.local",))) != named
    assert await store.put(mail(3), _info("u3", ("eve@firma.local",))) != named
    assert await store.put(mail(3), _info("u3", ("bob@firma.local",), "sales")) != named
    assert await store.put(mail(3), _info("u3", ("bob@firma.local",))) == named
    assert inner.list_calls == 1  # one look at the store per process


async def test_reconciling_passes_on_a_store_it_cannot_list() -> None:
    class Unlistable(InMemoryDeadLetterStore):
        async def list(self) -> list[DeadLetterRecord]:
            raise DeadLetterError("memory", "timed out")

    async def ids() -> frozenset[str]:
        return frozenset()

    inner = Unlistable()
    store = ReconcilingStore(inner, ids)
    await store.put(mail(1), _info("u1"))
    assert len(inner.messages) == 1


async def test_reconciling_skips_a_dead_letter_removed_meanwhile() -> None:
    inner = InMemoryDeadLetterStore()
    orphan = await inner.put(mail(1), _info("u1"))

    async def ids() -> frozenset[str]:
        return frozenset()

    store = ReconcilingStore(inner, ids)
    await store.put(mail(5), _info("u5"))  # the scan happens here
    await inner.remove(orphan)  # `dead-letters purge` in another process
    new = await store.put(mail(1), _info("u1"))
    assert new != orphan
    parsed = parse_dead_letter_headers(inner.messages[new])
    assert parsed is not None
    assert inner.messages[new] == with_dead_letter_headers(mail(1), _info("u1"))


async def test_a_spooled_message_left_unrecorded_by_a_kill_is_matched_not_stored_twice(
    tmp_path: Path,
) -> None:
    # docs/design.md §5.3: the match reads a spooled message from its file.
    raw = b"Subject: long line\r\n\r\n" + b"A" * 200_000 + b"\r\n"
    info = _info("u-big")
    inner = MaildirStore(tmp_path / "dead-letters")
    first = await inner.put(await spooled(tmp_path / "a", raw), info)  # then the kill
    other = await inner.put(await spooled(tmp_path / "b", raw + b"x\r\n"), info)

    async def recorded() -> set[str]:
        return {other}

    store = ReconcilingStore(inner, recorded)
    assert await store.put(await spooled(tmp_path / "c", raw + b"y\r\n"), info) not in (
        first,
        other,
    )  # same size class, other bytes: stored
    assert await store.put(await spooled(tmp_path / "d", raw), info) == first
    assert len(await inner.list()) == 3
