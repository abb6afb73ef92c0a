"""SMTP peers that answer like the servers in front of the mailboxes we deliver to.

Built on aiosmtpd (a real SMTP server, in a thread like tests/servers.py's SmtpSink), each peer
greets and answers EHLO like its model and refuses what the test's ``rule`` says, at MAIL, at RCPT
or after DATA, with the model's own reply texts:

* :func:`exchange_2019`: Exchange Server 2016/2019 (a Default Frontend receive connector on
  port 25): ``X-ANONYMOUSTLS``, ``X-EXPS``, ``CHUNKING``, ``BINARYMIME``, ``XRDST``...
* :func:`exchange_online`: an Exchange Online MX (``*.mail.protection.outlook.com``).
* :func:`postfix`: Postfix in front of Exchange.  With ``smtpd_delay_reject = yes`` (Postfix's
  default) a sender restriction (``check_sender_access``) is answered at RCPT, not at MAIL: the
  refusal names the sender but comes to a recipient, which is what :func:`sender_access` models.

The peers behave like real servers where aiosmtpd's test handler does not: a refused MAIL leaves
no sender behind (the next RCPT gets ``503``), a refused RCPT adds no recipient, and the DSN
parameters we send (RFC 3461 ``RET``, ``NOTIFY``) are taken, as Exchange and Postfix take them
(aiosmtpd 1.4 would refuse them).  We never send BDAT, so CHUNKING is only advertised.  Every
decision is recorded in ``log`` (stage, sender, recipient, reply), probes included.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.servers import LongLineSMTP, ReceivedMail, free_port

# (stage "mail" | "rcpt" | "data", the sender ("" for <>), the recipient at "rcpt", the content
# at "data") -> a reply line to refuse with, or None to accept.
PeerRule = Callable[[str, str, str | None, bytes | None], str | None]

EXCHANGE_2019_EHLO: tuple[str, ...] = (
    "SIZE 37748736",
    "PIPELINING",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "STARTTLS",
    "X-ANONYMOUSTLS",
    "X-EXPS GSSAPI NTLM",
    "8BITMIME",
    "BINARYMIME",
    "CHUNKING",
    "SMTPUTF8",
    "XRDST",
)
EXCHANGE_ONLINE_EHLO: tuple[str, ...] = (
    "SIZE 157286400",
    "PIPELINING",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "STARTTLS",
    "8BITMIME",
    "BINARYMIME",
    "CHUNKING",
    "SMTPUTF8",
)
POSTFIX_EHLO: tuple[str, ...] = (
    "PIPELINING",
    "SIZE 10240000",
    "VRFY",
    "ETRN",
    "STARTTLS",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "DSN",
    "SMTPUTF8",
    "CHUNKING",
)

# Exchange's and Postfix's own reply texts.
EXCHANGE_OK_MAIL = "250 2.1.0 Sender OK"
EXCHANGE_OK_RCPT = "250 2.1.5 Recipient OK"
EXCHANGE_QUEUED = "250 2.6.0 <id@exchange.test> [InternalId=1] Queued mail for delivery"


@dataclass(frozen=True)
class Decision:
    """One MAIL, RCPT or DATA the peer answered."""

    stage: str
    sender: str
    recipient: str | None
    reply: str


class _PeerHandler:
    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the default EHLO does this; a hook must do it itself
        tls_offered = "250-STARTTLS" in responses
        keywords = [k for k in self.peer.ehlo if k != "STARTTLS" or tls_offered]
        peer: object = session.peer  # typed str | None by aiosmtpd; a (host, port) tuple
        client = peer[0] if isinstance(peer, tuple) else "unknown"
        lines = [f"{self.peer.greeting_name} Hello [{client}]", *keywords]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sender = "" if address == "<>" else address
        reply = self.peer.decide("mail", sender, None, None) or self.peer.ok_mail
        if reply.startswith("250"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        reply = self.peer.decide("rcpt", sender, address, None) or self.peer.ok_rcpt
        if reply.startswith("25"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        data = envelope.original_content or b""
        reply = self.peer.decide("data", sender, None, data)
        if reply:
            return reply
        with self.peer.lock:
            self.peer.received.append(
                ReceivedMail(
                    mail_from=sender,
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=data,
                    mail_options=tuple(envelope.mail_options),
                    rcpt_options=tuple(envelope.rcpt_options),
                )
            )
        return self.peer.queued


class _PeerSMTP(LongLineSMTP):
    """Takes the RFC 3461 DSN parameters (aiosmtpd 1.4 refuses them) and drops them."""

    @staticmethod
    def _without(arg: str | None, prefixes: tuple[str, ...]) -> str | None:
        if arg is None:
            return None
        return " ".join(p for p in arg.split(" ") if not p.upper().startswith(prefixes))

    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(self._without(arg, ("RET=", "ENVID=")))

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(self._without(arg, ("NOTIFY=", "ORCPT=")))


class _PeerController(Controller):
    def factory(self) -> SMTP:
        return _PeerSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class SmtpPeer:
    """One scripted SMTP server in a thread; ``rule`` may be replaced while it runs."""

    ehlo: Sequence[str]
    greeting_name: str
    ok_mail: str
    ok_rcpt: str
    queued: str
    rule: PeerRule | None = None
    tls_context: ssl.SSLContext | None = None
    data_size_limit: int = 64 * 1024 * 1024
    received: list[ReceivedMail] = field(default_factory=list)
    log: list[Decision] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    _controller: Controller | None = None

    def decide(self, stage: str, sender: str, recipient: str | None, data: bytes | None) -> str:
        """The refusal for this command, or "" to accept it; logged either way."""
        reply = self.rule(stage, sender, recipient, data) if self.rule is not None else None
        answer = reply or {"mail": self.ok_mail, "rcpt": self.ok_rcpt}.get(stage, self.queued)
        with self.lock:
            self.log.append(Decision(stage, sender, recipient, answer))
        return reply or ""

    def start(self) -> SmtpPeer:
        self.port = free_port()
        kwargs: dict[str, Any] = {"data_size_limit": self.data_size_limit}
        if self.tls_context is not None:
            kwargs.update(tls_context=self.tls_context, require_starttls=False)
        self._controller = _PeerController(
            _PeerHandler(self),
            hostname="127.0.0.1",
            port=self.port,
            server_hostname="localhost",
            enable_SMTPUTF8=True,
            **kwargs,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()

    def __enter__(self) -> SmtpPeer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def decisions(self, stage: str) -> list[Decision]:
        with self.lock:
            return [d for d in self.log if d.stage == stage]


def exchange_2019(rule: PeerRule | None = None, **kwargs: Any) -> SmtpPeer:
    """A peer that answers like Exchange Server 2016/2019's Default Frontend connector."""
    return SmtpPeer(
        ehlo=EXCHANGE_2019_EHLO,
        greeting_name="EX01.firma.local",
        ok_mail=EXCHANGE_OK_MAIL,
        ok_rcpt=EXCHANGE_OK_RCPT,
        queued=EXCHANGE_QUEUED,
        rule=rule,
        data_size_limit=37748736,
        **kwargs,
    )


