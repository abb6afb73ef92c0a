"""A cycle of :class:`connector.cycle.Cycle` against real servers, with short deadlines.

The reliability tests put a :class:`~tests.faults.FaultProxy` between the cycle and Dovecot or the
SMTP sink and drive ``Cycle.run()`` directly, so every phase gets a deadline of a fraction of a
second and a stalled server costs the test well under a second.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from connector.cycle import AccountSpec, Cycle, CycleStats, DeliveryPolicy, Outcome
from connector.deadletter.maildir import MaildirStore
from connector.ledger import Ledger
from connector.pop3 import AuthMethod, Pop3Endpoint, Pop3Timeouts
from connector.smtp import SenderPolicy, SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode
from tests.servers import DovecotServer, SmtpSink

SHORT = 0.5  # seconds: every POP3 phase deadline and the SMTP reply timeout
HANG_GUARD = 15.0  # a cycle that takes this long counts as hung
_MID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


def mail(i: int, *, sender: str = "alice@customer.example", body: bytes = b"") -> bytes:
    """A small message with a Message-ID we can find again."""
    return (
        f"Return-Path: <{sender}>\r\nFrom: {sender}\r\nSubject: message {i}\r\n"
        f"Message-ID: <{i}@rig.test>\r\n\r\nBody of message {i}.\r\n"
    ).encode() + body


def message_id(data: bytes) -> str | None:
    m = _MID.search(data)
    return m.group(1).decode() if m else None


@dataclass
class Recorder:
    """A CycleObserver that keeps (uidl, outcome, response)."""

    events: list[tuple[str, Outcome, str]] = field(default_factory=list)

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        self.events.append((uidl, outcome, response))


@dataclass
class Rig:
    dovecot: DovecotServer
    user: str
    password: str
    sink: SmtpSink
    ledger: Ledger
    store: MaildirStore
    work: Path

    def upstream(self) -> list[bytes]:
        return [p.read_bytes() for p in self.dovecot.maildir_files(self.user)]

    def received_ids(self) -> list[str | None]:
        return [message_id(m.data) for m in self.sink.received]

    def spec(
        self,
        *,
        port: int | None = None,
        tls: TlsMode = TlsMode.NONE,
        auth: AuthMethod = AuthMethod.AUTO,
        context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> AccountSpec:
        if port is None:
            port = self.dovecot.ports["pop3s" if tls is TlsMode.IMPLICIT else "pop3"]
        return AccountSpec(
            name="info",
            endpoint=Pop3Endpoint("127.0.0.1", port, tls, context, server_hostname),
            username=self.user,
            password=self.password,
            auth=auth,
            deliver_to=("info@firma.test",),
            max_deferral=5 * 86400.0,
            timeouts=Pop3Timeouts(connect=SHORT, command=SHORT, idle_read=SHORT),
        )

    def cycle(
        self,
        spec: AccountSpec | None = None,
        *,
        smtp_port: int | None = None,
        recorder: Recorder | None = None,
        smtp: SmtpSettings | None = None,
    ) -> Cycle:
        settings = smtp or SmtpSettings(
            "127.0.0.1",
            smtp_port or self.sink.port,
            TlsMode.NONE,
            None,
            "connector.test",
            timeout=SHORT,
            data_termination_timeout=SHORT,
        )
        return Cycle(
            spec or self.spec(),
            ledger=self.ledger,
            store=self.store,
            deliverer=SmtpDeliverer(settings),
            policy=DeliveryPolicy(SenderPolicy.RETURN_PATH, None, "connector.test"),
            observer=recorder or Recorder(),
        )

    async def run(self, cycle: Cycle) -> CycleStats:
        """Run a cycle; fail the test if it does not end within HANG_GUARD seconds."""
        async with asyncio.timeout(HANG_GUARD):
            return await cycle.run()

    async def finish(self) -> CycleStats:
        """A clean cycle, straight to the servers: whatever is left gets done."""
        return await self.run(self.cycle())


@asynccontextmanager
async def make_rig(dovecot: DovecotServer, work: Path) -> AsyncIterator[Rig]:
    user, password = dovecot.add_user()
    sink = SmtpSink().start()
    ledger = await Ledger.open(work / "state" / "ledger.sqlite3")
    try:
        yield Rig(dovecot, user, password, sink, ledger, MaildirStore(work / "dead"), work)
    finally:
        await ledger.close()
        sink.stop()
