"""More real servers for tests: Postfix as the MTA in front of Exchange, and three more POP3
servers (Courier, GNU mailutils pop3d, popa3d) beside the Dovecot of ``tests/servers.py``.

Each is a private instance for one test session, the way Dovecot is run: its configuration,
spool and log under a temp directory of its own, listening on loopback ports only, started as
our child process and ended by its PID when the session ends.  No system service is started
(``scripts/test`` installs the packages with a ``policy-rc.d`` that forbids it) and nothing the
system's own instance would read is touched.  shared/recipes/more-servers-for-tests.md records
the pitfalls; the quirks each server showed our client are noted where the client copes.

- Postfix: ``master -c CONFDIR -d`` (foreground).  Two smtpd ports: ``delay`` with
  ``smtpd_delay_reject = yes`` (Postfix's default: a sender refused by ``check_sender_access``
  is refused at RCPT) and ``nodelay`` (refused at MAIL FROM); ``small`` has a tiny
  ``message_size_limit``.  STARTTLS with a trustme certificate, SASL AUTH through Dovecot's
  auth socket, virtual mailboxes for the Exchange recipients, ``default_transport = error:``
  so that nothing leaves.
- Courier POP3 (``courier-pop`` only unpacked: it conflicts with dovecot-pop3d): its programs
  have ``/etc/courier`` and ``/run/courier`` compiled in, so authdaemond and couriertcpd run in a
  private mount namespace with our directories bind-mounted over those two.
- GNU mailutils pop3d and popa3d authenticate system accounts: each test's mailbox owner is made
  with ``useradd -M`` and removed when the session ends.  popa3d reads ``/var/mail/<user>``
  (compiled in): it runs in a mount namespace with our spool bind-mounted over ``/var/mail``,
  behind socat (it is an inetd service).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trustme

from tests.servers import RELAY_PASSWORD, RELAY_USER, DovecotServer, free_port

SERVERS_DIR: Final = Path(
    os.environ.get("POP3_CONNECTOR_TEST_SERVERS", "/opt/pop3-connector-test-servers")
)
"""Where ``scripts/test`` unpacks courier-pop and popa3d (they conflict with dovecot-pop3d)."""

MAIL_UID: Final = 65534  # nobody/nogroup: Postfix's virtual mailboxes and Courier's userdb
START_TIMEOUT: Final = 20.0


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------


def _root(prefix: str) -> Path:
    # Straight under $TMPDIR and 0755: the servers' unprivileged users must reach their files
    # (dovecot-for-tests.md §2 rule 2 holds for all of them).
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@dataclass(frozen=True)
class TlsFiles:
    """A trustme certificate for localhost and 127.0.0.1, as the servers want it on disk."""

    ca: trustme.CA
    cert: Path  # the chain
    key: Path
    combined: Path  # key and chain in one file (Courier's TLS_CERTFILE)
    ca_file: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        directory.mkdir(mode=0o755, exist_ok=True)
        # RSA: Courier's couriertls (GnuTLS) refused the handshake with trustme's default ECDSA.
        ca = trustme.CA(key_type=trustme.KeyType.RSA)
        issued = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
        files = cls(
            ca,
            directory / "cert.pem",
            directory / "key.pem",
            directory / "combined.pem",
            directory / "ca.pem",
        )
        chain = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
        files.cert.write_bytes(chain)
        files.key.write_bytes(issued.private_key_pem.bytes())
        files.combined.write_bytes(issued.private_key_pem.bytes() + chain)
        for private in (files.key, files.combined):
            private.chmod(0o600)
        files.ca_file.write_bytes(ca.cert_pem.bytes())
        return files

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def _spawn(
    argv: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server as our child, in its own process group (so its own stop signal reaches
    the helpers it forks), with its output in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the process we started, by its PID, and reap it; then whatever is left of the
    process group it leads (``_spawn`` made it, so it holds only that server's own children).

    The sweep is for mailutils pop3d: a session child that its master's SIGTERM caught in the
    middle of its work once hung in its signal handler (a futex, SIGTERM blocked), and lived on
    as the test user, so that the user could not be removed.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_greeting(
    procs: Sequence[subprocess.Popen[bytes]],
    port: int,
    prefix: bytes,
    log: Path,
    *,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Wait until ``port`` greets with ``prefix``; fail at once if a server process exited."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        for proc in procs:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"{proc.args!r} exited rc={proc.returncode}: {tail}")
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), 2))
                if tls is not None:
                    sock = stack.enter_context(tls.wrap_socket(sock, server_hostname="localhost"))
                if sock.recv(200).startswith(prefix):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {prefix!r} greeting on port {port}")
        time.sleep(0.02)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _in_namespace(binds: Sequence[tuple[Path, str]], argv: Sequence[str]) -> list[str]:
    """``argv`` run in a private mount namespace with each ``(ours, system path)`` bind-mounted
    over the system path: the program reads our files where its paths are compiled in, and the
    system's own files are never seen or touched.  ``exec`` keeps the PID: it is the server's."""
    mounts = " && ".join(f"mount --bind {shlex.quote(str(src))} {dst}" for src, dst in binds)
    script = f"{mounts} && exec {shlex.join(argv)}"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


class SystemUsers:
    """System accounts for the servers that authenticate them (mailutils pop3d, popa3d):
    made with ``useradd -M`` for this session, removed by :meth:`remove_all`."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()

    def add(self) -> tuple[str, str]:
        name = "p3c" + secrets.token_hex(5)  # 13 characters, unique to this session
        password = "pw-" + secrets.token_hex(6)
        subprocess.run(
            ["useradd", "-M", "-N", "-g", "nogroup", "-d", "/nonexistent", "-s",
             "/usr/sbin/nologin", name],
            check=True,
        )  # fmt: skip
        with self._lock:
            self.names.append(name)
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True)
        return name, password

    def remove_all(self) -> None:
        with self._lock:
            names, self.names = self.names, []
        for name in names:
            subprocess.run(["userdel", name], check=False)


