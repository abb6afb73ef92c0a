"""The operator commands: ``status``, ``dead-letters list | show | requeue | purge`` and
``ledger export | import``.

They work while ``run`` is running: none but ``ledger import`` takes the state directory's
lock.  The ledger is SQLite in WAL mode, so a second connection reads (and ``requeue`` writes its
one row) beside the service's; a Maildir is safe to change from two processes (docs/design.md
§7.3).  ``ledger import`` replaces an account's rows, which a running service must not see
change under it: it refuses while one holds the lock.

``requeue`` puts a dead letter back on the way it was refused on: our ``X-POP3-Connector-*``
lines removed, the original bytes (no new ``Received:`` line: the first attempt's never left
us), the envelope sender by the configured policy from the message's own Return-Path, and the
recipients its ``X-POP3-Connector-Recipients`` line names (a shared mailbox's message), else
the ``deliver_to`` of the account it came from; ``--to`` overrides both.  Accepted: removed
from the store and recorded in the ledger as delivered.  Refused again: it stays, with the new
reason; the new version is stored durably before the old one is removed, so a crash in between
leaves two copies, never none.

A dead letter goes to the SMTP target of the account it came from (``accounts[].smtp``,
docs/design.md §14.1; ``[smtp]`` for an account no longer configured), with that target's
envelope policy.  In bulk (``requeue --account/--stage/--since/--all``) the selected dead letters
go oldest first, through one SMTP session per target, and a target stops at the first failure
that is about our setup rather than the message (connect, TLS, AUTH, or what
:func:`~connector.cycle.verdict` puts on our setup, as the cycle does: a 530, a refused
``deliver_to`` or relay): every later dead letter for that target would meet the same answer,
and its refusal says nothing about any of them, so they stay as they are.  The other targets
go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final, TextIO

from connector.config import DEFAULT_TARGET
from connector.cycle import SmtpTarget, Verdict, refusal_summary, verdict
from connector.deadletter import (
    DeadLetterArchive,
    DeadLetterInfo,
    DeadLetterRecord,
    parse_dead_letter_headers,
    strip_dead_letter_headers,
)
from connector.errors import AlreadyRunningError, DeliveryError, LedgerError, printable
from connector.ledger import AccountStatus, Ledger
from connector.ledger_export import parse_export
from connector.runtime import Runtime, open_store
from connector.service import (
    SMTP_TRANSCRIPT,
    StateLock,
    ledger_health,
    rfc3339,
    status_document,
)
from connector.shard import shard_of
from connector.smtp import Envelope, SmtpDeliverer, envelope_sender

__all__ = [
    "dead_letters_list",
    "dead_letters_purge",
    "dead_letters_requeue",
    "dead_letters_show",
    "format_table",
    "ledger_export",
    "ledger_import",
    "shard_line",
    "status_command",
]

log = logging.getLogger(__name__)

EX_OK = 0
EX_FAILED = 1


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: columns padded to their widest cell, the last one left ragged."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [f"{cell!s:<{w}}" for cell, w in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _when(ts: str | None) -> str:
    return ts.replace("T", " ") if ts else "-"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


async def _ledger_rows(runtime: Runtime) -> tuple[list[AccountStatus], dict[str, Any]]:
    """The accounts' rows, and whether the ledger takes a write (a heartbeat, as the service
    commits before a cycle's first SMTP transaction: status runs in its own process, and the
    service's cycle records stop when the ledger cannot be written)."""
    if not runtime.ledger_path.exists():
        # Never ran: do not create a ledger just to read it.
        return [], ledger_health(runtime.ledger_path, None)
    ledger = await Ledger.open(runtime.ledger_path)
    try:
        with contextlib.suppress(LedgerError):  # ledger.write_error says why
            await ledger.prove_writable(time.time())
        return await ledger.account_status(), ledger_health(runtime.ledger_path, ledger)
    finally:
        await ledger.close()


