"""The cycle on the in-memory fakes of its seams (tests/fakes.py): no sockets, no threads.

What these hold is the order of operations of docs/design.md §5 and §8.5, seen from outside:
every DELE follows the commit of its message's row, the rows of the earlier messages are
committed before a message's content goes out, a failed commit stops the cycle before the next
content, and every outcome is reported and counted once.  The same lifecycle against real
servers: tests/component/test_cycle_lifecycle.py and tests/integration/.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from connector import admin
from connector.budget import MemoryBudget
from connector.cycle import (
    SETTLE_EVERY,
    AccountSpec,
    Cycle,
    DeliveryPolicy,
    GroupCommit,
    Outcome,
    Verdict,
    refusal_summary,
    verdict,
)
from connector.deadletter import DeadLetterInfo, strip_dead_letter_headers
from connector.errors import DeliveryError, Evidence, LedgerError, SmtpStage
from connector.ledger import MessageState, RecipientsDone
from connector.pop3 import AuthMethod, Pop3Endpoint
from connector.recipients import SharedMailbox
from connector.smtp import Delivered, Envelope, SenderPolicy
from connector.spool import Spool
from connector.tls import TlsMode
from tests.fakes import (
    Events,
    FakeDeliverer,
    FakeLedger,
    FakeMailbox,
    InMemoryDeadLetterStore,
)

NOW = 1_800_000_000.0


def mail(uid: str, sender: str = "a@customer.example") -> bytes:
    return f"Return-Path: <{sender}>\r\nX-Uid: {uid}\r\nSubject: {uid}\r\n\r\nbody\r\n".encode()


@dataclass
class Recorder:
    outcomes: list[tuple[str, Outcome]] = field(default_factory=list)

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        self.outcomes.append((uidl, outcome))


@dataclass
class World:
    events: Events = field(default_factory=Events)
    ledger: FakeLedger = field(init=False)
    mailbox: FakeMailbox = field(init=False)
    store: InMemoryDeadLetterStore = field(default_factory=InMemoryDeadLetterStore)
    recorder: Recorder = field(default_factory=Recorder)

    def __post_init__(self) -> None:
        self.ledger = FakeLedger(self.events)
        self.mailbox = FakeMailbox(self.events)

    def add(self, n: int, sender: str = "a@customer.example") -> list[str]:
        return [self.mailbox.add(mail(f"m{i}", sender), uidl=f"m{i}") for i in range(n)]

    def cycle(self, deliverer: FakeDeliverer | None = None, **spec: object) -> Cycle:
        args: dict[str, object] = {
            "name": "info",
            "endpoint": Pop3Endpoint("pop.example", 110, TlsMode.NONE),
            "username": "info",
            "password": "secret",
            "auth": AuthMethod.USER,
            "deliver_to": ("info@firma.local",),
            "max_deferral": 5 * 86400.0,
        }
        args.update(spec)
        return Cycle(
            AccountSpec(**args),  # type: ignore[arg-type]
            ledger=self.ledger,
            store=self.store,
            deliverer=deliverer or FakeDeliverer(self.events),
            policy=DeliveryPolicy(SenderPolicy.RETURN_PATH, None, "connector.test"),
            observer=self.recorder,
            clock=lambda: NOW,
            connect=self.mailbox.connect,
        )


def answering(world: World, by_uid: dict[str, DeliveryError | Delivered]) -> FakeDeliverer:
    """A deliverer that answers per message (by its X-Uid), 250 for the others."""

    def answer(raw: bytes, envelope: Envelope) -> Delivered | DeliveryError:
        for uid, reply in by_uid.items():
            if f"X-Uid: {uid}\r\n".encode() in raw:
                return reply
        return Delivered("250 2.0.0 Ok")

    return FakeDeliverer(world.events, answer)


async def test_every_dele_follows_the_commit_of_its_row() -> None:
    # More messages than one settle batch, and a ledger that commits only when settled.
    world = World()
    uids = world.add(2 * SETTLE_EVERY + 3)
    stats = await world.cycle().run()
    assert stats.delivered == len(uids)
    assert world.mailbox.messages == []
    for uid in uids:
        assert world.events.index_of("commit", uid) < world.events.index_of("DELE", uid), uid
    assert world.events[-1] == ("QUIT", "")


async def test_the_earlier_rows_are_committed_before_the_next_content_goes_out() -> None:
    # docs/design.md §9: a crash may duplicate only the message accepted last.
    world = World()
    uids = world.add(5)
    await world.cycle().run()
    for earlier, later in itertools.pairwise(uids):
        assert world.events.index_of("commit", earlier) < world.events.index_of("content", later)


async def test_a_failed_commit_stops_the_cycle_before_the_next_content() -> None:
    world = World()
    uids = world.add(4)
    world.ledger.fail_commit = {uids[1]}
    with pytest.raises(LedgerError, match="injected"):
        await world.cycle().run()
    # m0 committed and DELEd; m1's row failed: it stays; m2's content waited and never went.
    assert world.mailbox.uidls() == uids[1:]
    assert ("content", uids[2]) not in world.events
    assert world.events[-1] == ("QUIT", "")  # the DELE of m0 takes effect
    assert (await world.ledger.entry("info", uids[1])) is None


async def test_every_outcome_is_reported_and_counted_once() -> None:
    world = World()
    uids = world.add(5)
    # Deferred before for one recipient after the other got it; now both have it.
    world.mailbox.add(mail("dup"), uidl="dup")
    both = ("info@firma.local", "b@firma.local")
    await world.ledger.record_deferred(
        "info", "dup", 10, "451", NOW, done=RecipientsDone(("uidl:dup",), both)
    )
    by_uid: dict[str, DeliveryError | Delivered] = {
        "m1": DeliveryError(SmtpStage.DATA, "Sender denied", smtp_code=554, per_message=True),
        "m2": DeliveryError(SmtpStage.DATA, "try later", smtp_code=451),
        "m3": Delivered(
            "250 2.0.0 Ok",
            refused={"b@firma.local": "550 5.1.1 unknown"},
            permanent=frozenset({"b@firma.local"}),
        ),
    }
    world.events.clear()
    stats = await world.cycle(answering(world, by_uid), deliver_to=both).run()
    reported = collections.Counter(o for _, o in world.recorder.outcomes)
    assert reported == {
        Outcome.DELIVERED: 3,  # m0, m3 (partly), m4
        Outcome.DEAD_LETTERED: 2,  # m1, and m3's copy for b@
        Outcome.DEFERRED: 1,  # m2
        Outcome.SKIPPED: 1,  # dup
    }
    counted = (stats.delivered, stats.dead_lettered, stats.deferred, stats.skipped)
    assert counted == (3, 2, 1, 1)
    # Each finished message DELEd exactly once, after its row; the deferred one stays.
    deles = [uid for kind, uid in world.events if kind == "DELE"]
    assert sorted(deles) == sorted([uids[0], uids[1], uids[3], uids[4], "dup"])
    for uid in deles:
        assert world.events.index_of("commit", uid) < world.events.index_of("DELE", uid)
    assert world.mailbox.uidls() == [uids[2]]
    assert len(world.store.messages) == 2


async def test_leave_on_server_sends_no_dele_whatever_the_outcome() -> None:
    world = World()
    world.add(3)
    by_uid: dict[str, DeliveryError | Delivered] = {
        "m1": DeliveryError(SmtpStage.DATA, "Sender denied", smtp_code=554, per_message=True),
    }
    stats = await world.cycle(answering(world, by_uid), leave_on_server=True).run()
    assert (stats.delivered, stats.dead_lettered) == (2, 1)
    assert [e for e in world.events if e[0] == "DELE"] == []
    assert len(world.mailbox.messages) == 3
    for uid in ("m0", "m1", "m2"):
        entry = await world.ledger.entry("info", uid)
        assert entry is not None
        assert entry.state is not MessageState.DEFERRED


async def test_a_known_message_is_deleted_and_never_sent_again() -> None:
    world = World()
    (uid,) = world.add(1)
    await world.ledger.record_delivered("info", uid, 10, "250 ok", NOW)
    stats = await world.cycle().run()
    assert stats.skipped == 1
    assert [e for e in world.events if e[0] == "content"] == []
    assert world.mailbox.messages == []


# --------------------------------------------------------------------------------------------
# GroupCommit on its own
# --------------------------------------------------------------------------------------------


async def test_group_commit_settles_in_order_and_names_the_first_failure() -> None:
    ledger = FakeLedger()
    commits = GroupCommit(ledger)
    assert not commits.due_before_content()  # nothing waits
    tickets = [
        ledger.record_delivered_soon("a", uid, 1, "250", NOW) for uid in ("u1", "u2", "u3", "u4")
    ]
    ledger.fail_commit = {"u2", "u4"}
    for number, ticket in zip([1, 2, None, 4], tickets, strict=True):
        commits.add(number, ticket)  # None: kept upstream (leave_on_server)
    assert commits.due_before_content()  # not committed yet
    settled = await commits.settle()
    assert settled.committed == [1]  # 2 and 4 failed; 3 has no DELE
    assert settled.failed is not None
    assert "u2" in str(settled.failed)
    assert len(commits) == 0
    assert not commits.due_before_content()


async def test_group_commit_needs_no_wait_once_the_rows_are_committed() -> None:
    ledger = FakeLedger()
    commits = GroupCommit(ledger)
    commits.add(1, ledger.record_delivered_soon("a", "u1", 1, "250", NOW))
    ledger.commit_queued()  # the ledger thread was quicker
    assert not commits.due_before_content()
    ledger.fail_commit = {"u2"}
    commits.add(2, ledger.record_delivered_soon("a", "u2", 1, "250", NOW))
    ledger.commit_queued()
    assert commits.due_before_content()  # committed, but failed: settle and stop
    for _ in range(SETTLE_EVERY - 2):
        commits.add(3, ledger.record_delivered_soon("a", "u3", 1, "250", NOW))
    assert commits.full


# --------------------------------------------------------------------------------------------
# What a refusal means: one verdict for the cycle and for `dead-letters requeue`
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (DeliveryError(SmtpStage.CONNECT, "refused"), Verdict.OUR_SETUP),
        (DeliveryError(SmtpStage.AUTH, "bad", smtp_code=535), Verdict.OUR_SETUP),
        (DeliveryError(SmtpStage.EHLO, "later", smtp_code=421), Verdict.OUR_SETUP),
        (DeliveryError(SmtpStage.MAIL, "auth", smtp_code=530), Verdict.OUR_SETUP),
        (
            DeliveryError(
                SmtpStage.MAIL,
                "denied",
                smtp_code=550,
                per_message=True,
                evidence=Evidence.NO_PROBE,
            ),
            Verdict.UNDECIDED,
        ),
        (
            DeliveryError(
                SmtpStage.MAIL,
                "denied",
                smtp_code=550,
                per_message=True,
                evidence=Evidence.PROBE_ACCEPTED,
            ),
            Verdict.PERMANENT,
        ),
        (
            DeliveryError(
                SmtpStage.MAIL,
                "denied",
                smtp_code=550,
                per_message=True,
                evidence=Evidence.PROBE_REFUSED,
            ),
            Verdict.OUR_SETUP,
        ),
        (
            DeliveryError(SmtpStage.RCPT, "unknown", smtp_code=550, per_message=True),
            Verdict.PERMANENT,
        ),
        (DeliveryError(SmtpStage.RCPT, "unknown", smtp_code=550), Verdict.OUR_SETUP),
        (
            DeliveryError(SmtpStage.DATA, "denied", smtp_code=554, per_message=True),
            Verdict.PERMANENT,
        ),
        (DeliveryError(SmtpStage.DATA, "later", smtp_code=451), Verdict.TEMPORARY),
        (DeliveryError(SmtpStage.DATA, "timed out"), Verdict.TEMPORARY),
    ],
)
def test_verdict(exc: DeliveryError, expected: Verdict) -> None:
    assert verdict(exc) is expected


def test_refusal_summary_names_each_recipient_with_its_reply() -> None:
    assert refusal_summary({"a@x": "550 5.1.1 unknown", "b@x": "452 4.2.2 full"}) == (
        "<a@x> 550 5.1.1 unknown; <b@x> 452 4.2.2 full"
    )
    assert refusal_summary({}) == ""


@pytest.mark.parametrize(
    ("exc", "outcome", "stops"),
    [
        (DeliveryError(SmtpStage.CONNECT, "refused"), admin.Outcome.UNCHANGED, True),
        (DeliveryError(SmtpStage.MAIL, "auth", smtp_code=530), admin.Outcome.UNCHANGED, True),
        (
            DeliveryError(
                SmtpStage.MAIL,
                "denied",
                smtp_code=550,
                per_message=True,
                evidence=Evidence.NO_PROBE,
            ),
            admin.Outcome.UNCHANGED,
            True,
        ),
        (DeliveryError(SmtpStage.DATA, "later", smtp_code=451), admin.Outcome.UNCHANGED, False),
        (
            DeliveryError(SmtpStage.DATA, "denied", smtp_code=554, per_message=True),
            admin.Outcome.REFUSED_AGAIN,
            False,
        ),
    ],
)
async def test_requeue_decides_a_refusal_by_the_cycles_verdict(
    exc: DeliveryError, outcome: admin.Outcome, stops: bool, tmp_path: Path
) -> None:
    """``dead-letters requeue``: our setup (or undecided) stops the batch and keeps the dead
    letter as it was; temporary keeps it; permanent stores it again with the new reason."""
    store = InMemoryDeadLetterStore()
    info = DeadLetterInfo("info", "u1", "data", "554 old", datetime.fromtimestamp(NOW, UTC))
    dl_id = await store.put(mail("u1"), info)
    history = admin._History(SimpleNamespace(ledger_path=tmp_path / "none"))  # type: ignore[arg-type]
    result = await admin._refused_again(store, history, dl_id, info, mail("u1"), exc, NOW)
    assert (result.outcome, result.setup_failed) == (outcome, stops)
    (kept,) = await store.list()
    if outcome is admin.Outcome.REFUSED_AGAIN:
        assert (kept.id != dl_id, kept.response) == (True, exc.response)
    else:
        assert (kept.id, kept.response) == (dl_id, "554 old")


# --------------------------------------------------------------------------------------------
# With a spool and a memory budget (docs/design.md §5.3, §10.6)
# --------------------------------------------------------------------------------------------
# The cycle with a spool and a memory budget, on the fakes of its seams (tests/fakes.py):
# messages above the threshold are handled from their spool files, and each file goes once its
# message is handled, whatever the outcome, a stop included; the budget is all given back
# (docs/design.md §5.3, §10.6).  Against Dovecot and an SMTP sink:
# tests/integration/test_spool.py.


THRESHOLD = 2_000


def spool_mail(uid: str, size: int) -> bytes:
    head = f"Return-Path: <a@customer.example>\r\nX-Uid: {uid}\r\nSubject: {uid}\r\n\r\n"
    return head.encode() + b".line\r\n" * (size // 7)


class SpoolRig:
    def __init__(self, tmp_path: Path) -> None:
        self.events = Events()
        self.ledger = FakeLedger(self.events)
        self.mailbox = FakeMailbox(self.events)
        self.store = InMemoryDeadLetterStore()
        self.spool = Spool(tmp_path / "spool")
        self.spool.clean()
        self.budget = MemoryBudget(4 * THRESHOLD)
        self.seen: dict[str, bytes] = {}  # what the deliverer got, by X-Uid
        self.files_seen: list[int] = []  # spool files present while each message was sent

    def deliverer(self, refuse: frozenset[str] = frozenset()) -> FakeDeliverer:
        def answer(raw: bytes, envelope: Envelope) -> Delivered | DeliveryError:
            uid = raw.split(b"X-Uid: ", 1)[1].split(b"\r\n", 1)[0].decode()
            self.seen[uid] = raw
            self.files_seen.append(len(list(self.spool.directory.iterdir())))
            if uid in refuse:
                return DeliveryError(SmtpStage.DATA, "refused", smtp_code=554, per_message=True)
            return Delivered("250 2.0.0 Ok")

        return FakeDeliverer(self.events, answer)

    def cycle(
        self,
        deliverer: FakeDeliverer,
        stopping: asyncio.Event | None = None,
        shared: SharedMailbox | None = None,
    ) -> Cycle:
        spec = AccountSpec(
            name="info",
            endpoint=Pop3Endpoint("pop.example", 110, TlsMode.NONE),
            username="info",
            password="secret",
            auth=AuthMethod.USER,
            deliver_to=("info@firma.local",),
            max_deferral=5 * 86400.0,
            shared=shared,
        )
        return Cycle(
            spec,
            ledger=self.ledger,
            store=self.store,
            deliverer=deliverer,
            policy=DeliveryPolicy(SenderPolicy.RETURN_PATH, None, "connector.test"),
            clock=lambda: NOW,
            connect=self.mailbox.connect,
            stopping=stopping,
            spool=self.spool,
            spool_threshold=THRESHOLD,
            budget=self.budget,
        )


async def test_large_messages_go_through_the_spool_and_each_file_goes_after_its_message(
    tmp_path: Path,
) -> None:
    rig = SpoolRig(tmp_path)
    sizes = {"small": 100, "big": 50_000, "bigger": 200_000, "tiny": 10}
    for uid, size in sizes.items():
        rig.mailbox.add(spool_mail(uid, size), uidl=uid)
    stats = await rig.cycle(rig.deliverer()).run()
    assert stats.delivered == 4
    assert rig.seen == {uid: spool_mail(uid, size) for uid, size in sizes.items()}
    assert rig.files_seen == [0, 1, 1, 0]  # the large ones from a file; one file at a time
    assert list(rig.spool.directory.iterdir()) == []
    assert rig.budget.in_use == 0
    assert stats.delivered_bytes > sum(sizes.values())


async def test_a_spooled_message_refused_is_dead_lettered_byte_for_byte_and_its_file_goes(
    tmp_path: Path,
) -> None:
    rig = SpoolRig(tmp_path)
    rig.mailbox.add(spool_mail("big", 60_000), uidl="big")
    stats = await rig.cycle(rig.deliverer(refuse=frozenset({"big"}))).run()
    assert stats.dead_lettered == 1
    (stored,) = rig.store.messages.values()
    assert strip_dead_letter_headers(stored) == spool_mail("big", 60_000)
    assert list(rig.spool.directory.iterdir()) == []
    assert rig.mailbox.messages == []


async def test_a_stop_between_messages_leaves_no_spool_file(tmp_path: Path) -> None:
    rig = SpoolRig(tmp_path)
    for uid in ("a", "b", "c"):
        rig.mailbox.add(spool_mail(uid, 30_000), uidl=uid)
    stopping = asyncio.Event()
    deliverer = rig.deliverer()
    answer = deliverer.answer

    def stop_after_first(raw: bytes, envelope: Envelope) -> Delivered | DeliveryError:
        stopping.set()  # SIGTERM while the first is delivered: it finishes, b waits upstream
        return answer(raw, envelope)

    deliverer.answer = stop_after_first
    stats = await rig.cycle(deliverer, stopping).run()
    assert stats.delivered == 1
    assert stats.stopped_early
    assert rig.mailbox.uidls() == ["b", "c"]
    assert list(rig.spool.directory.iterdir()) == []
    assert rig.budget.in_use == 0


async def test_a_shared_mailbox_finds_the_copy_of_a_spooled_message(tmp_path: Path) -> None:
    # The provider's two copies (one per recipient of ours) differ only in their trace
    # fields; both name both recipients: the duplicate key (Message-ID and body digest,
    # taken while spooling) tells the cycle that the second is had by everybody.
    rig = SpoolRig(tmp_path)
    body = b"x" * 40_000 + b"\r\n"
    shared = SharedMailbox(domains=frozenset({"firma.example"}), duplicate_window=86400.0)
    outcomes = []
    for n in range(2):  # the second copy comes in the next cycle
        raw = (
            f"Received: copy {n}\r\nReturn-Path: <s@customer.example>\r\nX-Uid: c{n}\r\n"
            "Message-ID: <one@customer.example>\r\nTo: a@firma.example, b@firma.example\r\n\r\n"
        ).encode() + body
        rig.mailbox.add(raw, uidl=f"c{n}")
        stats = await rig.cycle(rig.deliverer(), shared=shared).run()
        outcomes.append((stats.delivered, stats.skipped))
    assert outcomes == [(1, 0), (0, 1)]
    assert list(rig.spool.directory.iterdir()) == []