def _write_maildir(maildir: Path, raws: Sequence[bytes], owner: int | str) -> None:
    """Put ``raws`` into ``maildir/new`` in order, as a delivery agent would (tmp, then new)."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(maildir / sub, owner, None)
    shutil.chown(maildir, owner, None)
    maildir.chmod(0o700)
    base = int(time.time())
    for i, raw in enumerate(raws):
        name = f"{base}.M{i:06d}P{os.getpid()}.test"
        tmp = maildir / "tmp" / name
        tmp.write_bytes(raw)
        shutil.chown(tmp, owner, None)
        tmp.rename(maildir / "new" / name)


def mbox_bytes(raws: Sequence[bytes]) -> bytes:
    """An mbox holding ``raws`` (mboxrd: a line ``>*From `` gets one more ``>``).

    Each message is stored with LF line ends and ends with a line end and an empty line, as an
    MDA writes it: an mbox cannot hold a message without a final newline.
    """
    out = bytearray()
    for raw in raws:
        out += b"From MAILER-DAEMON Mon Dec  7 10:00:00 2026\n"
        text = raw.replace(b"\r\n", b"\n")
        lines = text.split(b"\n")
        if text.endswith(b"\n"):
            lines.pop()  # the empty piece after the final line end
        for line in lines:
            if line.lstrip(b">").startswith(b"From "):
                line = b">" + line
            out += line + b"\n"
        out += b"\n"
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------------------------

EXCHANGE_DOMAIN: Final = "exchange.test"
DENIED_SENDER_DOMAIN: Final = "spam.test"
"""check_sender_access: every sender of this domain is refused 554 5.1.0 Sender denied."""
GREYLISTED_SENDER: Final = "first-contact@slow.test"
"""check_sender_access: refused 451 4.7.1 (temporarily)."""
BODY_REFUSED: Final = b"X-Test-Body-Check: refuse this body"
"""A body line that body_checks refuses after DATA: 550 5.7.1."""
MESSAGE_SIZE_LIMIT: Final = 8 * 1024 * 1024
SMALL_SIZE_LIMIT: Final = 64 * 1024  # the ``small`` port's message_size_limit
MAILBOXES: Final = 400

_POSTFIX_MAIN = """\
# A private Postfix for tests (tests/mailservers.py); everything lives under {root}
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.{domain}
mydomain = {domain}
myorigin = {domain}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks =
# Nothing ever leaves this instance: mail not for a virtual mailbox bounces into the void.
default_transport = error:nothing leaves this test instance
relay_transport = error:nothing leaves this test instance
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
smtpd_error_sleep_time = 0
# Keep what arrives comparable byte for byte: no header rewriting for local clients, no header
# dropped; Postfix still adds its own Return-Path, X-Original-To, Delivered-To and Received.
local_header_rewrite_clients =
message_drop_headers =
# Exchange's mailboxes.
virtual_mailbox_domains = {domain}
virtual_mailbox_maps = texthash:{root}/conf/mailboxes
virtual_mailbox_base = {root}/mail
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{uid}
message_size_limit = {size_limit}
virtual_mailbox_limit = 0
smtpd_sender_restrictions = check_sender_access texthash:{root}/conf/senders
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
body_checks = regexp:{root}/conf/body_checks
smtpd_tls_security_level = may
smtpd_tls_cert_file = {root}/tls/cert.pem
smtpd_tls_key_file = {root}/tls/key.pem
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {sasl_path}
smtpd_sasl_authenticated_header = yes
"""


@dataclass
class PostfixServer:
    """A running private Postfix.  ``ports``: ``delay`` (``smtpd_delay_reject = yes``, the
    default), ``nodelay`` (``= no``), ``small`` (``message_size_limit`` of
    :data:`SMALL_SIZE_LIMIT`).  Every port offers STARTTLS, and AUTH after it."""

    root: Path
    ports: dict[str, int]
    tls: TlsFiles
    proc: subprocess.Popen[bytes] = field(repr=False)
    sasl_user: str = RELAY_USER
    sasl_password: str = RELAY_PASSWORD
    _boxes: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_file

    def mailbox(self) -> str:
        """A fresh, empty Exchange mailbox: its address."""
        with self._lock:
            n = next(self._boxes)
        if n > MAILBOXES:
            raise RuntimeError(f"more than {MAILBOXES} Postfix test mailboxes; raise MAILBOXES")
        return f"box{n}@{EXCHANGE_DOMAIN}"

    def delivered(self, address: str) -> list[bytes]:
        """What was delivered to ``address``, in the order Postfix stored it."""
        new = self.root / "mail" / address.split("@")[0] / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def wait_delivered(self, address: str, count: int) -> list[bytes]:
        """Postfix delivers after its 250 (queue manager, then virtual): wait for ``count``."""
        wait_until(lambda: len(self.delivered(address)) >= count, f"{count} messages in {address}")
        return self.delivered(address)

    def maillog(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def start_postfix(dovecot: DovecotServer) -> PostfixServer:
    """Start a private Postfix whose SASL AUTH asks ``dovecot``; stop it with
    :func:`stop_postfix`."""
    root = _root("postfix-test-")
    conf = root / "conf"
    conf.mkdir()
    for sub in ("queue", "data", "mail"):
        (root / sub).mkdir()
    shutil.chown(root / "data", "postfix", None)
    shutil.chown(root / "mail", MAIL_UID, MAIL_UID)
    tls = TlsFiles.make(root / "tls")
    ports = {name: free_port() for name in ("delay", "nodelay", "small")}
    (conf / "main.cf").write_text(
        _POSTFIX_MAIN.format(
            root=root,
            domain=EXCHANGE_DOMAIN,
            uid=MAIL_UID,
            size_limit=MESSAGE_SIZE_LIMIT,
            sasl_path=dovecot.auth_socket,
        )
    )
    # master.cf from the distribution: our smtpd ports instead of port 25, and no chroot (the
    # chroot column "y" would need a copy of /etc under the queue directory).
    master = []
    for line in Path("/usr/share/postfix/master.cf.dist").read_text().splitlines():
        fields = line.split()
        if fields[:2] == ["smtp", "inet"]:
            continue
        if len(fields) >= 8 and not line[0].isspace() and fields[4] == "y":
            fields[4] = "n"
            line = " ".join(fields)
        master.append(line)
    smtpd = "127.0.0.1:{port} inet n - n - - smtpd"
    master += [
        smtpd.format(port=ports["delay"]),
        smtpd.format(port=ports["nodelay"]),
        "  -o smtpd_delay_reject=no",
        smtpd.format(port=ports["small"]),
        f"  -o message_size_limit={SMALL_SIZE_LIMIT}",
    ]
    (conf / "master.cf").write_text("\n".join(master) + "\n")
    (conf / "mailboxes").write_text(
        "".join(f"box{n}@{EXCHANGE_DOMAIN} box{n}/\n" for n in range(1, MAILBOXES + 1))
    )
    (conf / "senders").write_text(
        f"{DENIED_SENDER_DOMAIN} 554 5.1.0 Sender denied\n"
        f"{GREYLISTED_SENDER} 451 4.7.1 Try again later\n"
    )
    (conf / "body_checks").write_text(
        f"/^{BODY_REFUSED.decode()}$/ REJECT 5.7.1 Message body refused by policy\n"
    )
    # post-install makes the queue's subdirectories with their owners; check reports problems
    # (both log to maillog: Postfix never writes to a terminal it does not have).
    for action in (["post-install", "create-missing"], ["check"]):
        done = subprocess.run(["postfix", "-c", str(conf), *action], check=False)
        if done.returncode != 0:
            raise RuntimeError(f"postfix {action}: {(root / 'maillog').read_text()[-2000:]}")
    log = root / "master.out"
    proc = _spawn(["/usr/lib/postfix/sbin/master", "-c", str(conf), "-d"], log)
    try:
        for port in ports.values():
            _wait_greeting([proc], port, b"220 ", root / "maillog")
    except BaseException:
        _stop(proc)
        raise
    return PostfixServer(root, ports, tls, proc)


def stop_postfix(server: PostfixServer) -> None:
    # SIGTERM to master: it ends its children (its process group) and exits.
    _stop(server.proc)
    shutil.rmtree(server.root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# POP3 servers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pop3Endpoint:
    """Where a test reaches one mailbox: ``tls`` as the connector's config says it."""

    host: str
    port: int
    tls: str  # "starttls" | "implicit" | "none"
    ca_file: Path
    user: str
    password: str