async def status_command(runtime: Runtime, *, as_json: bool, out: TextIO) -> int:
    """Print a table (or the ``/status`` JSON) per account, from the ledger and the store.

    With ``--shard`` (``runtime.shard``), the accounts this replica owns; a line above the
    table says which shard it is and how many of the configured accounts that is."""
    rows, health = await _ledger_rows(runtime)
    counts = await open_store(runtime).count_by_account()
    doc = status_document(
        [spec.name for spec in runtime.accounts],
        rows,
        counts,
        ledger=health,
        targets={name: target.name for name, target in runtime.account_targets().items()},
        shard=runtime.shard,
        elsewhere=runtime.elsewhere,
        disabled=runtime.disabled_names,
    )
    if as_json:
        print(json.dumps(doc, indent=2, ensure_ascii=False), file=out)
        return EX_OK
    if runtime.shard.count > 1:
        print(shard_line(runtime) + "\n", file=out)
    table = [
        [
            a["name"],
            _when(a["last_cycle_finished"] or a["last_cycle_started"]),
            "failing" if a["failing"] else (a["result"] or "never"),
            _dash(a["mailbox_messages"]),
            str(a["deferred"]),
            str(a["dead_letters"]),
            "disabled" if a["name"] in runtime.disabled_names else _when(a["next_poll"]),
            _dash(a["smtp_target"]),
            a["last_error"] or "",
        ]
        for a in doc["accounts"]
    ]
    headers = [
        "ACCOUNT",
        "LAST CYCLE (UTC)",
        "RESULT",
        "UPSTREAM",
        "DEFERRED",
        "DEAD LETTERS",
        "NEXT POLL (UTC)",
        "SMTP",
        "LAST ERROR",
    ]
    print(format_table(headers, table), file=out)
    if health["writable"] is False:
        # The cycles' own records stop with the ledger, so the table above may look fine.
        print(f"\nLEDGER NOT WRITABLE: no mail is delivered. {health['error']}", file=out)
    return EX_OK


def shard_line(runtime: Runtime) -> str:
    """``shard 1/3: 98 of 300 accounts`` (``check``, ``status``): those of the config this
    process owns (``runtime.accounts`` and ``disabled``) of all it has."""
    owned = len(runtime.accounts) + len(runtime.disabled)
    total = owned + len(runtime.elsewhere)
    return f"shard {runtime.shard}: {owned} of {total} accounts"


# --------------------------------------------------------------------------------------------
# dead-letters
# --------------------------------------------------------------------------------------------


def _record_json(r: DeadLetterRecord) -> dict[str, Any]:
    # Escaped as in the table: JSON would carry a control character through to its reader.
    return {
        "id": r.id,
        "account": printable(r.account),
        "uidl": printable(r.uidl),
        "stage": printable(r.stage),
        "response": printable(r.response),
        "failed_at": rfc3339(r.failed_at.timestamp()),
        "size": r.size,
    }


async def dead_letters_list(runtime: Runtime, *, as_json: bool, out: TextIO) -> int:
    """Every dead letter, oldest first: id, account, when, stage, size, the refusal."""
    records = await open_store(runtime).list()
    if as_json:
        print(json.dumps({"dead_letters": [_record_json(r) for r in records]}, indent=2), file=out)
        return EX_OK
    if not records:
        print(f"no dead letters in {runtime.dead_letter_where}", file=out)
        return EX_OK
    # The values were sanitised when written, but anyone with access to the store can plant a
    # dead letter (an IMAP folder is a mailbox): escape what is shown.
    rows = [
        [
            printable(r.id),
            printable(r.account),
            _when(rfc3339(r.failed_at.timestamp())),
            printable(r.stage),
            str(r.size),
            printable(r.response),
        ]
        for r in records
    ]
    # The message as fetched, without our header lines (what requeue sends): a `size` refusal
    # counts what would have gone out, with the Received: line on top, so it says more octets.
    headers = ["ID", "ACCOUNT", "FAILED AT (UTC)", "STAGE", "ORIGINAL SIZE", "RESPONSE"]
    print(format_table(headers, rows), file=out)
    return EX_OK


