"""The interop matrix: each real POP3 server x Postfix as the MTA in front of Exchange.

POP3: Dovecot, Courier, GNU mailutils pop3d with a Maildir and with an mbox, popa3d; each over
TLS (STLS, or implicit TLS where the server has only that).  SMTP: Postfix with STARTTLS and
AUTH, ``smtpd_delay_reject = yes`` (its default) and ``no`` (tests/mailservers.py).  A corpus
of awkward messages goes into each mailbox; what the server serves is captured by RETR before
the run, with a plain socket reader (``served_messages``), and must arrive in Exchange's
mailbox byte for byte after our ``Received:`` line (and after what Postfix puts on top: its own
Return-Path, X-Original-To, Delivered-To and Received).  Postfix stores LF line ends, so the
served CRLF is compared as LF.  The refused ones must be dead letters with the right stage;
the one refused temporarily stays upstream; a second ``once`` delivers nothing.
"""

from __future__ import annotations

import base64
import json
import random
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from connector.cli import main
from tests.mailservers import (
    BODY_REFUSED,
    DENIED_SENDER_DOMAIN,
    GREYLISTED_SENDER,
    CourierServer,
    MailutilsServer,
    Pop3Endpoint,
    Popa3dServer,
    PostfixServer,
    served_messages,
)
from tests.servers import DovecotServer, SmtpSink

pytestmark = pytest.mark.integration