COURIER_USERS: Final = 200


@dataclass
class CourierServer:
    """Courier POP3 (courierpop3login + courierpop3d under couriertcpd) with STLS, users from a
    userdb served by a private authdaemond.

    Quirks seen: CAPA offers ``UTF8 USER`` and, without the RFC 6856 ``UTF8`` command, a
    message with raw UTF-8 headers is served as a "Cannot display Unicode content" message
    from ``<postmaster>`` wrapping it (``ENABLE_UTF8_COMPLIANCE=1``, Debian's default); a
    message without a final newline is counted two octets short in RETR's ``+OK``; bytes
    pipelined behind PASS are lost (courierpop3login execs courierpop3d).
    """

    root: Path
    port: int
    tls: TlsFiles
    procs: list[subprocess.Popen[bytes]] = field(repr=False)
    _users: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    name = "courier"

    def add_user(self) -> tuple[str, str]:
        with self._lock:
            n = next(self._users)
        if n > COURIER_USERS:
            raise RuntimeError(f"more than {COURIER_USERS} Courier users; raise COURIER_USERS")
        return f"user{n}", f"pw{n}"

    def endpoint(self, user: str, password: str) -> Pop3Endpoint:
        return Pop3Endpoint("127.0.0.1", self.port, "starttls", self.tls.ca_file, user, password)

    def deliver_many(self, user: str, raws: Sequence[bytes]) -> None:
        _write_maildir(self.root / "mail" / user / "Maildir", raws, MAIL_UID)

    def upstream(self, user: str) -> int:
        md = self.root / "mail" / user / "Maildir"
        return sum(1 for sub in ("new", "cur") for _ in (md / sub).glob("*"))