def exchange_online(rule: PeerRule | None = None, **kwargs: Any) -> SmtpPeer:
    """A peer that answers like an Exchange Online MX."""
    return SmtpPeer(
        ehlo=EXCHANGE_ONLINE_EHLO,
        greeting_name="AM0PR01MB0001.eurprd01.prod.outlook.com",
        ok_mail=EXCHANGE_OK_MAIL,
        ok_rcpt=EXCHANGE_OK_RCPT,
        queued=EXCHANGE_QUEUED,
        rule=rule,
        data_size_limit=157286400,
        **kwargs,
    )


def postfix(rule: PeerRule | None = None, *, pipelining: bool = True, **kwargs: Any) -> SmtpPeer:
    """A peer that answers like Postfix 3.7; without ``pipelining`` it does not offer it."""
    return SmtpPeer(
        ehlo=[k for k in POSTFIX_EHLO if pipelining or k != "PIPELINING"],
        greeting_name="mx.firma.test",
        ok_mail="250 2.1.0 Ok",
        ok_rcpt="250 2.1.5 Ok",
        queued="250 2.0.0 Ok: queued as 4XyZ1",
        rule=rule,
        data_size_limit=10240000,
        **kwargs,
    )


def sender_access(
    denied: Iterable[str],
    *,
    delay_reject: bool = True,
    mailboxes: Iterable[str] | None = None,
) -> PeerRule:
    """Postfix's ``check_sender_access`` with ``REJECT`` for ``denied`` senders, and (with
    ``mailboxes``) ``reject_unlisted_recipient`` for the others.

    ``delay_reject`` (``smtpd_delay_reject``, default yes): the sender restriction is applied
    at RCPT, so the refusal comes to each recipient; with no, at MAIL.
    """
    bad = {s.lower() for s in denied}
    known = None if mailboxes is None else {m.lower() for m in mailboxes}

    def rule(stage: str, sender: str, recipient: str | None, data: bytes | None) -> str | None:
        refused = f"554 5.1.0 <{sender}>: Sender address rejected: Sender denied"
        if stage == ("rcpt" if delay_reject else "mail") and sender.lower() in bad:
            return refused
        if stage == "rcpt" and known is not None and (recipient or "").lower() not in known:
            return (
                f"550 5.1.1 <{recipient}>: Recipient address rejected: "
                "User unknown in virtual mailbox table"
            )
        return None

    return rule