HELO = "connector.test"
OUR_TRACE = b"Received: from 127.0.0.1 by connector.test with POP3 (pop3-connector) id "


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One message of the corpus, stored with LF line ends as a delivery agent writes it.

    ``fate``: ``delivered``, ``deferred`` (refused temporarily: stays upstream), or the stage
    of its dead letter.  ``envelope``: the MAIL FROM Postfix must have seen (its Return-Path
    line), or None where this branch asserts nothing about it.
    """

    name: str
    raw: bytes
    fate: str = "delivered"
    envelope: str | None = "<>"


def _headers(
    name: str, extra: str = "", return_path: str | None = None, subject: str | None = None
) -> str:
    # Every message has its own Message-ID (popa3d's UIDL is a digest of such fields); the
    # test finds each served message by it.
    lines = [f"Return-Path: {return_path}"] if return_path is not None else []
    lines += [
        "From: Sender <sender@partner.example>",
        "To: info@firma.example",
        "Date: Mon, 7 Dec 2026 10:00:00 +0100",
        f"Message-ID: <{name}@corpus.example>",
        f"Subject: {subject or name}",
    ]
    return "\n".join(lines) + "\n" + extra


def _attachment(size: int) -> bytes:
    data = random.Random(5).randbytes(size)
    encoded = base64.encodebytes(data)  # 76-character lines, LF
    return (
        _headers("attachment-5mib").encode()
        + b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\n'
        + b"Content-Type: text/plain\n\nSee the attachment.\n--b\n"
        + b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        + encoded
        + b"--b--\n"
    )


FOLDED = "X-Folded: start\n" + "".join(f"\tfold line {i:02d} of sixty\n" for i in range(60))

CORPUS: list[Sample] = [
    Sample(
        "utf8-headers",
        _headers(
            "utf8-headers",
            "X-Name: Jürgen Müller\n\nHallo, schöne Grüße.\n",
            None,
            "Grüße aus Köln",
        ).encode(),
    ),
    Sample(
        "latin1-headers",
        _headers("latin1-headers").encode() + b"X-Latin1: caf\xe9 cr\xe8me\n\nsch\xf6n\n",
    ),
    Sample("line-5000", _headers("line-5000", "\n").encode() + b"x" * 5000 + b"\nend\n"),
    Sample(
        "lines-998-999",
        _headers("lines-998-999", "\n").encode() + b"a" * 998 + b"\n" + b"b" * 999 + b"\n",
    ),
    Sample(
        "dot-lines",
        _headers("dot-lines", "\n").encode() + b".one\n..two\n...three\n. space\n.\tx\nend.\n",
    ),
    Sample("only-a-dot", _headers("only-a-dot", "\n").encode() + b".\n"),
    Sample("no-final-newline", _headers("no-final-newline", "\n").encode() + b"the end"),
    Sample(
        "from-lines",
        _headers("from-lines", "\n").encode() + b"From me\n>From you\n>>From them\nok\n",
    ),
    Sample("headers-only", _headers("headers-only").encode() + b"X-Last: no empty line\n"),
    Sample("folded-60", (_headers("folded-60", FOLDED) + "\nbody\n").encode()),
    Sample("no-return-path", _headers("no-return-path", "\nbody\n").encode()),
    Sample("null-return-path", _headers("null-return-path", "\nbody\n", "<>").encode()),
    Sample(
        "return-path",
        _headers("return-path", "\nbody\n", "<bounces@partner.example>").encode(),
        envelope="<bounces@partner.example>",
    ),
    # RFC 5321 §4.1.2 allows a quoted local part; what it becomes on the envelope is the
    # hostile-input branch's fix (/work/wt/world-pending-tests.md): the bytes are asserted here.
    Sample(
        "quoted-local-part",
        _headers("quoted-local-part", "\nbody\n", '<"john doe"@partner.example>').encode(),
        envelope='<"john doe"@partner.example>',
    ),
    Sample(
        "utf8-return-path",
        _headers("utf8-return-path", "\nbody\n", "<jürgen@bücher.example>").encode(),
        envelope="<jürgen@bücher.example>",
    ),
    Sample(
        "body-refused",
        _headers("body-refused", "\n").encode() + BODY_REFUSED + b"\n",
        fate="data",
    ),
    Sample(
        "greylisted",
        _headers("greylisted", "\nbody\n", f"<{GREYLISTED_SENDER}>").encode(),
        fate="deferred",
        envelope=None,
    ),
]
DENIED = Sample(
    "denied-sender",
    _headers("denied-sender", "\nbody\n", f"<someone@{DENIED_SENDER_DOMAIN}>").encode(),
    fate="mail",
    envelope=None,
)
ATTACHMENT = Sample("attachment-5mib", _attachment(5 * 1024 * 1024))


# --------------------------------------------------------------------------------------------
# The POP3 side of a cell
# --------------------------------------------------------------------------------------------


@dataclass
class Upstream:
    name: str
    endpoint: Pop3Endpoint
    fill: Callable[[list[bytes]], None]


def _upstream(request: pytest.FixtureRequest, name: str) -> Upstream:
    match name:
        case "dovecot":
            dovecot: DovecotServer = request.getfixturevalue("dovecot")
            user, password = dovecot.add_user()
            endpoint = Pop3Endpoint(
                "127.0.0.1", dovecot.ports["pop3"], "starttls", dovecot.ca_file, user, password
            )
            return Upstream(name, endpoint, lambda raws: dovecot.deliver_many(user, raws))
        case "courier":
            courier: CourierServer = request.getfixturevalue("courier")
            user, password = courier.add_user()
            return Upstream(
                name,
                courier.endpoint(user, password),
                lambda raws: courier.deliver_many(user, raws),
            )
        case "mailutils-maildir" | "mailutils-mbox":
            mailutils: MailutilsServer = request.getfixturevalue("mailutils")
            user, password = mailutils.add_user(name.removeprefix("mailutils-"))
            return Upstream(
                name,
                mailutils.endpoint(user, password),
                lambda raws: mailutils.deliver_many(user, raws),
            )
        case "popa3d":
            popa3d: Popa3dServer = request.getfixturevalue("popa3d")
            user, password = popa3d.add_user()
            return Upstream(
                name, popa3d.endpoint(user, password), lambda raws: popa3d.deliver_many(user, raws)
            )
    raise AssertionError(name)


SERVERS = ["dovecot", "courier", "mailutils-maildir", "mailutils-mbox", "popa3d"]


# --------------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    upstream: Upstream
    postfix: PostfixServer
    port: str
    mailbox: str
    state_dir: Path
    config: Path

    def once(self, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
        code = main(["--config", str(self.config), "once"])
        return code, capsys.readouterr().out

    def dead_letters(self) -> dict[str, tuple[str, str, bytes]]:
        """``{UIDL: (stage, response, message)}`` from the dead-letter Maildir."""
        found = {}
        for path in sorted((self.state_dir / "dead-letters" / "new").glob("*")):
            data = path.read_bytes()
            fields = dict(re.findall(rb"^X-POP3-Connector-(\w+): (.*)\r\n", data, re.M))
            body = data.split(b"X-POP3-Connector-Failed-At: ", 1)[1].split(b"\r\n", 1)[1]
            found[fields[b"UIDL"].decode()] = (
                fields[b"Stage"].decode(),
                fields[b"Response"].decode(),
                body,
            )
        return found


def make_cell(request: pytest.FixtureRequest, tmp_path: Path, server: str, port: str) -> Cell:
    postfix: PostfixServer = request.getfixturevalue("postfix")
    upstream = _upstream(request, server)
    mailbox = postfix.mailbox()
    ep = upstream.endpoint
    state_dir = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            [service]
            state_dir = "{state_dir}"

            [metrics]
            listen = ""

            [smtp]
            host = "127.0.0.1"
            port = {postfix.ports[port]}
            tls = "starttls"
            ca_file = "{postfix.ca_file}"
            username = "{postfix.sasl_user}"
            password = "{postfix.sasl_password}"
            helo_name = "{HELO}"

            [[accounts]]
            name = "interop"
            host = "{ep.host}"
            port = {ep.port}
            tls = "{ep.tls}"
            ca_file = "{ep.ca_file}"
            username = "{ep.user}"
            password = "{ep.password}"
            deliver_to = ["{mailbox}"]
            """
        )
    )
    config.chmod(0o600)
    return Cell(upstream, postfix, port, mailbox, state_dir, config)