def start_courier() -> CourierServer:
    """Start Courier's authdaemond and POP3 server; stop them with :func:`stop_courier`."""
    courier = SERVERS_DIR / "courier-pop" / "usr" / "lib" / "courier" / "courier"
    if not (courier / "courierpop3d").exists():
        raise RuntimeError(f"courier-pop is not unpacked in {SERVERS_DIR}: run scripts/test")
    root = _root("courier-test-")
    etc, run = root / "etc", root / "run"
    etc.mkdir(mode=0o755)
    (run / "authdaemon").mkdir(mode=0o755, parents=True)
    (root / "mail").mkdir()
    shutil.chown(root / "mail", MAIL_UID, MAIL_UID)
    tls = TlsFiles.make(root / "tls")
    (etc / "authdaemonrc").write_text(
        'authmodulelist="authuserdb"\ndaemons=1\nauthdaemonvar=/run/courier/authdaemon\n'
        'DEBUG_LOGIN=0\nDEFAULTOPTIONS=""\nLOGGEROPTS=""\n'
    )
    lines = []
    for n in range(1, COURIER_USERS + 1):
        home = root / "mail" / f"user{n}"
        lines.append(
            f"user{n}\tuid={MAIL_UID}|gid={MAIL_UID}|home={home}|mail={home}/Maildir"
            f"|systempw={_sha_scheme(f'pw{n}')}\n"
        )
    (etc / "userdb").write_text("".join(lines))
    (etc / "userdb").chmod(0o600)
    dhparams = Path("/etc/courier/dhparams.pem")
    if dhparams.exists():
        shutil.copy(dhparams, etc / "dhparams.pem")
    binds = [(etc, "/etc/courier"), (run, "/run/courier")]
    Path("/run/courier").mkdir(exist_ok=True)  # the mount point (courier-authdaemon makes it)
    subprocess.run(_in_namespace(binds, ["makeuserdb"]), check=True)
    log = root / "courier.log"
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        # /etc/courier/pop3d and pop3d-ssl as the init script would have set them.
        "POP3AUTH": "PLAIN LOGIN",
        "POP3AUTH_TLS": "PLAIN LOGIN",
        "POP3_PROXY": "0",
        "MAILDIRPATH": "Maildir",
        "POP3_STARTTLS": "YES",
        "POP3_TLS_REQUIRED": "0",
        "COURIERTLS": "/usr/bin/couriertls",
        "TLS_CERTFILE": "/etc/courier/combined.pem",
        "TLS_VERIFYPEER": "NONE",
        "ENABLE_UTF8_COMPLIANCE": "1",  # Debian's /etc/courier/pop3d
        "MIME_UNICODE_MESSAGE_TYPE": "message/global",
    }
    if (etc / "dhparams.pem").exists():
        env["TLS_DHPARAMS"] = "/etc/courier/dhparams.pem"
    shutil.copy(tls.combined, etc / "combined.pem")
    # couriertls runs as the user courier (courierpop3login drops root before STLS), so its
    # certificate and DH parameters are root:courier 0640, as Debian installs them.
    for private in (etc / "combined.pem", etc / "dhparams.pem"):
        if private.exists():
            shutil.chown(private, "root", "courier")
            private.chmod(0o640)
    procs = [_spawn(_in_namespace(binds, ["/usr/lib/courier/courier-authlib/authdaemond"]), log)]
    try:
        wait_until(lambda: (run / "authdaemon" / "socket").exists(), "Courier's authdaemond")
        tcpd = [
            "/usr/sbin/couriertcpd",
            "-address=127.0.0.1",
            "-nodnslookup",
            "-noidentlookup",
            "-maxprocs=40",
            "-maxperip=40",
            str(port),
            str(courier / "courierpop3login"),
            str(courier / "courierpop3d"),
            "Maildir",
        ]
        procs.append(_spawn(_in_namespace(binds, tcpd), log, env))
        _wait_greeting(procs, port, b"+OK", log)
    except BaseException:
        for proc in reversed(procs):
            _stop(proc)
        raise
    return CourierServer(root, port, tls, procs)


