"""Real servers for tests: Dovecot (subprocess) and aiosmtpd (thread) on loopback.

Both are synchronous objects with no event loop of their own in the test's loop, so async tests of
any loop scope can use them (shared/recipes/library-facts.md §7).  The Dovecot part follows
shared/recipes/dovecot-for-tests.md; read its pitfalls before changing anything here.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import ssl
import string
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

DOVECOT_CONF = Path(__file__).with_name("dovecot.conf.tmpl")


def free_port() -> int:
    """A TCP port that was free a moment ago (Dovecot and aiosmtpd's Controller need a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


_user_counter = itertools.count(1)
SPARE_USERS = 500
USER_PASSWORD = "secret-pw"
# A mailbox whose password IMAP must quote and escape (RFC 3501 §4.3: quoted-specials), for
# the tests that look for it in logs: every run of letters in it is long enough to search for.
QUOTED_USER = "quoted"
QUOTED_PASSWORD = 'Fq8zR2kLw"Hn4Tq7Xb\\Pz7Jm9Wc ok'
# The account Postfix's SASL AUTH checks through Dovecot's auth socket (tests/mailservers.py).
RELAY_USER, RELAY_PASSWORD = "relay@exchange.test", "relay-pw"


@dataclass
class DovecotServer:
    """A running Dovecot with POP3 (STLS), POP3S, IMAP (STARTTLS) and IMAPS on loopback."""

    root: Path
    ports: dict[str, int]
    ca: trustme.CA
    proc: subprocess.Popen[bytes] = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def ca_file(self) -> Path:
        return self.root / "tls" / "ca.pem"

    @property
    def auth_socket(self) -> Path:
        """Dovecot's auth socket for Postfix's ``smtpd_sasl_type = dovecot``."""
        return self.root / "run" / "auth-postfix"

    def add_user(self) -> tuple[str, str]:
        """A fresh, empty mailbox: (user, password).

        The users are written before Dovecot starts: Dovecot notices a changed passwd-file by
        its mtime, which can miss two changes within one second.
        """
        with self._lock:
            n = next(_user_counter)
        if n > SPARE_USERS:
            raise RuntimeError(f"more than {SPARE_USERS} test mailboxes; raise SPARE_USERS")
        return f"user{n}", USER_PASSWORD

    def deliver(self, user: str, raw: bytes, folder: str = "INBOX") -> None:
        """Store a message through Dovecot itself (runs as the mail uid, ownership stays right)."""
        subprocess.run(
            ["doveadm", "-c", str(self.conf), "save", "-u", user, "-m", folder],
            input=raw,
            check=True,
        )

    def deliver_many(self, user: str, raws: list[bytes]) -> None:
        """Store messages in order, as a provider's mailbox would hold them.

        Written straight into the Maildir as the mail uid (faster than one doveadm per message);
        the numeric time prefix keeps the order Dovecot assigns UIDs in.
        """
        md = self.root / "mail" / user / "Maildir"
        if not (md / "new").exists():
            self.deliver(user, b"Subject: init\r\n\r\nx\r\n")
            for sub in ("new", "cur"):
                for p in (md / sub).glob("*"):
                    p.unlink()
        base = int(time.time())
        for i, raw in enumerate(raws):
            name = f"{base}.M{i:06d}P{i}.test"
            tmp = md / "tmp" / name
            tmp.write_bytes(raw)
            shutil.chown(tmp, "nobody", "nogroup")
            tmp.rename(md / "new" / name)

    def maildir_files(self, user: str, folder: str = "") -> list[Path]:
        md = self.root / "mail" / user / "Maildir"
        if folder:
            md = md / f".{folder}"
        return sorted(p for sub in ("new", "cur") for p in (md / sub).glob("*"))

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (self.root / "dovecot.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, prefix: bytes, deadline: float, root: Path
) -> None:
    while True:
        if proc.poll() is not None:
            out = (root / "dovecot.stdout").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"dovecot exited rc={proc.returncode}: {out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(200).startswith(prefix):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"dovecot not ready on port {port}")
        time.sleep(0.02)


def start_dovecot(extra_conf: str = "") -> DovecotServer:
    """Start a private Dovecot; the caller must call :func:`stop_dovecot`.

    ``extra_conf`` is appended to the configuration (bench/ tunes the login and pop3 services
    with it); Dovecot merges a repeated ``service`` section into the earlier one.
    """
    # Directly under $TMPDIR, not pytest's tmp_path: Dovecot's auth user must traverse every
    # parent directory (recipe §2, rule 2).
    root = Path(tempfile.mkdtemp(prefix="dovecot-test-"))
    root.chmod(0o755)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "127.0.0.2", "::1")
    (root / "tls").mkdir()
    cert.cert_chain_pems[0].write_to_path(str(root / "tls" / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(root / "tls" / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(root / "tls" / "key.pem"))
    (root / "tls" / "key.pem").chmod(0o600)
    ca.cert_pem.write_to_path(str(root / "tls" / "ca.pem"))
    users = ["alice:{PLAIN}alicepw::::::", "bob@example.test:{PLAIN}bobpw::::::"]
    users.append(f"{QUOTED_USER}:{{PLAIN}}{QUOTED_PASSWORD}::::::")
    users.append(f"{RELAY_USER}:{{PLAIN}}{RELAY_PASSWORD}::::::")
    users += [f"user{n}:{{PLAIN}}{USER_PASSWORD}::::::" for n in range(1, SPARE_USERS + 1)]
    (root / "users").write_text("\n".join(users) + "\n")
    (root / "mail").mkdir()
    shutil.chown(root / "mail", "nobody", "nogroup")
    ports = {name: free_port() for name in ("pop3", "pop3s", "imap", "imaps")}
    listen = "127.0.0.1, 127.0.0.2, ::1" if _has_ipv6_loopback() else "127.0.0.1, 127.0.0.2"
    conf = string.Template(DOVECOT_CONF.read_text()).substitute(
        ROOT=root,
        LISTEN=listen,
        POP3=ports["pop3"],
        POP3S=ports["pop3s"],
        IMAP=ports["imap"],
        IMAPS=ports["imaps"],
    )
    (root / "dovecot.conf").write_text(conf + extra_conf)
    with (root / "dovecot.stdout").open("wb") as out:
        proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(root / "dovecot.conf")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        _wait_ready(proc, ports["pop3"], b"+OK", deadline, root)
        _wait_ready(proc, ports["imap"], b"* OK", deadline, root)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return DovecotServer(root=root, ports=ports, ca=ca, proc=proc)


def stop_dovecot(server: DovecotServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    shutil.rmtree(server.root, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# SMTP: aiosmtpd playing Exchange
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # as received: CRLF, dot-unstuffed
    mail_options: tuple[str, ...]
    rcpt_options: tuple[str, ...]


# A rule sees the envelope so far and the stage ("mail", "rcpt", "data") and returns an SMTP
# reply line to refuse with, or None to accept.
Rule = Callable[[str, Envelope, bytes | None], str | None]


class RecordingHandler:
    """Records every accepted message; refuses what ``rule`` says to refuse."""

    def __init__(self) -> None:
        self.received: list[ReceivedMail] = []
        self.rule: Rule | None = None
        self.refused: list[tuple[str, str]] = []  # (stage, reply)
        self.transactions = 0
        self.peer: Any = None  # the (host, port) of the connection of the DATA being handled
        self._lock = threading.Lock()

    def _check(self, stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        if self.rule is None:
            return None
        reply = self.rule(stage, envelope, data)
        if reply is not None:
            with self._lock:
                self.refused.append((stage, reply))
        return reply

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        reply = self._check("mail", envelope, None)
        return reply or "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._check("rcpt", _with_rcpt(envelope, address), None)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        # Which connection this DATA came on, for a rule that needs it (the crash harness:
        # a killed run's last DATA may be handled after the next run began).
        self.peer = session.peer
        with self._lock:
            self.transactions += 1
        reply = self._check("data", envelope, data)
        if reply:
            return reply
        with self._lock:
            self.received.append(
                ReceivedMail(
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=data,
                    mail_options=tuple(envelope.mail_options),
                    rcpt_options=tuple(envelope.rcpt_options),
                )
            )
        return "250 2.0.0 OK queued"


def _with_rcpt(envelope: Envelope, address: str) -> Envelope:
    probe = Envelope()
    probe.mail_from = envelope.mail_from
    probe.rcpt_tos = [*envelope.rcpt_tos, address]
    return probe


class LongLineSMTP(SMTP):
    """aiosmtpd enforces RFC 5321 §4.5.3.1.6's 1000-octet line limit; real mail (and Exchange)
    carries longer lines, and our tests send 200,000-character ones."""

    line_length_limit = 1 << 22


class _Controller(Controller):
    def factory(self) -> SMTP:
        return LongLineSMTP(self.handler, **self.SMTP_kwargs)


class SmtpSink:
    """aiosmtpd in a thread.  ``tls_context`` offers STARTTLS; ``implicit`` wraps the socket;
    ``auth`` is a {user: password} map that makes AUTH available (and required)."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit: bool = False,
        auth: dict[str, str] | None = None,
        data_size_limit: int | None = 64 * 1024 * 1024,
    ) -> None:
        self.handler = RecordingHandler()
        self.port = free_port()
        kwargs: dict[str, Any] = {"data_size_limit": data_size_limit, "enable_SMTPUTF8": True}
        if auth is not None:
            creds = dict(auth)

            def authenticator(
                server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
            ) -> AuthResult:
                ok = (
                    isinstance(auth_data, LoginPassword)
                    and creds.get(auth_data.login.decode()) == auth_data.password.decode()
                )
                # handled=False makes aiosmtpd answer a failure itself (535); with the default
                # True it would send nothing and the client would wait for its timeout.
                return AuthResult(success=ok, handled=ok)

            kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=False)
        if tls_context is not None and not implicit:
            kwargs.update(tls_context=tls_context, require_starttls=False)
        self.controller = _Controller(
            self.handler,
            hostname="127.0.0.1",
            port=self.port,
            ssl_context=tls_context if implicit else None,
            server_hostname="localhost",
            **kwargs,
        )

    @property
    def received(self) -> list[ReceivedMail]:
        return self.handler.received

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()