def split_arrival(stored: bytes) -> tuple[bytes, str, bytes]:
    """A message as Postfix stored it: (Postfix's lines on top, the UIDL in our Received
    line, the message after our Received line)."""
    start = stored.index(OUR_TRACE)
    eol = stored.index(b"\n", start)
    uidl = stored[start + len(OUR_TRACE) : eol].decode()
    assert stored[eol + 1 : eol + 2] == b"\t", stored[start : eol + 40]
    end = stored.index(b"\n", eol + 1) + 1
    return stored[:start], uidl, stored[end:]


def run_matrix_cell(
    cell: Cell, corpus: list[Sample], capsys: pytest.CaptureFixture[str]
) -> dict[str, str]:
    """Fill the mailbox, capture what is served, run ``once`` twice, check every message.
    Returns ``{sample name: Postfix's Return-Path line}`` for the delivered ones."""
    cell.upstream.fill([s.raw for s in corpus])
    served = steady_served(cell.upstream.endpoint)
    names = _names(served, corpus, SWALLOWED.get(cell.upstream.name, set()))
    corpus = [s for s in corpus if s.name in names.values()]
    by_name = {s.name: s for s in corpus}

    code, out = cell.once(capsys)
    expected = [s for s in corpus if s.fate == "delivered"]
    assert code == 0, out
    assert f"delivered {len(expected)}," in out, out

    # Exchange's mailbox: every delivered message, byte for byte after our Received line.
    arrived = cell.postfix.wait_delivered(cell.mailbox, len(expected))
    assert len(arrived) == len(expected)
    return_paths: dict[str, str] = {}
    for stored in arrived:
        on_top, uidl, message = split_arrival(stored)
        name = names[uidl]
        assert message == served[uidl].replace(b"\r\n", b"\n"), (cell.upstream.name, name)
        postfix_received = on_top.split(b"\nReceived: ", 1)[1]
        assert b"(Authenticated sender: relay@exchange.test)" in postfix_received
        # RFC 6531 §3.7.3: Postfix says UTF8SMTPSA when the client sent SMTPUTF8.
        utf8 = not served[uidl].split(b"\r\n\r\n", 1)[0].isascii()
        assert (b"with UTF8SMTPSA" if utf8 else b"with ESMTPSA") in postfix_received, name
        return_path = on_top.split(b"\n", 1)[0].decode()
        return_paths[name] = return_path
        envelope = by_name[name].envelope
        if envelope is not None:
            assert return_path == f"Return-Path: {envelope}", (cell.upstream.name, name)
    assert sorted(return_paths) == sorted(s.name for s in expected)

    # The refused ones: dead letters with their stage, the original bytes inside.
    dead = cell.dead_letters()
    assert {names[u]: stage for u, (stage, _, _) in dead.items()} == {
        s.name: s.fate for s in corpus if s.fate not in ("delivered", "deferred")
    }
    for uidl, (_, _, message) in dead.items():
        assert message == served[uidl]
    # Upstream: only what was refused temporarily; `status` says so (not STAT's count before).
    left = served_messages(cell.upstream.endpoint)
    assert sorted(names[u] for u in left) == sorted(s.name for s in corpus if s.fate == "deferred")
    assert main(["--config", str(cell.config), "status", "--json"]) == 0
    [status] = json.loads(capsys.readouterr().out)["accounts"]
    assert (status["mailbox_messages"], status["deferred"]) == (len(left), len(left))

    # A second once delivers and dead-letters nothing (the deferred one is only retried).
    code, out = cell.once(capsys)
    assert code == 0, out
    assert "delivered 0, dead-lettered 0," in out, out
    assert len(cell.postfix.delivered(cell.mailbox)) == len(expected)
    assert len(cell.dead_letters()) == len(dead)
    return return_paths