def _sha_scheme(password: str) -> str:
    """courier-authlib's ``{SHA}`` password scheme: base64 of the SHA-1 digest."""
    digest = hashlib.sha1(password.encode(), usedforsecurity=False).digest()
    return "{SHA}" + base64.b64encode(digest).decode("ascii")


def stop_courier(server: CourierServer) -> None:
    for proc in reversed(server.procs):  # couriertcpd first, then authdaemond
        _stop(proc)
    shutil.rmtree(server.root, ignore_errors=True)


_MAILUTILS_CONF = """\
# A private GNU mailutils pop3d for tests (tests/mailservers.py)
mode daemon;
foreground yes;
pidfile {root}/pop3d.pid;
logging {{ syslog no; }};
auth {{ authentication generic:system; authorization system; }};
# A directory is read as a Maildir, a file as an mbox: one server for both kinds of mailbox.
mailbox {{ mailbox-pattern "{root}/mail/${{user}}"; }};
mandatory-locking {{ enable yes; lock-directory {root}/locks; }};
tls-file-checks {{ key-file none; cert-file none; ca-file none; }};
server 127.0.0.1:{port} {{
  tls-mode stls;
  tls {{ ssl-certificate-file {root}/tls/cert.pem; ssl-key-file {root}/tls/key.pem; }};
}};
"""


