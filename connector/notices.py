"""Admin notices: mail to a postmaster about dead letters and failing accounts (``[notices]``).

After a cycle that dead-lettered mail, one digest per account names each dead letter (account,
sender, subject, stage, reason) with the ``dead-letters show/requeue`` commands; when an account
starts failing, and when it recovers, one notice each.  Notices go through the same SMTP server
as the mail, from a fresh connection, with the null envelope sender so that a bounce of a notice
can never loop back to us (RFC 5321 §4.5.5), and ``Auto-Submitted: auto-generated`` (RFC 3834
§5) so that auto-responders leave them alone.

Rate limit: at most one notice per kind and account per ``min_interval``; what is suppressed is
counted and mentioned in the next one.  A "recovered" notice is only sent after a "failing" one
was, so it is bounded by that kind's limit.  The limiter's memory lives in
``<state_dir>/notices.json`` so that ``once`` from cron is limited like ``run``.

A notice that cannot be sent is logged and dropped: it never fails a cycle, never stops the
service and never touches the mail.  Notices carry no secrets: only account names, header
fields of refused mail and the error texts that the log shows too.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP, default
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Final, assert_never

from connector.deadletter import HEADER_BLOCK_MAX, DeadLetterInfo, DeadLetterStore
from connector.smtp import Envelope, SmtpDeliverer, SmtpSettings
from connector.spool import Spooled, head_of

log = logging.getLogger(__name__)

# Header fields of refused mail are untrusted; keep them short and on one line.
_MAX_FIELD: Final = 200
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")


class NoticeKind(enum.StrEnum):
    """What a notice is about; the rate limit counts per kind and account."""

    DEAD_LETTERS = "dead_letters"
    FAILING = "failing"
    RECOVERED = "recovered"
    OVERSIZE = "oversize"  # left upstream over max_message_size; once per message


@dataclass(frozen=True, slots=True)
class NoticeSettings:
    """``[notices]`` turned into plain values (the postmaster is set: notices are on)."""

    postmaster: str
    min_interval: float = 3600.0
    on_dead_letter: bool = True
    on_account_failing: bool = True


@dataclass(frozen=True, slots=True)
class DeadLetterNote:
    """One dead letter as a notice names it."""

    id: str
    account: str
    sender: str
    subject: str
    stage: str
    response: str


def _clean(value: str | None) -> str:
    text = _CONTROL.sub(" ", value or "").strip()
    return text if len(text) <= _MAX_FIELD else text[: _MAX_FIELD - 3] + "..."


def note_for(dl_id: str, raw: bytes, info: DeadLetterInfo) -> DeadLetterNote:
    """What a notice says about one dead letter: its From and Subject (RFC 2047 decoded)."""
    head = BytesHeaderParser(policy=default).parsebytes(raw[:HEADER_BLOCK_MAX])
    try:
        sender, subject = str(head.get("From", "")), str(head.get("Subject", ""))
    except Exception:  # noqa: BLE001 - a malformed header must not cost the notice
        sender = subject = "(unreadable)"
    return DeadLetterNote(
        id=dl_id,
        account=info.account,
        sender=_clean(sender) or "(none)",
        subject=_clean(subject) or "(none)",
        stage=info.stage,
        response=_clean(info.response),
    )


class RecordingStore:
    """Wraps the cycle's dead-letter store and remembers what it stored, for the digest."""

    def __init__(self, store: DeadLetterStore) -> None:
        self.store = store
        self.notes: list[DeadLetterNote] = []

    async def put(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str:
        """Store through the wrapped store; on success remember the dead letter."""
        dl_id = await self.store.put(raw, info)
        self.notes.append(note_for(dl_id, head_of(raw), info))
        return dl_id

    async def remove(self, id: str) -> None:
        """Remove through the wrapped store (its ledger row failed): the digest forgets it."""
        await self.store.remove(id)
        self.notes = [note for note in self.notes if note.id != id]


# --------------------------------------------------------------------------------------------
# The messages
# --------------------------------------------------------------------------------------------


def _message(settings: NoticeSettings, subject: str, body: str, now: float) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"pop3-connector <{settings.postmaster}>"
    msg["To"] = settings.postmaster
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid("pop3-connector", settings.postmaster.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5
    msg["X-Auto-Response-Suppress"] = "All"  # Exchange's own: no out-of-office replies
    # Quoted-printable keeps the message 7-bit whatever the subjects of refused mail contain,
    # so a relay without 8BITMIME (RFC 6152) takes it too.
    msg.set_content(body, charset="utf-8", cte="quoted-printable")
    return msg.as_bytes()


def _suppressed_line(count: int, what: str) -> list[str]:
    if not count:
        return []
    return [
        "",
        f"Rate limit: {count} {what} since the previous notice were not mailed individually.",
    ]


def dead_letter_digest(
    settings: NoticeSettings,
    account: str,
    notes: Sequence[DeadLetterNote],
    suppressed: int,
    now: float,
) -> bytes:
    """The digest of one cycle's dead letters for ``account``, as RFC 5322 bytes (CRLF)."""
    n = len(notes)
    lines = [
        f"pop3-connector moved {n} message{'s' if n != 1 else ''} of account {account} to the "
        "dead-letter store: the mail server refused them permanently.",
        "They were deleted from the provider's mailbox; nothing is lost.",
    ]
    for note in notes:
        lines += [
            "",
            f"Dead letter {note.id}",
            f"  Account: {note.account}",
            f"  From:    {note.sender}",
            f"  Subject: {note.subject}",
            f"  Stage:   {note.stage}",
            f"  Reason:  {note.response}",
            f"  Inspect: pop3-connector dead-letters show {note.id}",
            f"  Requeue: pop3-connector dead-letters requeue {note.id}",
        ]
    lines += _suppressed_line(suppressed, "further dead letters of this account")
    lines += ["", "All dead letters: pop3-connector dead-letters list"]
    subject = f"[pop3-connector] {account}: {n} message{'s' if n != 1 else ''} dead-lettered"
    return _message(settings, subject, "\n".join(lines) + "\n", now)


def failing_notice(
    settings: NoticeSettings, account: str, error: str | None, suppressed: int, now: float
) -> bytes:
    """The notice that ``account`` started failing; its mail waits upstream meanwhile."""
    lines = [
        f"pop3-connector cannot collect the mail of account {account}.",
        f"Error: {_clean(error) or '(unknown)'}",
        "",
        "Its mail waits in the provider's mailbox until the cause is fixed; nothing is",
        "dead-lettered because of this.  Retries continue; a notice follows when the account",
        "recovers.",
        "Check: pop3-connector check --connect",
    ]
    lines += _suppressed_line(suppressed, "failing notices")
    subject = f"[pop3-connector] {account}: account failing"
    return _message(settings, subject, "\n".join(lines) + "\n", now)


def oversize_notice(
    settings: NoticeSettings, account: str, left: Sequence[tuple[str, int]], now: float
) -> bytes:
    """The notice naming messages left upstream for being over ``max_message_size``."""
    n = len(left)
    lines = [
        f"pop3-connector left {n} message{'s' if n != 1 else ''} of account {account} in the "
        "provider's mailbox: larger than its max_message_size.",
        "They stay there, untouched, and block nothing; this notice is sent once for each.",
        "",
        *(f"  UIDL {_clean(uid)}: {size} octets" for uid, size in left),
        "",
        "To collect them: raise max_message_size for this account (or set",
        'oversize = "dead-letter" to move them to the dead-letter store), or remove them with',
        "a mail client.",
    ]
    subject = f"[pop3-connector] {account}: {n} message{'s' if n != 1 else ''} too large"
    return _message(settings, subject, "\n".join(lines) + "\n", now)


def recovered_notice(settings: NoticeSettings, account: str, now: float) -> bytes:
    """The notice that ``account`` completed a cycle again after failing."""
    body = f"pop3-connector collects the mail of account {account} again.\n"
    return _message(settings, f"[pop3-connector] {account}: account recovered", body, now)


# --------------------------------------------------------------------------------------------
# Sending, rate limit, memory
# --------------------------------------------------------------------------------------------

Send = Callable[[SmtpSettings, bytes, Envelope], Awaitable[None]]


async def send_smtp(smtp: SmtpSettings, raw: bytes, envelope: Envelope) -> None:
    """Deliver one notice over a fresh connection (the cycle's may be broken)."""
    async with SmtpDeliverer(smtp) as deliverer:
        await deliverer.deliver(raw, envelope)


@dataclass(slots=True)
class _Memory:
    """Per ``kind:account``: when a notice was last sent and how many were suppressed since;
    and the accounts whose failing was announced (their recovery is owed)."""

    last_sent: dict[str, float] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)
    announced_failing: set[str] = field(default_factory=set)
    # account -> UIDLs of oversized messages left upstream whose notice was sent
    announced_oversize: dict[str, set[str]] = field(default_factory=dict)


class Notifier:
    """Decides after each cycle which notices are due, and sends them.  Never raises."""

    def __init__(
        self,
        state_file: Path | None = None,
        *,
        clock: Callable[[], float],
        send: Send = send_smtp,
    ) -> None:
        self.state_file = state_file
        self.clock = clock
        self.send = send
        self._memory: _Memory | None = None
        self._lock = asyncio.Lock()

    async def after_cycle(
        self,
        settings: NoticeSettings | None,
        smtp: SmtpSettings,
        account: str,
        *,
        ok: bool,
        failing: bool,
        error: str | None,
        dead_letters: Sequence[DeadLetterNote],
        oversize: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Send what this cycle's outcome calls for; ``settings`` None means notices are off.

        ``oversize``: (UIDL, size) of the messages the cycle left upstream as too large.
        """
        if settings is None:
            return
        try:
            async with self._lock:
                await self._after_cycle(
                    settings, smtp, account, ok, failing, error, list(dead_letters)
                )
                if ok:
                    await self._oversize(settings, smtp, account, oversize)
        except Exception:
            # Notices are a courtesy: whatever goes wrong here, the mail and the cycle stand.
            log.exception("account=%s cannot handle the admin notices", account)

    async def _after_cycle(
        self,
        settings: NoticeSettings,
        smtp: SmtpSettings,
        account: str,
        ok: bool,
        failing: bool,
        error: str | None,
        notes: list[DeadLetterNote],
    ) -> None:
        memory = await self._load()
        changed = False
        now = self.clock()
        if notes and settings.on_dead_letter:
            changed |= await self._limited(
                settings, smtp, memory, NoticeKind.DEAD_LETTERS, account, now, len(notes), notes
            )
        if settings.on_account_failing:
            if failing and account not in memory.announced_failing:
                changed = True
                sent = await self._limited(
                    settings, smtp, memory, NoticeKind.FAILING, account, now, 1, error=error
                )
                if sent:
                    memory.announced_failing.add(account)
            elif ok and account in memory.announced_failing:
                changed = True
                if await self._send(
                    settings,
                    smtp,
                    NoticeKind.RECOVERED,
                    account,
                    recovered_notice(settings, account, now),
                ):
                    memory.announced_failing.discard(account)
        if changed:
            await self._save(memory)

    async def _oversize(
        self,
        settings: NoticeSettings,
        smtp: SmtpSettings,
        account: str,
        left: Sequence[tuple[str, int]],
    ) -> None:
        """One notice per oversized message left upstream: they are listed every cycle."""
        memory = await self._load()
        announced = memory.announced_oversize.get(account, set())
        current = {uid for uid, _ in left}
        new = [(uid, size) for uid, size in left if uid not in announced]
        if (
            new
            and settings.on_dead_letter
            and await self._send(
                settings,
                smtp,
                NoticeKind.OVERSIZE,
                account,
                oversize_notice(settings, account, new, self.clock()),
            )
        ):
            announced = announced | {uid for uid, _ in new}
        # Forget the ones gone upstream: a notice names what is there now.
        kept = announced & current
        if kept != memory.announced_oversize.get(account, set()):
            if kept:
                memory.announced_oversize[account] = kept
            else:
                memory.announced_oversize.pop(account, None)
            await self._save(memory)

    async def _limited(
        self,
        settings: NoticeSettings,
        smtp: SmtpSettings,
        memory: _Memory,
        kind: NoticeKind,
        account: str,
        now: float,
        weight: int,
        notes: Sequence[DeadLetterNote] = (),
        error: str | None = None,
    ) -> bool:
        """Send a notice of ``kind`` unless one went out within ``min_interval``; a suppressed
        one adds ``weight`` to the count the next one mentions.  True when sent."""
        key = f"{kind}:{account}"
        last = memory.last_sent.get(key)
        suppressed = memory.suppressed.get(key, 0)
        if last is not None and now - last < settings.min_interval:
            memory.suppressed[key] = suppressed + weight
            log.info("account=%s %s notice suppressed by the rate limit", account, kind)
            return False
        match kind:
            case NoticeKind.DEAD_LETTERS:
                raw = dead_letter_digest(settings, account, notes, suppressed, now)
            case NoticeKind.FAILING:
                raw = failing_notice(settings, account, error, suppressed, now)
            case NoticeKind.RECOVERED | NoticeKind.OVERSIZE:  # pragma: no cover (not limited)
                raw = recovered_notice(settings, account, now)
            case _:
                assert_never(kind)
        if not await self._send(settings, smtp, kind, account, raw):
            return False
        memory.last_sent[key] = now
        memory.suppressed.pop(key, None)
        return True

    async def _send(
        self,
        settings: NoticeSettings,
        smtp: SmtpSettings,
        kind: NoticeKind,
        account: str,
        raw: bytes,
    ) -> bool:
        # Null reverse-path: a notice that bounces produces no bounce (RFC 5321 §4.5.5).
        envelope = Envelope(sender="", recipients=(settings.postmaster,), sender_fixed=True)
        try:
            await self.send(smtp, raw, envelope)
        except Exception as exc:  # noqa: BLE001 - logged; a notice never fails the cycle
            log.warning("account=%s cannot send the %s notice: %s", account, kind, exc)
            return False
        log.info("account=%s %s notice sent to %s", account, kind, settings.postmaster)
        return True

    async def _load(self) -> _Memory:
        if self._memory is None:
            self._memory = await asyncio.to_thread(_read_memory, self.state_file)
        return self._memory

    async def _save(self, memory: _Memory) -> None:
        if self.state_file is not None:
            try:
                await asyncio.to_thread(_write_memory, self.state_file, memory)
            except OSError as exc:
                log.warning("cannot save the notice rate limit to %s: %s", self.state_file, exc)


def _read_memory(path: Path | None) -> _Memory:
    if path is None:
        return _Memory()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _Memory(
            last_sent={str(k): float(v) for k, v in data["last_sent"].items()},
            suppressed={str(k): int(v) for k, v in data["suppressed"].items()},
            announced_failing={str(a) for a in data["announced_failing"]},
            announced_oversize={
                str(k): {str(u) for u in v} for k, v in data.get("announced_oversize", {}).items()
            },
        )
    except FileNotFoundError:
        return _Memory()
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # Losing it costs at most one extra notice; never a reason to stop.
        log.warning("ignoring the unreadable notice state %s: %s", path, exc)
        return _Memory()


def _write_memory(path: Path, memory: _Memory) -> None:
    data = {
        "last_sent": memory.last_sent,
        "suppressed": memory.suppressed,
        "announced_failing": sorted(memory.announced_failing),
        "announced_oversize": {k: sorted(v) for k, v in memory.announced_oversize.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new file, never half of one
