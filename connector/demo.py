"""``pop3-connector demo``: the real connector against built-in loopback servers.

A POP3 mailbox with sample mail and an SMTP sink playing Exchange, which refuses some of it
permanently (sender filtering, a size limit) and greylists one message once.  Two cycles run
through the same code as ``once`` (config file, ledger, dead-letter Maildir), then the demo prints
what happened and where everything is.  Then the service runs as ``run`` does, with an IMAP
account waiting in IDLE on the built-in IMAP server (``connector.loopback_imap``): a message
that arrives there is in "Exchange" a moment later, with no poll.  It needs nothing beyond the
package and a loopback interface, and takes about a second.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from connector.config import load_settings
from connector.cycle import Outcome
from connector.loopback import LoopbackPop3Server, LoopbackSmtpSink
from connector.loopback_imap import LoopbackImapServer
from connector.runtime import build_runtime
from connector.service import Service, open_service

USER = "info@firma.example"
IMAP_USER = "office@firma.example"
PASSWORD = "demo-password"  # noqa: S105 (the built-in demo server's account)
SIZE_LIMIT = 100_000
PUSH_DEADLINE = 30.0  # seconds; the push takes milliseconds
# What the demo shows (README, Quick start): each message's outcome, cycle by cycle, in the
# order of sample_mail().  Anything else is a failure of the demo (exit 1).
EXPECTED: tuple[tuple[int, Outcome], ...] = (
    (1, Outcome.DELIVERED),
    (1, Outcome.DEAD_LETTERED),
    (1, Outcome.DELIVERED),
    (1, Outcome.DEAD_LETTERED),
    (1, Outcome.DEFERRED),
    (1, Outcome.DEAD_LETTERED),
    (1, Outcome.DELIVERED),
    (2, Outcome.DELIVERED),
)


def _mail(sender: str, subject: str, body: str, extra: str = "") -> bytes:
    return (
        f"Return-Path: <{sender}>\r\nFrom: {sender}\r\nTo: {USER}\r\nSubject: {subject}\r\n"
        f"Date: Fri, 27 Nov 2026 15:49:35 +0100\r\nMessage-ID: <{abs(hash(subject))}@demo>\r\n"
        f"{extra}\r\n{body}"
    ).encode()


def sample_mail() -> list[bytes]:
    """The demo mailbox: ordinary mail, spam the sender filter refuses, one over the size limit,
    one from a greylisted sender."""
    attachment = ("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" * 2 + "\r\n") * 2000
    return [
        _mail("orders@supplier.example", "Invoice 2026-1142", "Please find our invoice.\r\n"),
        _mail("newsletter@bulk.example", "Cheap watches!!!", "Buy now.\r\n"),
        _mail(
            "anna@customer.example",
            "Grüße aus Köln",
            "Schöne Grüße,\r\n.a line starting with a dot\r\nAnna\r\n",
            extra="Content-Type: text/plain; charset=utf-8\r\n",
        ),
        _mail("scans@printer.example", "Scan of contract (large)", attachment),
        _mail("new-partner@greylisted.example", "First contact", "Hello!\r\n"),
        _mail("newsletter@bulk.example", "Last chance!!!", "Buy now.\r\n"),
        _mail("it@provider.example", "Maintenance window", "Sunday 02:00-04:00.\r\n"),
    ]


class _Exchange:
    """The sink's rules: Exchange's sender filter, and greylisting of one sender once."""

    def __init__(self) -> None:
        self.greylisted: set[str] = set()

    def __call__(
        self, stage: str, sender: str, recipients: list[str], data: bytes | None
    ) -> str | None:
        if stage == "data" and sender.endswith("@bulk.example"):
            return "554 5.1.0 Sender denied"
        if (
            stage == "rcpt"
            and sender.endswith("@greylisted.example")
            and sender not in self.greylisted
        ):
            self.greylisted.add(sender)
            return "451 4.7.1 Greylisted, please try again later"
        return None


@dataclass
class _Event:
    cycle: int
    uidl: str
    outcome: Outcome
    response: str


@dataclass
class _Recorder:
    """A CycleObserver that keeps what happened, for the printout."""

    cycle: int = 0
    events: list[_Event] = field(default_factory=list)
    imap_delivered: asyncio.Event = field(default_factory=asyncio.Event)

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        if account == "info":
            self.events.append(_Event(self.cycle, uidl, outcome, response))
        elif outcome is Outcome.DELIVERED:
            self.imap_delivered.set()


def _subject(raw: bytes) -> str:
    msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
    return str(msg.get("Subject", "(no subject)"))


def _write_config(state_dir: Path, pop_port: int, smtp_port: int, imap_port: int) -> Path:
    config = state_dir / "config.toml"
    config.write_text(
        f"""# Written by `pop3-connector demo`: the built-in servers on loopback.
[service]
state_dir = "{state_dir}"
log_level = "warning"

[metrics]
listen = ""

[smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
helo_name = "connector.demo"

[[accounts]]
name = "info"
host = "127.0.0.1"
port = {pop_port}
tls = "none"
username = "{USER}"
password = "{PASSWORD}"
deliver_to = ["info@firma.local"]

[[accounts]]
name = "office"
protocol = "imap"                       # an IMAP folder, waiting with IDLE (push)
host = "127.0.0.1"
port = {imap_port}
tls = "none"
username = "{IMAP_USER}"
password = "{PASSWORD}"
deliver_to = ["office@firma.local"]
"""
    )
    config.chmod(0o600)
    return config


async def run_demo(state_dir: Path | None = None) -> int:
    """Run the demo and print a summary; returns the exit status."""
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="pop3-connector-demo-"))
    # --state-dir may name a directory that does not exist yet; the config is written there.
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mail = sample_mail()
    subjects = {}
    pop3 = LoopbackPop3Server({USER: PASSWORD})
    sink = LoopbackSmtpSink(_Exchange(), size_limit=SIZE_LIMIT)
    imap = LoopbackImapServer({IMAP_USER: PASSWORD})
    async with pop3, sink, imap:
        for raw in mail:
            subjects[pop3.add_message(USER, raw)] = _subject(raw)
        config = _write_config(state_dir, pop3.port, sink.port, imap.port)
        runtime = build_runtime(load_settings(config))
        recorder = _Recorder()
        print("pop3-connector demo")
        print(f"  POP3 mailbox {USER} on 127.0.0.1:{pop3.port} with {len(mail)} messages")
        print(
            f"  Exchange played by an SMTP sink on 127.0.0.1:{sink.port}: it refuses "
            f"@bulk.example (554 5.1.0), anything over {SIZE_LIMIT:,} bytes, and greylists "
            "@greylisted.example once"
        )
        results = []
        retrs: list[int] = []
        async with open_service(runtime, observer=recorder) as service:
            for cycle in (1, 2):
                recorder.cycle = cycle
                retrs_before = pop3.commands.count("RETR")
                (result,) = await service.run_once(["info"])
                results.append(result)
                retrs.append(pop3.commands.count("RETR") - retrs_before)
                status = "ok" if result.ok else f"FAILED: {result.error}"
                print(f"\nCycle {cycle} ({result.duration * 1000:.0f} ms, {status})")
                events = [e for e in recorder.events if e.cycle == cycle]
                if not events:
                    print("  nothing new")
                for e in events:
                    label = e.outcome.replace("_", "-")
                    print(f"  {label:<14} {subjects.get(e.uidl, e.uidl)[:32]:<32} {e.response}")
            dead = await service.store.list()
            first = await service.store.get(dead[0].id) if dead else b""
            received = len(sink.messages)
            pushed = await _push(service, imap, recorder)
        left = len(pop3.mailboxes.get(USER, []))
        print(
            f"\nExchange received {received} messages; {len(dead)} are in the "
            f"dead-letter store; {left} left in the POP3 mailbox."
        )
        print(
            f"Cycle 2 downloaded {retrs[1]} message(s): the greylisted one. The refused ones were "
            "dead-lettered and deleted upstream in cycle 1, so they cost nothing again."
        )
        print(f"\nDead letters (a Maildir any mail client can open): {runtime.dead_letter_where}")
        for d in dead:
            print(f"  {d.id}  stage={d.stage:<5} {d.response}")
        if dead:
            print(f"\nThe header lines added at the top of {dead[0].id}:")
            for line in first.split(b"\r\n"):
                if not line.startswith(b"X-POP3-Connector-"):
                    break
                print(f"  {line.decode()}")
        if pushed is not None:
            print(
                f'\nPush: the IMAP account "office" ({IMAP_USER} on 127.0.0.1:{imap.port}) '
                "waited with IDLE (RFC 2177)\n  between its cycles; a message arriving there "
                f"was in Exchange {pushed * 1000:.0f} ms later, though the next poll\n"
                "  was 15 minutes away."
                + ("  The stop ended IDLE with DONE, then LOGOUT." if imap.dones else "")
            )
        else:
            print("\nPush: the IMAP message did not arrive (see the log)")
        print(f"\nConfig used: {config}\nLedger:      {runtime.ledger_path}")
        print(f"See the effective config: pop3-connector --config {config} check")
        shown = tuple((e.cycle, e.outcome) for e in recorder.events)
        delivered = sum(o is Outcome.DELIVERED for _, o in EXPECTED)
        dead_lettered = sum(o is Outcome.DEAD_LETTERED for _, o in EXPECTED)
        ok = (
            all(r.ok for r in results)
            and left == 0
            and shown == EXPECTED
            and (received, len(dead)) == (delivered, dead_lettered)
            and pushed is not None
        )
        if not ok:
            print(
                f"\nThe demo did not end as expected ({delivered} delivered, {dead_lettered} "
                "dead-lettered, none left): this is a bug, please report it with this output."
            )
    return 0 if ok else 1


async def _push(service: Service, imap: LoopbackImapServer, recorder: _Recorder) -> float | None:
    """Run the service as ``run`` does until the IMAP account has collected its first message
    and waits in IDLE; add a message to its folder; return how long it took to be delivered
    (None if it was not, within PUSH_DEADLINE), then stop the service as SIGTERM would."""
    imap.add_message(IMAP_USER, _mail("orders@supplier.example", "Order 1", "Two boxes.\r\n"))
    recorder.cycle = 3
    serving = asyncio.create_task(service.serve())
    try:
        async with asyncio.timeout(PUSH_DEADLINE):
            await recorder.imap_delivered.wait()  # the first cycle took the waiting message
            await imap.idling.wait()  # and the account waits with IDLE
            recorder.imap_delivered.clear()
            started = time.monotonic()
            imap.add_message(
                IMAP_USER, _mail("anna@customer.example", "Urgent: call me", "Thanks!\r\n")
            )
            await recorder.imap_delivered.wait()
            return time.monotonic() - started
    except TimeoutError:
        return None
    finally:
        service.stopping.set()
        await serving