@dataclass
class MailutilsServer:
    """GNU mailutils pop3d with STLS; its users are system accounts (:class:`SystemUsers`),
    each with a Maildir or an mbox of its own.

    Quirks seen: RETR's ``+OK`` carries no octet count; it inserts an ``X-UIDL:`` line into each
    message it serves and rewrites the mailbox after the first session (Maildir: sizes change,
    the UIDL stays; mbox: ``X-UID:``, ``Status:``, ``X-IMAPbase:`` are added too); a message
    without a final newline is counted two octets short; an mbox is read as mboxrd (a stored
    ``>From `` line is served without its first ``>``); a headers-only message without an
    empty line is served as its ``X-UIDL:`` line alone from a Maildir, and from an mbox with
    the next message as its body (the empty line that ends an mbox entry is taken for the end
    of its header block); the greeting carries an APOP timestamp, though APOP works only with
    an APOP database (so ``auth = "auto"`` over a connection without TLS picks APOP, and fails).
    """

    root: Path
    port: int
    tls: TlsFiles
    proc: subprocess.Popen[bytes] = field(repr=False)
    users: SystemUsers = field(default_factory=SystemUsers, repr=False)
    kinds: dict[str, str] = field(default_factory=dict, repr=False)  # user -> maildir | mbox

    def add_user(self, kind: str) -> tuple[str, str]:
        """A fresh system account with an empty ``kind`` ("maildir" or "mbox") mailbox."""
        user, password = self.users.add()
        self.kinds[user] = kind
        box = self.root / "mail" / user
        if kind == "maildir":
            _write_maildir(box, [], user)
        else:
            box.write_bytes(b"")
            shutil.chown(box, user, None)
            box.chmod(0o600)
        return user, password

    def endpoint(self, user: str, password: str) -> Pop3Endpoint:
        return Pop3Endpoint("127.0.0.1", self.port, "starttls", self.tls.ca_file, user, password)

    def deliver_many(self, user: str, raws: Sequence[bytes]) -> None:
        box = self.root / "mail" / user
        if self.kinds[user] == "maildir":
            _write_maildir(box, raws, user)
        else:
            box.write_bytes(mbox_bytes(raws))


def start_mailutils() -> MailutilsServer:
    root = _root("mailutils-test-")
    (root / "mail").mkdir()
    (root / "locks").mkdir(mode=0o1777)
    (root / "locks").chmod(0o1777)
    tls = TlsFiles.make(root / "tls")
    port = free_port()
    (root / "pop3d.conf").write_text(_MAILUTILS_CONF.format(root=root, port=port))
    log = root / "pop3d.log"
    proc = _spawn(["pop3d", f"--config-file={root / 'pop3d.conf'}"], log)
    try:
        _wait_greeting([proc], port, b"+OK", log)
    except BaseException:
        _stop(proc)
        raise
    return MailutilsServer(root, port, tls, proc)


def stop_mailutils(server: MailutilsServer) -> None:
    _stop(server.proc)
    server.users.remove_all()
    shutil.rmtree(server.root, ignore_errors=True)


@dataclass
class Popa3dServer:
    """popa3d behind socat: ``ports["pop3"]`` plain, ``ports["pop3s"]`` implicit TLS (socat's
    OPENSSL-LISTEN in front; popa3d has no TLS of its own).  Mailboxes are mboxes of system
    accounts in ``/var/mail`` (here: our spool, bind-mounted there).

    Quirks seen: no CAPA at all (``-ERR``), hence no PIPELINING, STLS, UIDL or
    RESP-CODES advertised (UIDL works); RETR's ``+OK`` carries no octet count; the UIDL is a
    digest of a few header fields (Received, Date, Message-ID ...), so two messages without
    them share one (our listing parser refuses a repeated unique-id); ``>From `` lines are
    served as stored; a wrong password is a bare ``-ERR Authentication failed (bad
    password?)`` without an RFC 3206 code.
    """

    root: Path
    ports: dict[str, int]
    tls: TlsFiles
    procs: list[subprocess.Popen[bytes]] = field(repr=False)
    users: SystemUsers = field(default_factory=SystemUsers, repr=False)

    def add_user(self) -> tuple[str, str]:
        user, password = self.users.add()
        box = self.root / "spool" / user
        box.write_bytes(b"")
        shutil.chown(box, user, None)
        box.chmod(0o600)
        return user, password

    def endpoint(self, user: str, password: str, *, tls: bool = True) -> Pop3Endpoint:
        if tls:
            return Pop3Endpoint(
                "127.0.0.1", self.ports["pop3s"], "implicit", self.tls.ca_file, user, password
            )
        return Pop3Endpoint(
            "127.0.0.1", self.ports["pop3"], "none", self.tls.ca_file, user, password
        )

    def deliver_many(self, user: str, raws: Sequence[bytes]) -> None:
        (self.root / "spool" / user).write_bytes(mbox_bytes(raws))


