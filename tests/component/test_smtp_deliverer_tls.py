"""RFC 2920 pipelining over TLS (RFC 3207 STARTTLS, and implicit TLS), on uvloop and asyncio.

``smtp.connection._Replies`` reads a pipelined group's replies by putting itself in front of
aiosmtplib's protocol on the transport (``transport.set_protocol``).  After STARTTLS or with
implicit TLS that transport is the loop's TLS transport, not the socket's, and uvloop has its own
of both; the loopback sink of ``connector.loopback`` speaks neither TLS nor a held-back group, so
the server here is our own, honest and small:

* it offers PIPELINING, SIZE and 8BITMIME (and STARTTLS before TLS, which it then requires:
  ``530`` to MAIL in plaintext);
* it answers nothing of MAIL, the RCPTs and DATA until DATA has arrived, so a client that waits
  for each reply deadlocks and times out: passing proves the group went out pipelined;
* it sends the group's replies in one write (one TLS record), one write each, or in 7-byte
  fragments (a reply spread over records), and answers every accepted RCPT with a two-line
  reply (RFC 5321 §4.2.1), so a reply parser that miscounts lines or loses a fragment gets the
  wrong reply for DATA or for the next message;
* it keeps each transaction's MAIL and RCPT lines and the DATA content exactly as they came,
  and tags every final reply with a number, which ties each ``Delivered`` to its message.

Several messages, refusals among them, go through one SmtpDeliverer, that is one session and
one TLS handshake.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, assert_never

import pytest
import trustme

from connector import runloop
from connector.errors import DeliveryError
from connector.runloop import ENV_VAR
from connector.smtp import Delivered, Envelope, SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode

LOOPS: Final = [
    pytest.param({ENV_VAR: "uvloop"}, id="uvloop"),
    pytest.param({ENV_VAR: "asyncio"}, id="asyncio"),
]
Delivery = Literal["together", "one-per-write", "fragments"]

REFUSED_RCPT: Final = "gone@firma.test"
REFUSED_CONTENT: Final = b"X-Refuse-Me: yes"
FRAGMENT: Final = 7


@dataclass
class Transaction:
    """One MAIL ... DATA the server saw: MAIL as sent (without CRLF), the recipients it
    accepted, and the content."""

    mail: bytes
    accepted: list[str] = field(default_factory=list)
    content: bytes | None = None  # between the 354 and the final ".", dot-stuffed as sent


class PipeliningTlsSink:
    """An SMTP server on loopback that holds back a pipelined group's replies; see the module
    docstring.  ``tls`` is STARTTLS or IMPLICIT; ``delivery`` how the group's replies go out."""

    def __init__(self, context: ssl.SSLContext, tls: TlsMode, delivery: Delivery) -> None:
        self.context, self.tls, self.delivery = context, tls, delivery
        self.port = 0
        self.sessions = 0
        self.commands: list[bytes] = []  # every command line, in order, without CRLF
        self.transactions: list[Transaction] = []
        self.queued = 0
        self.failures: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> PipeliningTlsSink:
        implicit = self.context if self.tls is TlsMode.IMPLICIT else None
        # A big stream limit: readuntil() holds a whole message's content.
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=implicit, limit=2**24
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.sessions += 1
        try:
            await self._session(r, w)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over; the test's asserts will tell
        except Exception as exc:  # noqa: BLE001 (handed to the test)
            self.failures.append(exc)
        finally:
            w.close()

    async def _send(self, w: asyncio.StreamWriter, replies: list[bytes]) -> None:
        data = b"".join(reply + b"\r\n" for reply in replies)
        match self.delivery:
            case "together":
                pieces = [data]
            case "one-per-write":
                pieces = [reply + b"\r\n" for reply in replies]
            case "fragments":
                pieces = [data[i : i + FRAGMENT] for i in range(0, len(data), FRAGMENT)]
            case _:
                assert_never(self.delivery)
        for piece in pieces:
            w.write(piece)
            await w.drain()  # each piece its own TLS record

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 sink.test ESMTP\r\n")
        tls_on = self.tls is TlsMode.IMPLICIT
        current: Transaction | None = None
        held: list[bytes] = []  # replies to the group so far, sent at DATA (RFC 2920 §3.1)
        while line := await r.readline():
            assert line.endswith(b"\r\n"), line
            line = line[:-2]
            self.commands.append(line)
            verb = line.split(b" ", 1)[0].upper()
            if verb in (b"MAIL", b"RCPT"):
                if verb == b"MAIL":
                    current = self._mail(line, tls_on, held)
                elif current is not None:
                    self._rcpt(current, line, held)
                else:
                    held.append(b"503 5.5.1 MAIL first")
                continue  # held until DATA
            if verb == b"DATA":
                ok = current is not None and bool(current.accepted)
                await self._send(w, [*held, b"354 go ahead" if ok else b"554 5.5.1 no recipients"])
                held = []
                if ok and current is not None:
                    content = await r.readuntil(b"\r\n.\r\n")
                    current.content = content[:-3]  # the content keeps its final CRLF
                    if REFUSED_CONTENT in content:
                        w.write(b"554 5.7.1 content refused\r\n")
                    else:
                        self.queued += 1
                        w.write(b"250 2.0.0 queued as Q%d\r\n" % self.queued)
                current = None
            elif held:
                raise AssertionError(f"{line!r} after a group without DATA")
            elif verb == b"EHLO":
                extensions = [b"PIPELINING", b"SIZE 10000000", b"8BITMIME"]
                if self.tls is TlsMode.STARTTLS and not tls_on:
                    extensions.append(b"STARTTLS")
                lines = [b"250-sink.test", *(b"250-" + e for e in extensions[:-1])]
                w.write(b"\r\n".join([*lines, b"250 " + extensions[-1], b""]))
                current = None
            elif verb == b"STARTTLS" and not tls_on:
                w.write(b"220 2.0.0 ready to start TLS\r\n")
                await w.drain()
                await w.start_tls(self.context)
                tls_on, current = True, None  # RFC 3207 §4.2: forget the session so far
            elif verb == b"RSET":
                current = None
                w.write(b"250 2.0.0 reset\r\n")
            elif verb == b"QUIT":
                w.write(b"221 2.0.0 bye\r\n")
                await w.drain()
                return
            else:
                w.write(b"502 5.5.2 not here\r\n")
            await w.drain()

    def _mail(self, line: bytes, tls_on: bool, held: list[bytes]) -> Transaction | None:
        if not tls_on:  # RFC 3207 §4: a server may require TLS before mail
            held.append(b"530 5.7.0 Must issue a STARTTLS command first")
            return None
        transaction = Transaction(line)
        self.transactions.append(transaction)
        held.append(b"250 2.1.0 sender ok")
        return transaction

    def _rcpt(self, transaction: Transaction, line: bytes, held: list[bytes]) -> None:
        m = re.fullmatch(rb"RCPT TO:<([^<>]+)>(?: .*)?", line)
        assert m is not None, line
        address = m.group(1).decode("ascii")
        if address == REFUSED_RCPT:
            held.append(b"550 5.1.1 no such user here")
            return
        transaction.accepted.append(address)
        # A multi-line positive reply (RFC 5321 §4.2.1): one reply, two lines.
        held.append(b"250-2.1.5 <%s>\r\n250 2.1.5 recipient ok" % m.group(1))


