"""The benchmark corpus: generated from a fixed seed, cached on disk, copied into Maildirs.

Messages are stored with CRLF line ends, as they go over the wire (RFC 1939 §3, RFC 5321
§2.3.8), so a file's size is its size on the wire before dot-stuffing.  Some text lines start
with "." so that every client has to dot-stuff and un-stuff.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SENDER: Final = "sender@bench.example"
RECIPIENT: Final = "bench@example.test"
_WORDS: Final = (
    "invoice",
    "order",
    "delivery",
    "meeting",
    "agenda",
    "report",
    "quarter",
    "budget",
    "customer",
    "supplier",
    "contract",
    "schedule",
    "offer",
    "payment",
    "reminder",
    "account",
    "balance",
    "project",
    "update",
    "review",
    "approval",
    "draft",
    "Köln",
    "Grüße",
    "Straße",
    "Müller",
    "office",
    "printer",
    "network",
    "backup",
    "server",
    "mailbox",
    "weekend",
    "holiday",
)


@dataclass(frozen=True, slots=True)
class Message:
    """One corpus message: where it is stored and what identifies it at the receiver."""

    msgid: str
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class Mailbox:
    """The messages one account holds, in delivery order."""

    messages: tuple[Message, ...]

    @property
    def size(self) -> int:
        return sum(m.size for m in self.messages)


def _line_pool(rng: random.Random, count: int) -> list[bytes]:
    pool = []
    for n in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 12))]
        line = " ".join(words)
        if n % 40 == 0:
            line = "." + line  # RFC 1939 §3 / RFC 5321 §4.5.2: needs dot-stuffing
        elif n % 97 == 0:
            line = ""
        pool.append(line.encode())
    return pool


def _headers(msgid: str, subject: str, rng: random.Random, extra: str) -> bytes:
    day = 1 + rng.randrange(28)
    return (
        f"Return-Path: <{SENDER}>\r\n"
        f"From: Bench Sender <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, {day:02d} Feb 2026 10:{rng.randrange(60):02d}:00 +0100\r\n"
        f"Message-ID: {msgid}\r\n"
        f"MIME-Version: 1.0\r\n{extra}"
    ).encode()


def text_message(rng: random.Random, pool: list[bytes], msgid: str, target: int) -> bytes:
    """A plain-text message of about ``target`` bytes."""
    head = _headers(msgid, f"Text {msgid}", rng, "Content-Type: text/plain; charset=utf-8\r\n")
    lines: list[bytes] = []
    size = len(head) + 2
    while size < target:
        line = rng.choice(pool)
        lines.append(line)
        size += len(line) + 2
    return head + b"\r\n" + b"\r\n".join(lines) + b"\r\n"


def attachment_message(rng: random.Random, pool: list[bytes], msgid: str, target: int) -> bytes:
    """A multipart message of about ``target`` bytes, mostly a base64 attachment."""
    boundary = f"=_bench_{rng.getrandbits(64):016x}"
    head = _headers(
        msgid,
        f"Scan {msgid}",
        rng,
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n',
    )
    text = b"\r\n".join(rng.choice(pool) for _ in range(20))
    # base64 grows by 4/3 and adds CRLF every 76 characters (RFC 2045 §6.8).
    raw_len = max(0, (target - len(head) - len(text) - 400) * 57 // 78)
    payload = base64.encodebytes(rng.randbytes(raw_len)).replace(b"\n", b"\r\n")
    return b"".join(
        [
            head,
            b"\r\nThis is a multi-part message in MIME format.\r\n\r\n",
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".encode(),
            text,
            b"\r\n\r\n",
            f"--{boundary}\r\nContent-Type: application/pdf\r\n"
            f'Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename="'
            f'scan.pdf"\r\n\r\n'.encode(),
            payload,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )


@dataclass(frozen=True, slots=True)
class CorpusSpec:
    """What to generate: ``accounts`` x ``per_account`` messages; IDs start with ``prefix``."""

    name: str
    accounts: int
    per_account: int
    seed: int = 20260205
    large_fraction: float = 0.2
    small_size: int = 8 * 1024
    large_size: int = 200 * 1024
    prefix: str = "m"

    def key(self) -> str:
        text = json.dumps(
            [
                self.accounts,
                self.per_account,
                self.seed,
                self.large_fraction,
                self.small_size,
                self.large_size,
                self.prefix,
                2,
            ]
        )
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def build(spec: CorpusSpec, cache: Path) -> list[Mailbox]:
    """The corpus for ``spec``, generated into ``cache`` unless it is already there."""
    root = cache / spec.key()
    manifest = root / "manifest.json"
    if not manifest.exists():
        tmp = cache / (spec.key() + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _generate(spec, tmp)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    data = json.loads(manifest.read_text())
    return [Mailbox(tuple(Message(m[0], root / m[1], m[2]) for m in box)) for box in data["boxes"]]


def _generate(spec: CorpusSpec, root: Path) -> None:
    rng = random.Random(spec.seed)
    pool = _line_pool(rng, 4000)
    boxes = []
    for a in range(spec.accounts):
        (root / f"a{a:03d}").mkdir()
        box = []
        for i in range(spec.per_account):
            msgid = f"<{spec.prefix}.{spec.seed}.{a}.{i}@bench.example>"
            jitter = rng.uniform(0.85, 1.15)
            if rng.random() < spec.large_fraction:
                raw = attachment_message(rng, pool, msgid, int(spec.large_size * jitter))
            else:
                raw = text_message(rng, pool, msgid, int(spec.small_size * jitter))
            rel = f"a{a:03d}/{i:05d}.eml"
            (root / rel).write_bytes(raw)
            box.append([msgid, rel, len(raw)])
        boxes.append(box)
    (root / "manifest.json").write_text(json.dumps({"boxes": boxes}))


def one_message(spec_seed: int, msgid: str, size: int, large: bool, path: Path) -> Message:
    """Write one message (for the poison scenario's new mail each cycle) and describe it."""
    rng = random.Random(f"{spec_seed}/{msgid}")
    pool = _line_pool(rng, 200)
    raw = (attachment_message if large else text_message)(rng, pool, msgid, size)
    path.write_bytes(raw)
    return Message(msgid, path, len(raw))


# ------------------------------------------------------------------------------------------
# Maildirs
# ------------------------------------------------------------------------------------------


def maildir(mail_root: Path, user: str) -> Path:
    """The user's Maildir under Dovecot's mail root (``mail_location = maildir:~/Maildir``)."""
    return mail_root / user / "Maildir"


def _chown_nobody(path: Path) -> None:
    shutil.chown(path, "nobody", "nogroup")


def reset_mailbox(mail_root: Path, user: str) -> Path:
    """An empty Maildir for ``user``: the old one, Dovecot's index and UID list, all gone."""
    home = mail_root / user
    shutil.rmtree(home, ignore_errors=True)
    md = home / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    for p in (home, md, md / "cur", md / "new", md / "tmp"):
        _chown_nobody(p)
    return md


_counter = 0


def add_messages(md: Path, messages: tuple[Message, ...] | list[Message]) -> None:
    """Put messages into ``md/new`` in order, as DovecotServer.deliver_many does.

    A hard link to the corpus file (chowned to the mail uid) is as good as a copy: Dovecot
    never writes into a Maildir file, it only renames and unlinks it.  The numeric prefix keeps
    the order Dovecot assigns UIDs in.
    """
    global _counter
    base = int(time.time())
    for m in messages:
        _counter += 1
        name = f"{base}.M{_counter:07d}P{os.getpid()}.bench,S={m.size}"
        target = md / "new" / name
        try:
            os.link(m.path, target)
        except OSError:
            tmp = md / "tmp" / name
            shutil.copyfile(m.path, tmp)
            tmp.rename(target)
        _chown_nobody(target)


def left_in(mail_root: Path, users: list[str]) -> int:
    """How many messages are still in these users' Maildirs."""
    total = 0
    for user in users:
        md = maildir(mail_root, user)
        for sub in ("new", "cur"):
            d = md / sub
            if d.exists():
                total += sum(1 for _ in d.iterdir())
    return total
