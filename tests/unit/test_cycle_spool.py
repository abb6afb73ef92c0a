"""The cycle with a spool and a memory budget, on the fakes of its seams (tests/fakes.py):
messages above the threshold are handled from their spool files, and each file goes once its
message is handled, whatever the outcome, a stop included; the budget is all given back
(docs/design.md §5.3, §10.6).  Against Dovecot and an SMTP sink: tests/integration/test_spool.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from connector.budget import MemoryBudget
from connector.cycle import AccountSpec, Cycle, DeliveryPolicy
from connector.deadletter import strip_dead_letter_headers
from connector.errors import DeliveryError, SmtpStage
from connector.pop3 import AuthMethod, Pop3Endpoint
from connector.recipients import SharedMailbox
from connector.smtp import Delivered, Envelope, SenderPolicy
from connector.spool import Spool
from connector.tls import TlsMode
from tests.fakes import Events, FakeDeliverer, FakeLedger, FakeMailbox, InMemoryDeadLetterStore

NOW = 1_800_000_000.0
THRESHOLD = 2_000


def mail(uid: str, size: int) -> bytes:
    head = f"Return-Path: <a@customer.example>\r\nX-Uid: {uid}\r\nSubject: {uid}\r\n\r\n"
    return head.encode() + b".line\r\n" * (size // 7)


class Rig:
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
    rig = Rig(tmp_path)
    sizes = {"small": 100, "big": 50_000, "bigger": 200_000, "tiny": 10}
    for uid, size in sizes.items():
        rig.mailbox.add(mail(uid, size), uidl=uid)
    stats = await rig.cycle(rig.deliverer()).run()
    assert stats.delivered == 4
    assert rig.seen == {uid: mail(uid, size) for uid, size in sizes.items()}
    assert rig.files_seen == [0, 1, 1, 0]  # the large ones from a file; one file at a time
    assert list(rig.spool.directory.iterdir()) == []
    assert rig.budget.in_use == 0
    assert stats.delivered_bytes > sum(sizes.values())


async def test_a_spooled_message_refused_is_dead_lettered_byte_for_byte_and_its_file_goes(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    rig.mailbox.add(mail("big", 60_000), uidl="big")
    stats = await rig.cycle(rig.deliverer(refuse=frozenset({"big"}))).run()
    assert stats.dead_lettered == 1
    (stored,) = rig.store.messages.values()
    assert strip_dead_letter_headers(stored) == mail("big", 60_000)
    assert list(rig.spool.directory.iterdir()) == []
    assert rig.mailbox.messages == []


async def test_a_stop_between_messages_leaves_no_spool_file(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    for uid in ("a", "b", "c"):
        rig.mailbox.add(mail(uid, 30_000), uidl=uid)
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
    rig = Rig(tmp_path)
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