async def dead_letters_show(
    runtime: Runtime,
    dl_id: str,
    *,
    out: BinaryIO,
    err: TextIO,
    eml: Path | None = None,
    terminal: bool = False,
) -> int:
    """Write the stored message (our header lines, then the original) to ``out``, or to the
    file ``eml``: a message file Outlook and other mail clients open (RFC 5322; our
    ``X-POP3-Connector-*`` lines are header fields like any other).  A file, not a shell
    redirection: Windows PowerShell 5.1's ``>`` re-encodes the bytes as UTF-16.

    ``terminal`` (``out`` is one): the message is anyone's bytes, so control characters but
    TAB, CR and LF are shown escaped (an ESC[2J in a Subject would clear the screen), and
    bytes that are not UTF-8 as ``\\xNN``; ``eml`` and a pipe get the bytes unchanged."""
    try:
        data = await open_store(runtime).get(dl_id)
    except KeyError:
        print(f"pop3-connector: no dead letter {dl_id!r}", file=err)
        return EX_FAILED
    if eml is None:
        out.write(_for_terminal(data) if terminal else data)
        out.flush()
        return EX_OK
    try:
        await asyncio.to_thread(_write_private, eml, data)
    except OSError as exc:
        print(f"pop3-connector: cannot write {eml}: {exc.strerror or exc}", file=err)
        return EX_FAILED
    print(f"{dl_id}: written to {eml} ({len(data)} bytes)", file=err)
    return EX_OK


_NOT_LINE_LAYOUT: Final = re.compile(r"[^\t\r\n]+")