# ---------------------------------------------------------------------------------------------
# The messages: what goes in, and what must come out on the wire
# ---------------------------------------------------------------------------------------------

TRACE: Final = b"Received: from pop.test by connector.test with POP3; now\r\n"
BIG: Final = b"Subject: big\r\n\r\n" + (b"x" * 900 + b"\r\n.dot line\r\n") * 400  # ~365 KB


def stuffed(data: bytes) -> bytes:
    """RFC 5321 §4.5.2 for CRLF data: a "." more before every line that starts with one."""
    return re.sub(rb"(?m)^\.", b"..", data)


@dataclass(frozen=True)
class Case:
    """One message to deliver, and what the server must see and answer."""

    raw: bytes
    envelope: Envelope
    outcome: str  # "queued", or the refusal's "stage code"
    accepted: tuple[str, ...] = ()
    wire: bool = False  # handed over in POP3's wire form (the fetcher's fast path)

    @property
    def data(self) -> bytes:
        """The message as it must arrive: trace line, the bytes, a CRLF added if missing."""
        data = TRACE + self.raw
        return data if data.endswith(b"\r\n") else data + b"\r\n"

    @property
    def mail(self) -> bytes:
        body = b" BODY=8BITMIME" if not self.data.isascii() else b""
        sender = self.envelope.sender.encode("ascii")
        return b"MAIL FROM:<%s> size=%d%s" % (sender, len(self.data), body)


def env(sender: str, *recipients: str) -> Envelope:
    # Recipients from the message (a shared mailbox): a refused one does not stop the others.
    return Envelope(sender, recipients, sender_fixed=False, recipients_fixed=False)