# mailutils' mbox reader takes the empty line that ends an mbox entry for the end of a
# headers-only message's header block, and serves the next entry as that message's body.
SWALLOWED = {"mailutils-mbox": {"folded-60"}}


def steady_served(endpoint: Pop3Endpoint) -> dict[str, bytes]:
    """What the server serves, once serving no longer changes it.

    mailutils pop3d rewrites a mailbox after the first session that read it (Maildir: an
    ``X-UIDL:`` line; mbox: ``X-UIDL:``, ``X-UID:``, ``Status:`` and, on the first message,
    ``X-IMAPbase:``), and serves the new form from then on; the others serve the same bytes
    every time.  So read until two sessions agree.
    """
    served = served_messages(endpoint)
    for _ in range(3):
        again = served_messages(endpoint)
        if again == served:
            return served
        served = again
    raise AssertionError("the server serves different bytes in every session")


def _names(served: dict[str, bytes], corpus: list[Sample], swallowed: set[str]) -> dict[str, str]:
    """``{UIDL: sample name}``, by the (first) Message-ID of each served message; the samples
    a server does not serve as messages of their own must be exactly ``swallowed``."""
    names = {}
    for uidl, raw in served.items():
        m = re.search(rb"^Message-ID: <([\w-]+)@corpus\.example>", raw, re.M)
        # mailutils serves a headers-only message without an empty line as its X-UIDL line
        # alone (a server bug noted in tests/mailservers.py); it is the one without an ID.
        names[uidl] = m.group(1).decode() if m else "headers-only"
    assert sorted(names.values()) == sorted(s.name for s in corpus if s.name not in swallowed)
    return names


def _corpus(server: str, port: str) -> list[Sample]:
    corpus = list(CORPUS)
    # smtpd_delay_reject = yes (Postfix's default) refuses the sender at RCPT of our fixed
    # recipient, = no at MAIL FROM: about this message either way (docs/design.md §6.2).
    corpus.append(replace(DENIED, fate="rcpt" if port == "delay" else "mail"))
    if (server, port) in ATTACHMENT_CELLS:
        corpus.append(ATTACHMENT)
    return corpus