def _for_terminal(data: bytes) -> bytes:
    """``data`` as UTF-8 with every control character but TAB, CR and LF escaped
    (:func:`~connector.errors.printable`), and each byte that is not UTF-8 as ``\\xNN``."""
    text = data.decode("utf-8", errors="backslashreplace")
    return _NOT_LINE_LAYOUT.sub(lambda m: printable(m[0]), text).encode("utf-8")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` owner-only (0600), whether or not ``path`` exists.

    Mail is private, as the dead-letter store itself (README "Permissions").  Opening an
    existing file keeps its mode (``O_CREAT``'s mode applies only to a new file), so the bytes
    go to a new file beside it, made 0600 by ``mkstemp``, which then replaces ``path``
    (``os.replace``: atomic on POSIX; a symbolic link at ``path`` is replaced, not followed).
    """
    if path.is_dir():  # `--eml /tmp/`: the file's name is missing
        raise IsADirectoryError(errno.EISDIR, "it is a directory; name a file in it")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def dead_letters_purge(
    runtime: Runtime, older_than: float, *, out: TextIO, now: float | None = None
) -> int:
    """Remove the dead letters that failed more than ``older_than`` seconds ago."""
    store = open_store(runtime)
    cutoff = (time.time() if now is None else now) - older_than
    removed = 0
    for record in await store.list():
        if record.failed_at.timestamp() < cutoff:
            try:
                await store.remove(record.id)
            except KeyError:
                continue  # removed meanwhile (another purge, a mail client)
            log.info(
                "dead letter %s purged (account=%s uidl=%s failed %s)",
                record.id,
                record.account,
                record.uidl,
                rfc3339(record.failed_at.timestamp()),
            )
            removed += 1
    print(f"purged {removed} dead letter(s)", file=out)
    return EX_OK


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a bulk ``requeue`` takes.  Every criterion given must hold (AND);
    none given (``--all``) takes them all.  ``since``: failed at or after this instant."""

    accounts: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    since: datetime | None = None

    def matches(self, record: DeadLetterRecord) -> bool:
        """Whether ``record`` is selected."""
        return (
            (not self.accounts or record.account in self.accounts)
            and (not self.stages or record.stage in self.stages)
            and (self.since is None or record.failed_at >= self.since)
        )


class Outcome(enum.Enum):
    """What became of one dead letter in a requeue."""

    DELIVERED = "delivered"
    PARTIAL = "partly delivered"  # to some; a new dead letter names the others
    REFUSED_AGAIN = "refused again"  # kept, with the new reason
    UNCHANGED = "not delivered"  # a temporary refusal, or our setup failed: kept as it was
    NOT_ATTEMPTED = "not attempted"
    GONE = "gone"  # removed meanwhile (a purge, another requeue, a mail client)


@dataclass(frozen=True, slots=True)
class _Result:
    outcome: Outcome
    text: str  # one line, without the "pop3-connector: " prefix
    setup_failed: bool = False  # the batch must stop here (for this SMTP target)


@dataclass(frozen=True, slots=True)
class _Plan:
    """One dead letter, read and ready to send: its original bytes and whom they go to."""

    info: DeadLetterInfo
    original: bytes
    recipients: tuple[str, ...]  # () when no recipient is known (see ``problem``)
    problem: str | None  # why it cannot be sent as it is


async def _plan(
    runtime: Runtime, store: DeadLetterArchive, dl_id: str, to: Sequence[str] | None
) -> _Plan | _Result:
    try:
        stored = await store.get(dl_id)
    except KeyError:
        return _Result(Outcome.GONE, f"no dead letter {dl_id!r}")
    parsed = parse_dead_letter_headers(stored)
    if parsed is None:
        return _Result(
            Outcome.NOT_ATTEMPTED, f"{dl_id}: not attempted: no X-POP3-Connector-* header lines"
        )
    info, _ = parsed
    original = strip_dead_letter_headers(stored)
    if to:
        return _Plan(info, original, tuple(to), None)
    if info.recipients:
        # A shared mailbox's message, or a copy for the recipients that refused it: to them.
        return _Plan(info, original, info.recipients, None)
    # A disabled account is configured, only not polled: its deliver_to still holds.
    deliver_to = runtime.deliver_to.get(info.account)
    if deliver_to is None:
        problem = f"account {info.account!r} is not configured; give the recipient with --to ADDR"
        return _Plan(info, original, (), problem)
    return _Plan(info, original, deliver_to, None)


class _History:
    """The ledger, opened on first use and kept for a whole batch.  Without a ledger (the
    store came from elsewhere) there is no history to write."""

    def __init__(self, runtime: Runtime) -> None:
        self._path = runtime.ledger_path
        self._ledger: Ledger | None = None

    async def _open(self) -> Ledger | None:
        if self._ledger is None and self._path.exists():
            self._ledger = await Ledger.open(self._path)
        return self._ledger

    async def record(
        self,
        info: DeadLetterInfo,
        size: int,
        response: str,
        when: float,
        dead_letter_id: str | None,
    ) -> None:
        """``delivered``, or ``dead_lettered`` again under the new id."""
        ledger = await self._open()
        if ledger is None:
            return
        if dead_letter_id is None:
            await ledger.record_delivered(info.account, info.uidl, size, response, when)
        else:
            await ledger.record_dead_lettered(
                info.account, info.uidl, size, response, when, dead_letter_id=dead_letter_id
            )

    async def close(self) -> None:
        if self._ledger is not None:
            await self._ledger.close()


async def dead_letters_requeue(
    runtime: Runtime,
    dl_id: str | None,
    *,
    to: Sequence[str] | None,
    out: TextIO,
    err: TextIO,
    selection: Selection | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> int:
    """Deliver one dead letter (``dl_id``) or every one ``selection`` takes, again, oldest
    first, through one SMTP session (see the module docstring).

    A batch stops at the first failure of our own setup: the dead letters after it are not
    attempted (nothing about them is known), and the command can simply be run again once
    the setup is fixed.  ``dry_run`` lists what would be sent and sends nothing.
    0 when every one was delivered; 1 when any was refused, not delivered or not attempted.
    """
    store = open_store(runtime)
    if dl_id is not None:
        ids = [dl_id]
    else:
        chosen = selection if selection is not None else Selection()
        ids = [r.id for r in await store.list() if chosen.matches(r)]
        if not ids:
            print(f"no dead letters selected in {runtime.dead_letter_where}", file=out)
            return EX_OK
    if dry_run:
        return await _dry_run(runtime, store, ids, to, out=out, err=err, single=dl_id is not None)

    single = dl_id is not None
    counts = dict.fromkeys(Outcome, 0)
    history = _History(runtime)
    sessions = _Sessions(runtime)
    try:
        for current in ids:
            result = await _requeue_one(runtime, store, sessions, history, current, to, now)
            counts[result.outcome] += 1
            if single:
                ok = result.outcome is Outcome.DELIVERED
                print(
                    result.text if ok else f"pop3-connector: {result.text}", file=out if ok else err
                )
                break
            gone = result.outcome is Outcome.GONE
            print(f"{current}: gone (removed meanwhile)" if gone else result.text, file=out)
    finally:
        await sessions.close()
        await history.close()
    for target, (stopped_at, skipped) in sessions.stopped.items():
        table = "[smtp]" if target == DEFAULT_TARGET else f"[smtp_targets.{target}]"
        others = f"; {skipped} dead letter(s) not attempted" if skipped else ""
        print(
            f"pop3-connector: stopped at {stopped_at}: the SMTP setup failed, not the message"
            f"{others}.  Fix {table} or the receive connector "
            "(pop3-connector check --connect), then run the same command again.",
            file=err,
        )
    if not single:
        summary = ", ".join(f"{n} {o.value}" for o, n in counts.items() if n)
        print(f"requeue: {summary}", file=out)
    failed = sum(n for o, n in counts.items() if o not in (Outcome.DELIVERED, Outcome.GONE))
    if single and counts[Outcome.GONE]:
        failed += 1  # the one ID asked for does not exist
    return EX_FAILED if failed else EX_OK


async def _dry_run(
    runtime: Runtime,
    store: DeadLetterArchive,
    ids: Sequence[str],
    to: Sequence[str] | None,
    *,
    out: TextIO,
    err: TextIO,
    single: bool,
) -> int:
    """List what a real run would send: id, account, stage, recipients, size.  Sends nothing,
    changes nothing."""
    rows: list[list[str]] = []
    unsendable = 0
    for dl_id in ids:
        plan = await _plan(runtime, store, dl_id, to)
        if isinstance(plan, _Result):
            if single:
                print(f"pop3-connector: {plan.text}", file=err)
                return EX_FAILED
            continue  # gone meanwhile, or not one of ours: a real run would not send it
        recipients = (
            ", ".join(plan.recipients) if plan.problem is None else "- (" + plan.problem + ")"
        )
        unsendable += plan.problem is not None
        # Anyone with access to the store can plant a dead letter: escape what is shown.
        cells = [dl_id, plan.info.account, plan.info.stage, recipients, str(len(plan.original))]
        rows.append([printable(cell) for cell in cells])
    print(format_table(["ID", "ACCOUNT", "STAGE", "RECIPIENTS", "SIZE"], rows), file=out)
    # Only those a real run would send: one without a recipient would be "not attempted".
    held = f", {unsendable} would not (no recipient: see above)" if unsendable else ""
    print(
        f"dry run: {len(rows) - unsendable} dead letter(s) would be requeued{held}; nothing sent",
        file=out,
    )
    return EX_FAILED if unsendable else EX_OK


class _Sessions:
    """One SMTP session per target for a batch, opened on first use (docs/design.md §14.1),
    and the targets whose setup failed: their later dead letters are not attempted."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._targets = runtime.account_targets()
        self._deliverers: dict[str, SmtpDeliverer] = {}
        # target name -> (the dead letter it stopped at, how many were not attempted since)
        self.stopped: dict[str, tuple[str, int]] = {}

    def target(self, account: str) -> SmtpTarget:
        """The target of the account a dead letter came from ([smtp] if it is not
        configured any more)."""
        return self._targets.get(account) or self._runtime.default_target

    def deliverer(self, target: SmtpTarget) -> SmtpDeliverer:
        found = self._deliverers.get(target.name)
        if found is None:
            transcript = SMTP_TRANSCRIPT if self._runtime.transcripts else None
            found = self._deliverers[target.name] = SmtpDeliverer(
                target.settings, transcript=transcript
            )
        return found

    def skip(self, target: SmtpTarget) -> bool:
        """True (and counted) when ``target``'s setup failed earlier in the batch."""
        stopped = self.stopped.get(target.name)
        if stopped is None:
            return False
        self.stopped[target.name] = (stopped[0], stopped[1] + 1)
        return True

    async def close(self) -> None:
        for deliverer in self._deliverers.values():
            await deliverer.close()


async def _requeue_one(
    runtime: Runtime,
    store: DeadLetterArchive,
    sessions: _Sessions,
    history: _History,
    dl_id: str,
    to: Sequence[str] | None,
    now: float | None,
) -> _Result:
    plan = await _plan(runtime, store, dl_id, to)
    if isinstance(plan, _Result):
        return plan
    target = sessions.target(plan.info.account)
    if sessions.skip(target):
        return _Result(Outcome.NOT_ATTEMPTED, f"{dl_id}: not attempted")
    if plan.problem is not None:
        return _Result(Outcome.NOT_ATTEMPTED, f"{dl_id}: not attempted: {plan.problem}")
    info, original, recipients = plan.info, plan.original, plan.recipients
    policy = target.policy
    sender, sender_fixed = envelope_sender(original, policy.sender_policy, policy.fixed_sender)
    envelope = Envelope(sender, recipients, sender_fixed=sender_fixed)
    try:
        delivered = await sessions.deliverer(target).deliver(original, envelope)
    except DeliveryError as exc:
        result = await _refused_again(store, history, dl_id, info, original, exc, now)
        if result.setup_failed:
            sessions.stopped[target.name] = (dl_id, 0)
        return result
    when = time.time() if now is None else now

    if delivered.refused:
        # Accepted for some, refused (temporarily: a permanent refusal of one of the recipients
        # given aborts before DATA) for others: those who have it must not get it twice, so a
        # new dead letter names only the others; it is stored before the old one goes.
        refused = tuple(delivered.refused)
        summary = refusal_summary(delivered.refused)
        new_id = await store.put(
            original,
            DeadLetterInfo(
                account=info.account,
                uidl=info.uidl,
                stage="rcpt",
                response=summary,
                failed_at=datetime.fromtimestamp(when, UTC),
                recipients=refused,
            ),
        )
        await store.remove(dl_id)
        accepted = [r for r in recipients if r not in delivered.refused]
        return _Result(
            Outcome.PARTIAL,
            f"{dl_id}: partly delivered: to {', '.join(accepted)} only; refused by "
            f"{summary}; kept for {', '.join(refused)} as {new_id}",
        )

    await store.remove(dl_id)
    log.info(
        "account=%s uidl=%s size=%d outcome=requeued smtp=%r",
        info.account,
        info.uidl,
        len(original),
        delivered.response,
    )
    try:
        await history.record(info, len(original), delivered.response, when, None)
    except LedgerError as exc:
        # Delivered and out of the store: the ledger row is only the history.
        log.warning("%s delivered, but the ledger was not updated: %s", dl_id, exc)
    return _Result(
        Outcome.DELIVERED, f"{dl_id}: delivered to {', '.join(recipients)}: {delivered.response}"
    )


async def _refused_again(
    store: DeadLetterArchive,
    history: _History,
    dl_id: str,
    info: DeadLetterInfo,
    original: bytes,
    exc: DeliveryError,
    now: float | None,
) -> _Result:
    decided = verdict(exc)
    if decided in (Verdict.OUR_SETUP, Verdict.UNDECIDED):
        # A failure the next dead letter would meet just the same (connect, TLS, AUTH, a 530,
        # a refused --to; or the null sender refused with nothing yet to test another sender
        # with): nothing was said about this message, so its recorded reason stays.
        return _Result(
            Outcome.UNCHANGED, f"{dl_id}: not delivered, unchanged: {exc}", setup_failed=True
        )
    if decided is Verdict.TEMPORARY:
        # Nothing final was said either; the next dead letter may go through.
        return _Result(Outcome.UNCHANGED, f"{dl_id}: not delivered, unchanged: {exc}")
    when = time.time() if now is None else now
    new_info = DeadLetterInfo(
        account=info.account,
        uidl=info.uidl,
        stage=str(exc.stage),
        response=exc.response,
        failed_at=datetime.fromtimestamp(when, UTC),
        recipients=info.recipients,
    )
    # The new version first, durably; then the old one goes (two copies at worst, never none).
    new_id = await store.put(original, new_info)
    await store.remove(dl_id)
    log.warning(
        "account=%s uidl=%s size=%d outcome=refused_again smtp=%r dead_letter=%s",
        info.account,
        info.uidl,
        len(original),
        f"{exc.stage}: {exc.response}",
        new_id,
    )
    try:
        await history.record(info, len(original), exc.response, when, new_id)
    except LedgerError as lexc:
        log.warning("%s kept as %s, but the ledger was not updated: %s", dl_id, new_id, lexc)
    return _Result(
        Outcome.REFUSED_AGAIN,
        f"{dl_id}: refused again ({exc}); kept as {new_id} with the new reason",
    )


# --------------------------------------------------------------------------------------------
# ledger export / import (docs/design.md §14.3)
# --------------------------------------------------------------------------------------------


def _configured(runtime: Runtime) -> set[str]:
    """Every account name of the config, enabled or not, whichever shard owns it."""
    names = {s.name for s in (*runtime.accounts, *runtime.disabled)} | set(runtime.elsewhere)
    return names | set(runtime.target_names)


def _not_owned(runtime: Runtime, names: Sequence[str]) -> list[str]:
    """With ``--shard``: the names this shard does not own, one line each."""
    return [
        f"account {name} is not shard {runtime.shard}'s (it is shard "
        f"{shard_of(name, runtime.shard.count)}/{runtime.shard.count}'s)"
        for name in names
        if not runtime.shard.owns(name)
    ]


async def ledger_export(
    runtime: Runtime, names: Sequence[str], *, out: TextIO, err: TextIO, now: float | None = None
) -> int:
    """Write the ledger rows of the named accounts to ``out`` (the export file's JSON).

    Reads beside a running service (WAL; no lock taken).  An account with no rows is exported
    empty, with a note, when it is configured; a name neither configured nor in the ledger is
    an error (a typo would otherwise export nothing, and the import would then delete the new
    owner's nothing, silently).  With ``--shard``, an account the shard does not own is an
    error: it was exported from the wrong replica."""
    names = list(dict.fromkeys(names))
    problems = _not_owned(runtime, names)
    if not runtime.ledger_path.exists():
        problems.append(f"no ledger at {runtime.ledger_path} (never ran here?)")
    if problems:
        for problem in problems:
            print(f"pop3-connector: ledger export: {problem}", file=err)
        return EX_FAILED
    ledger = await Ledger.open(runtime.ledger_path)
    try:
        when = rfc3339(time.time() if now is None else now) or ""
        export = await ledger.export_accounts(names, exported_at=when)
    finally:
        await ledger.close()
    configured = _configured(runtime)
    unknown = [a.name for a in export.accounts if not a.count and a.name not in configured]
    if unknown:
        for name in unknown:
            print(
                f"pop3-connector: ledger export: no account {name} in the config or the ledger",
                file=err,
            )
        return EX_FAILED
    out.write(export.dumps())
    out.flush()
    for account in export.accounts:
        note = "" if account.count else " (none: it has never been polled with this ledger)"
        print(
            f"account {account.name}: {len(account.messages)} message row(s), "
            f"{len(account.recipients_done)} recipient row(s), cycle record "
            f"{'yes' if account.account is not None else 'no'}{note}",
            file=err,
        )
    return EX_OK


async def ledger_import(
    runtime: Runtime, source: Path | BinaryIO, *, replace: bool, out: TextIO, err: TextIO
) -> int:
    """Write the rows of an export file into this ledger, in one transaction.

    Takes the state directory's lock: a running service must not have its ledger changed
    under it (AlreadyRunningError, exit 75).  An account with rows here already is refused
    (exit 1, nothing written) unless ``replace``; so is, with ``--shard``, an account the
    shard does not own."""
    label = str(source) if isinstance(source, Path) else "standard input"
    try:
        read = source.read_bytes if isinstance(source, Path) else source.read
        data = await asyncio.to_thread(read)
    except OSError as exc:
        print(f"pop3-connector: cannot read {label}: {exc.strerror or exc}", file=err)
        return EX_FAILED
    try:
        export = parse_export(data)
    except ValueError as exc:
        print(f"pop3-connector: {label}: {exc}", file=err)
        return EX_FAILED
    names = [a.name for a in export.accounts]
    problems = _not_owned(runtime, names)
    if problems:
        for problem in problems:
            print(f"pop3-connector: ledger import: {problem}; nothing imported", file=err)
        return EX_FAILED
    configured = _configured(runtime)
    for name in names:
        if name not in configured:
            print(f"warning: account {name} is not in the config {label} is for", file=err)
    try:
        lock = StateLock(runtime.state_dir)
        lock.acquire()
    except AlreadyRunningError as exc:
        raise AlreadyRunningError(
            f"ledger import: {exc}; stop it first (its ledger must not change under it)"
        ) from None
    try:
        ledger = await Ledger.open(runtime.ledger_path)
        try:
            result = await ledger.import_accounts(export, replace=replace)
        except ValueError as exc:
            print(f"pop3-connector: {label}: {exc}; nothing imported", file=err)
            return EX_FAILED
        finally:
            await ledger.close()
    finally:
        lock.release()
    if result.conflicts and not replace:
        for name, count in result.conflicts.items():
            print(
                f"pop3-connector: ledger import: account {name} has {count} row(s) in "
                f"{runtime.ledger_path} already; nothing imported.  Rows left from before the "
                "account moved away (an earlier resharding) are older than the file: then "
                "run the same command with --replace",
                file=err,
            )
        return EX_FAILED
    for name, count in result.imported.items():
        replaced = result.conflicts.get(name)
        was = f" (replacing {replaced})" if replaced else ""
        print(f"account {name}: {count} row(s) imported{was}", file=out)
    return EX_OK