def start_popa3d() -> Popa3dServer:
    popa3d = SERVERS_DIR / "popa3d" / "usr" / "sbin" / "popa3d"
    if not popa3d.exists():
        raise RuntimeError(f"popa3d is not unpacked in {SERVERS_DIR}: run scripts/test")
    root = _root("popa3d-test-")
    (root / "spool").mkdir()
    (root / "spool").chmod(0o1777)
    tls = TlsFiles.make(root / "tls")
    ports = {"pop3": free_port(), "pop3s": free_port()}
    binds = [(root / "spool", "/var/mail")]
    log = root / "socat.log"
    listeners = [
        f"TCP-LISTEN:{ports['pop3']},bind=127.0.0.1,reuseaddr,fork",
        f"OPENSSL-LISTEN:{ports['pop3s']},bind=127.0.0.1,reuseaddr,fork,cert={tls.cert},"
        f"key={tls.key},verify=0",
    ]
    procs = [
        _spawn(_in_namespace(binds, ["socat", lst, f"EXEC:{popa3d}"]), log) for lst in listeners
    ]
    try:
        _wait_greeting(procs, ports["pop3"], b"+OK", log)
        _wait_greeting(procs, ports["pop3s"], b"+OK", log, tls=tls.client_context())
    except BaseException:
        for proc in procs:
            _stop(proc)
        raise
    return Popa3dServer(root, ports, tls, procs)


def stop_popa3d(server: Popa3dServer) -> None:
    for proc in server.procs:
        _stop(proc)
    server.users.remove_all()
    shutil.rmtree(server.root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# What a server serves, read independently of connector.pop3
# --------------------------------------------------------------------------------------------


def served_messages(endpoint: Pop3Endpoint, *, utf8: bool = True) -> dict[str, bytes]:
    """``{UIDL: message}`` as the server serves it now: each RETR's lines with CRLF, the
    stuffing dot of RFC 1939 §3 removed.  A plain socket reader (not our POP3 client), so a
    test compares what arrives with what the server really sent.  With ``utf8`` the RFC 6856
    ``UTF8`` command is sent when CAPA offers it.  Nothing is deleted."""
    ctx = ssl.create_default_context(cafile=str(endpoint.ca_file))
    raw = socket.create_connection((endpoint.host, endpoint.port), timeout=30)
    sock: socket.socket = raw
    if endpoint.tls == "implicit":
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
    reader = sock.makefile("rb")

    def command(line: bytes, multi: bool = False) -> list[bytes]:
        if line:
            sock.sendall(line + b"\r\n")
        status = reader.readline()
        if not status.startswith(b"+OK"):
            if multi:
                return []
            raise RuntimeError(f"{line.split(b' ')[0]!r} refused: {status!r}")
        if not multi:
            return [status]
        lines = []
        while (got := reader.readline()) != b".\r\n":
            if not got:
                raise RuntimeError("connection closed in a multi-line reply")
            lines.append(got[1:] if got.startswith(b".") else got)
        return lines

    try:
        command(b"")  # the greeting
        caps = [line.split()[0].upper() for line in command(b"CAPA", multi=True) if line.split()]
        if endpoint.tls == "starttls":
            command(b"STLS")
            reader.close()
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
            reader = sock.makefile("rb")
            caps = [
                line.split()[0].upper() for line in command(b"CAPA", multi=True) if line.split()
            ]
        if utf8 and b"UTF8" in caps:
            command(b"UTF8")
        command(b"USER " + endpoint.user.encode())
        command(b"PASS " + endpoint.password.encode())
        listing = [line.split() for line in command(b"UIDL", multi=True)]
        served = {uid.decode(): b"".join(command(b"RETR " + n, multi=True)) for n, uid in listing}
        command(b"QUIT")
        return served
    finally:
        with contextlib.suppress(OSError):
            reader.close()
            sock.close()