CASES: Final = [
    Case(
        b"Subject: one\r\n\r\nHello.\r\n",
        env("a@sender.test", "info@firma.test"),
        "queued",
        ("info@firma.test",),
    ),
    Case(
        b"Subject: three, one gone\r\n\r\n.\r\n..\r\n.x\r\n",
        env("b@sender.test", "one@firma.test", REFUSED_RCPT, "three@firma.test"),
        "queued",
        ("one@firma.test", "three@firma.test"),
    ),
    Case(
        "Subject: 8 bit\r\n\r\nGrüße\r\n.no final line end".encode(),
        env("", "info@firma.test", "other@firma.test"),
        "queued",
        ("info@firma.test", "other@firma.test"),
    ),
    Case(BIG, env("c@sender.test", "info@firma.test"), "queued", ("info@firma.test",)),
    # Every recipient refused: DATA gets 554, the client sends RSET, the session goes on.
    Case(b"Subject: nobody\r\n\r\nx\r\n", env("d@sender.test", REFUSED_RCPT), "RCPT 550"),
    # Refused after the content: RSET again, then the next message in the same session.
    Case(
        b"Subject: refused\r\n" + REFUSED_CONTENT + b"\r\n\r\nx\r\n",
        env("e@sender.test", "info@firma.test"),
        "DATA 554",
        ("info@firma.test",),
    ),
    Case(
        b"Subject: wire form\r\n\r\n.leading dot\r\nend\r\n",
        env("f@sender.test", "info@firma.test"),
        "queued",
        ("info@firma.test",),
        wire=True,
    ),
]


def outcome(result: Delivered | DeliveryError) -> str:
    if isinstance(result, Delivered):
        return "queued"
    return f"{result.stage.name} {result.smtp_code}"


async def deliver_all(deliverer: SmtpDeliverer) -> list[Delivered | DeliveryError]:
    """Every case in order; stops after the first one that ends other than expected (replies
    out of step would make each later one wait for its reply timeout)."""
    results: list[Delivered | DeliveryError] = []
    for case in CASES:
        wire = stuffed(case.raw) if case.wire else None  # CRLF-clean, ends with CRLF
        try:
            results.append(await deliverer.deliver(case.raw, case.envelope, trace=TRACE, wire=wire))
        except DeliveryError as err:
            results.append(err)
        if outcome(results[-1]) != case.outcome:
            break
    return results


@pytest.fixture
def client_context(smtp_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    smtp_ca.configure_trust(ctx)
    return ctx


@pytest.mark.parametrize("delivery", ["together", "one-per-write", "fragments"])
@pytest.mark.parametrize("tls", [TlsMode.STARTTLS, TlsMode.IMPLICIT], ids=["starttls", "implicit"])
@pytest.mark.parametrize("env_vars", LOOPS)
def test_pipelined_messages_over_tls_arrive_exactly(
    env_vars: Mapping[str, str],
    tls: TlsMode,
    delivery: Delivery,
    smtp_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    async def session() -> tuple[PipeliningTlsSink, list[Delivered | DeliveryError]]:
        on_uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        assert on_uvloop == (env_vars[ENV_VAR] == "uvloop")  # no silent fallback
        async with PipeliningTlsSink(smtp_server_context, tls, delivery) as sink:
            settings = SmtpSettings(
                host="127.0.0.1",  # the certificate names it (tests/conftest.py)
                port=sink.port,
                tls=tls,
                ssl_context=client_context,
                helo_name="connector.test",
                timeout=5.0,  # a client that waits for each reply of a group times out here
            )
            async with asyncio.timeout(20), SmtpDeliverer(settings) as deliverer:
                results = await deliver_all(deliverer)
        return sink, results

    sink, results = runloop.run(session(), env=env_vars)
    assert sink.failures == []
    assert [outcome(r) for r in results] == [case.outcome for case in CASES], results
    assert sink.sessions == 1  # one session, one handshake, for every message and refusal

    # The session: EHLO again after STARTTLS (RFC 3207 §4.2); RSET after each refusal.
    expected_commands: list[bytes] = [b"EHLO connector.test"]
    if tls is TlsMode.STARTTLS:
        expected_commands += [b"STARTTLS", b"EHLO connector.test"]
    for case in CASES:
        rcpts = [b"RCPT TO:<%s>" % r.encode() for r in case.envelope.recipients]
        expected_commands += [case.mail, *rcpts, b"DATA"]
        if case.outcome != "queued":
            expected_commands.append(b"RSET")
    assert sink.commands == [*expected_commands, b"QUIT"]

    # Each transaction's envelope as the server took it, and the content byte for byte.
    assert len(sink.transactions) == len(CASES)
    for case, seen in zip(CASES, sink.transactions, strict=True):
        assert seen.mail == case.mail
        assert seen.accepted == list(case.accepted)
        if case.accepted:
            assert seen.content == stuffed(case.data)
        else:
            assert seen.content is None  # no 354: nothing went out

    # Each result is its own message's: the queue numbers count the accepted messages in order.
    queued = iter(range(1, len(CASES) + 1))
    for case, result in zip(CASES, results, strict=True):
        if case.outcome == "queued":
            assert isinstance(result, Delivered), result
            assert result.response == f"250 2.0.0 queued as Q{next(queued)}"
            refused = set(case.envelope.recipients) - set(case.accepted)
            assert dict(result.refused) == dict.fromkeys(refused, "550 5.1.1 no such user here")
        else:
            assert isinstance(result, DeliveryError), result
            assert result.per_message  # about this message: the refused recipient is its own
    assert sink.queued == sum(case.outcome == "queued" for case in CASES)