def test_denied_senders_among_good_mail_with_postfix_defaults(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = make_cell(request, tmp_path, "dovecot", "delay")
    good = [s for s in CORPUS if s.fate == "delivered"][:4]
    denied = [
        Sample(
            f"denied-{n}",
            _headers(f"denied-{n}", "\nbody\n", f"<spammer{n}@{DENIED_SENDER_DOMAIN}>").encode(),
            fate="rcpt",
            envelope=None,
        )
        for n in range(3)
    ]
    corpus = [good[0], denied[0], good[1], denied[1], denied[2], good[2], good[3]]
    run_matrix_cell(cell, corpus, capsys)


# The 5 MiB message costs about a second per cell (RETR twice, SMTP, Postfix's store): two
# cells, one Maildir server and one mbox server, each with one delay setting.
ATTACHMENT_CELLS = {("dovecot", "delay"), ("popa3d", "nodelay")}


@pytest.mark.parametrize("port", ["delay", "nodelay"])
@pytest.mark.parametrize("server", SERVERS)
def test_matrix(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    server: str,
    port: str,
) -> None:
    cell = make_cell(request, tmp_path, server, port)
    run_matrix_cell(cell, _corpus(server, port), capsys)


@pytest.mark.parametrize("port", ["delay", "nodelay"])
def test_a_wrong_deliver_to_stops_the_cycle_with_nothing_lost(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str
) -> None:
    """Postfix refuses an unknown mailbox at RCPT (550 5.1.1): our setup is wrong, so the cycle
    stops, nothing is dead-lettered and nothing is deleted upstream (docs/design.md §6.1)."""
    cell = make_cell(request, tmp_path, "dovecot", port)
    cell.config.write_text(
        cell.config.read_text().replace(cell.mailbox, f"nobody@{cell.mailbox.split('@')[1]}")
    )
    corpus = [s for s in CORPUS if s.fate == "delivered"][:3]
    cell.upstream.fill([s.raw for s in corpus])
    before = served_messages(cell.upstream.endpoint)
    code, out = cell.once(capsys)
    assert code == 1, out
    assert "550 5.1.1" in out, out
    assert cell.dead_letters() == {}
    assert served_messages(cell.upstream.endpoint) == before


def test_over_postfix_size_limit_is_a_dead_letter_the_rest_flows(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ``small`` port's SIZE (message_size_limit 64 KiB): a bigger message is dead-lettered
    with stage ``size`` without being sent (RFC 1870); the messages around it are delivered."""
    cell = make_cell(request, tmp_path, "dovecot", "small")
    big = Sample("too-big", _headers("too-big", "\n").encode() + (b"y" * 99 + b"\n") * 1000, "size")
    corpus = [CORPUS[0], big, CORPUS[1]]
    cell.upstream.fill([s.raw for s in corpus])
    served = served_messages(cell.upstream.endpoint)
    names = _names(served, corpus, set())
    code, out = cell.once(capsys)
    assert code == 0, out
    arrived = [split_arrival(m) for m in cell.postfix.wait_delivered(cell.mailbox, 2)]
    assert sorted(names[uidl] for _, uidl, _ in arrived) == ["latin1-headers", "utf8-headers"]
    [(uidl, (stage, response, message))] = cell.dead_letters().items()
    assert (names[uidl], stage, message) == ("too-big", "size", served[uidl])
    assert response.startswith("552 5.3.4 ")
    # Postfix's cleanup logs the Message-ID of every message it receives: not this one.
    assert "message-id=<too-big@corpus.example>" not in cell.postfix.maillog()


def test_bare_errs_at_login_from_cron_mark_the_account_failing(
    popa3d: Popa3dServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """popa3d refuses a password with a bare -ERR (no RFC 3206 code): transient twice, failing
    the third time in a row (README "Backoff").  ``once`` from cron is a new process each
    time, so the count must come from the ledger, and so must the failing notice."""
    user, password = popa3d.add_user()
    ep = popa3d.endpoint(user, password)
    sink = SmtpSink().start()
    config = tmp_path / "config.toml"

    def write(pw: str) -> None:
        config.write_text(
            textwrap.dedent(
                f"""\
                [service]
                state_dir = "{tmp_path / "state"}"
                [metrics]
                listen = ""
                [smtp]
                host = "127.0.0.1"
                port = {sink.port}
                tls = "none"
                helo_name = "{HELO}"
                [notices]
                postmaster = "postmaster@firma.test"
                [[accounts]]
                name = "cron"
                host = "{ep.host}"
                port = {ep.port}
                tls = "{ep.tls}"
                ca_file = "{ep.ca_file}"
                username = "{user}"
                password = "{pw}"
                deliver_to = ["info@firma.test"]
                """
            )
        )
        config.chmod(0o600)

    def status() -> dict[str, object]:
        capsys.readouterr()
        assert main(["--config", str(config), "status", "--json"]) == 0
        [account] = json.loads(capsys.readouterr().out)["accounts"]
        assert isinstance(account, dict)
        return account

    def subjects() -> list[str]:
        return [
            line.removeprefix(b"Subject: ").decode()
            for m in sink.received
            for line in m.data.split(b"\r\n")
            if line.startswith(b"Subject: ")
        ]

    try:
        write("wrong-" + password)
        for _ in range(2):
            assert main(["--config", str(config), "once"]) == 1
            assert (status()["result"], status()["failing"]) == ("failed", False)
            assert subjects() == []
        assert main(["--config", str(config), "once"]) == 1
        assert (status()["result"], status()["failing"]) == ("failed", True)
        assert subjects() == ["[pop3-connector] cron: account failing"]
        capsys.readouterr()
        assert main(["--config", str(config), "status"]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[3] == "failing"

        write(password)
        assert main(["--config", str(config), "once"]) == 0
        assert (status()["result"], status()["failing"]) == ("ok", False)
        assert subjects()[1:] == ["[pop3-connector] cron: account recovered"]
    finally:
        sink.stop()
