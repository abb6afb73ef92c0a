"""The operator commands: ``status`` and ``dead-letters list | show | requeue | purge``.

They work while ``run`` is running: none takes the state directory's lock.  The ledger is
SQLite in WAL mode, so a second connection reads (and ``requeue`` writes its one row) beside the
service's; a Maildir is safe to change from two processes (PRODUCT §7).

``requeue`` puts a dead letter back on the way it was refused on: our ``X-POP3-Connector-*``
lines removed, the original bytes (no new ``Received:`` line: the first attempt's never left
us), the envelope sender by the configured policy from the message's own Return-Path, and the
recipients its ``X-POP3-Connector-Recipients`` line names (a shared mailbox's message), else
the ``deliver_to`` of the account it came from; ``--to`` overrides both.  Accepted: removed
from the store and recorded in the ledger as delivered.  Refused again: it stays, with the new
reason; the new version is stored durably before the old one is removed, so a crash in between
leaves two copies, never none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, BinaryIO, TextIO

from connector.deadletter import (
    DeadLetterArchive,
    DeadLetterInfo,
    DeadLetterRecord,
    parse_dead_letter_headers,
    strip_dead_letter_headers,
)
from connector.delivery import Envelope, SmtpDeliverer, envelope_sender
from connector.errors import DeliveryError, Disposition, LedgerError, classify
from connector.ledger import AccountStatus, Ledger
from connector.service import (
    SMTP_TRANSCRIPT,
    Runtime,
    ledger_health,
    open_store,
    rfc3339,
    status_document,
)

__all__ = [
    "dead_letters_list",
    "dead_letters_purge",
    "dead_letters_requeue",
    "dead_letters_show",
    "format_table",
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
    """Print a table (or the ``/status`` JSON) per account, from the ledger and the store."""
    rows, health = await _ledger_rows(runtime)
    counts = await open_store(runtime).count_by_account()
    doc = status_document([spec.name for spec in runtime.accounts], rows, counts, ledger=health)
    if as_json:
        print(json.dumps(doc, indent=2, ensure_ascii=False), file=out)
        return EX_OK
    table = [
        [
            a["name"],
            _when(a["last_cycle_finished"] or a["last_cycle_started"]),
            a["result"] or "never",
            _dash(a["mailbox_messages"]),
            str(a["deferred"]),
            str(a["dead_letters"]),
            _when(a["next_poll"]),
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
        "LAST ERROR",
    ]
    print(format_table(headers, table), file=out)
    if health["writable"] is False:
        # The cycles' own records stop with the ledger, so the table above may look fine.
        print(f"\nLEDGER NOT WRITABLE: no mail is delivered. {health['error']}", file=out)
    return EX_OK


# --------------------------------------------------------------------------------------------
# dead-letters
# --------------------------------------------------------------------------------------------


def _record_json(r: DeadLetterRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "account": r.account,
        "uidl": r.uidl,
        "stage": r.stage,
        "response": r.response,
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
    rows = [
        [
            r.id,
            r.account,
            _when(rfc3339(r.failed_at.timestamp())),
            r.stage,
            str(r.size),
            r.response,
        ]
        for r in records
    ]
    headers = ["ID", "ACCOUNT", "FAILED AT (UTC)", "STAGE", "SIZE", "RESPONSE"]
    print(format_table(headers, rows), file=out)
    return EX_OK


async def dead_letters_show(runtime: Runtime, dl_id: str, *, out: BinaryIO, err: TextIO) -> int:
    """Write the stored message (our header lines, then the original) to ``out``."""
    try:
        data = await open_store(runtime).get(dl_id)
    except KeyError:
        print(f"pop3-connector: no dead letter {dl_id!r}", file=err)
        return EX_FAILED
    out.write(data)
    out.flush()
    return EX_OK


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


async def dead_letters_requeue(
    runtime: Runtime,
    dl_id: str,
    *,
    to: Sequence[str] | None,
    out: TextIO,
    err: TextIO,
    now: float | None = None,
) -> int:
    """Deliver a dead letter again (see the module docstring).  0 delivered, 1 otherwise."""
    store = open_store(runtime)
    try:
        stored = await store.get(dl_id)
    except KeyError:
        print(f"pop3-connector: no dead letter {dl_id!r}", file=err)
        return EX_FAILED
    parsed = parse_dead_letter_headers(stored)
    if parsed is None:
        print(f"pop3-connector: {dl_id} has no X-POP3-Connector-* header lines", file=err)
        return EX_FAILED
    info, _ = parsed
    original = strip_dead_letter_headers(stored)
    if to:
        recipients = tuple(to)
    elif info.recipients:
        # A shared mailbox's message, or a copy for the recipients that refused it: to them.
        recipients = info.recipients
    else:
        spec = next((s for s in runtime.accounts if s.name == info.account), None)
        if spec is None:
            print(
                f"pop3-connector: account {info.account!r} of {dl_id} is not configured "
                "(or disabled); give the recipient with --to ADDR",
                file=err,
            )
            return EX_FAILED
        recipients = spec.deliver_to
    policy = runtime.policy
    sender, sender_fixed = envelope_sender(original, policy.sender_policy, policy.fixed_sender)
    envelope = Envelope(sender, recipients, sender_fixed=sender_fixed)
    deliverer = SmtpDeliverer(
        runtime.smtp, transcript=SMTP_TRANSCRIPT if runtime.transcripts else None
    )
    try:
        delivered = await deliverer.deliver(original, envelope)
    except DeliveryError as exc:
        return await _refused_again(runtime, store, dl_id, info, original, exc, err, now)
    finally:
        await deliverer.close()

    if delivered.refused:
        # Accepted for some, refused (temporarily: a permanent refusal of one of the recipients
        # given aborts before DATA) for others: those who have it must not get it twice, so a
        # new dead letter names only the others; it is stored before the old one goes.
        refused = tuple(delivered.refused)
        summary = "; ".join(f"<{r}> {why}" for r, why in delivered.refused.items())
        when = time.time() if now is None else now
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
        print(
            f"pop3-connector: {dl_id} delivered to {', '.join(accepted)} only; refused by "
            f"{summary}; kept for {', '.join(refused)} as {new_id}",
            file=err,
        )
        return EX_FAILED

    await store.remove(dl_id)
    log.info(
        "account=%s uidl=%s size=%d outcome=requeued smtp=%r",
        info.account,
        info.uidl,
        len(original),
        delivered.response,
    )
    try:
        await _record(runtime, info, len(original), delivered.response, now, None)
    except LedgerError as exc:
        # Delivered and out of the store: the ledger row is only the history.
        log.warning("%s delivered, but the ledger was not updated: %s", dl_id, exc)
    print(f"{dl_id}: delivered to {', '.join(recipients)}: {delivered.response}", file=out)
    return EX_OK


async def _record(
    runtime: Runtime,
    info: DeadLetterInfo,
    size: int,
    response: str,
    now: float | None,
    dead_letter_id: str | None,
) -> None:
    """The requeue's result in the ledger: ``delivered``, or ``dead_lettered`` again under the
    new id.  Nothing to do without a ledger (the store came from elsewhere)."""
    if not runtime.ledger_path.exists():
        return
    when = time.time() if now is None else now
    ledger = await Ledger.open(runtime.ledger_path)
    try:
        if dead_letter_id is None:
            await ledger.record_delivered(info.account, info.uidl, size, response, when)
        else:
            await ledger.record_dead_lettered(
                info.account, info.uidl, size, response, when, dead_letter_id=dead_letter_id
            )
    finally:
        await ledger.close()


async def _refused_again(
    runtime: Runtime,
    store: DeadLetterArchive,
    dl_id: str,
    info: DeadLetterInfo,
    original: bytes,
    exc: DeliveryError,
    err: TextIO,
    now: float | None,
) -> int:
    if exc.stage.is_setup or classify(exc) is not Disposition.DEAD_LETTER:
        # Our own setup failed (connect, TLS, AUTH, a refused --to), or the refusal was only
        # temporary: nothing final was said about this message, so its recorded reason stays.
        print(f"pop3-connector: {dl_id} not delivered, unchanged: {exc}", file=err)
        return EX_FAILED
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
        await _record(runtime, info, len(original), exc.response, when, new_id)
    except LedgerError as lexc:
        log.warning("%s kept as %s, but the ledger was not updated: %s", dl_id, new_id, lexc)
    print(
        f"pop3-connector: {dl_id} refused again ({exc}); kept as {new_id} with the new reason",
        file=err,
    )
    return EX_FAILED
