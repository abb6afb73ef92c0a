"""``pop3-connector check --connect``: log in everywhere, like the SBS connector's "Test" button.

Each POP3 account, the disabled ones too (marked, so that a cut-over is tested before it
happens): connect, TLS as configured, login, STAT, QUIT (nothing is fetched or deleted); an
IMAP account: login, EXAMINE its folder, its size, whether IDLE and UIDPLUS are offered.
Every SMTP target (``[smtp]`` and each ``[smtp_targets.NAME]``, docs/design.md §14.1): connect,
EHLO, STARTTLS, AUTH; then what a delivery needs, without sending a message: ``MAIL FROM`` with
the sender real mail has there, ``RCPT TO`` each recipient that the accounts delivering there
fix in the config (every ``deliver_to``, which is a shared mailbox's fallback, and the shared
mailboxes' rule targets), RSET, QUIT.  All at once; then one table row per target, envelope
sender and recipient; exit 1 when any failed.  A refusal that would stop or dead-letter real
mail is a failure, with a hint at the Exchange setting that most likely causes it.  The texts
are our errors' ``str()`` and the server's replies, which never carry a password.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TextIO

from connector.admin import format_table
from connector.config import DEFAULT_TARGET, mask_secrets
from connector.cycle import AccountSpec, DeliveryPolicy, SmtpTarget
from connector.errors import AUTH_REQUIRED, ConnectorError, SmtpStage, split_enhanced_code
from connector.pop3 import Pop3Client
from connector.runtime import Runtime
from connector.smtp import Reply, SenderPolicy, SmtpDeliverer

CHECK_SENDER: Final = "check@pop3-connector.invalid"
"""The envelope sender of the test transaction with ``envelope_sender = "return-path"``: a
foreign sender, as real mail has.  ``.invalid`` (RFC 6761 §6.4) can never be one of the
organisation's accepted domains, so an Exchange anonymous connector takes it like any outside
sender (it refuses anonymous mail from its own authoritative domains, which would fail the check
for a reason real mail never meets), and Exchange does not look a sender's domain up in DNS at
MAIL.  A front end that does (Postfix ``reject_unknown_sender_domain``) answers 4xx by default,
which the check reports as temporary, not as a failure."""

RCPT_BATCH: Final = 50
"""Recipients tested per transaction: well under Exchange's default of 200 per message
(``MaxRecipientsPerMessage``) and RFC 5321 §4.5.3.1.8's minimum of 100."""

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class _Row:
    target: str
    address: str
    tls: str
    result: str  # "ok", "FAILED", "temporary", "-" (not tested)
    detail: str

    def cells(self) -> list[str]:
        return [self.target, self.address, self.tls, self.result, self.detail]


def _shown(text: str) -> str:
    """Server text with control characters escaped (docs/design.md §11.3)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


async def _check_pop3(spec: AccountSpec) -> str:
    if spec.imap is not None:
        return await _check_imap(spec)
    async with await Pop3Client.connect(spec.endpoint, spec.timeouts) as pop:
        await pop.login(spec.username, spec.password, spec.auth)
        count, octets = await pop.stat()
        await pop.quit()
    return f"{count} message(s), {octets} bytes waiting"


async def _check_imap(spec: AccountSpec) -> str:
    """An IMAP account: login, SELECT the folder (read-only: EXAMINE), LOGOUT; whether the
    server offers IDLE (push) and UIDPLUS (UID EXPUNGE) is part of the answer."""
    from connector.imap.client import ImapClient  # only IMAP accounts load it

    options = spec.imap
    if options is None:  # pragma: no cover (the caller checked)
        raise ValueError("not an IMAP account")
    async with await ImapClient.connect(spec.endpoint, spec.timeouts) as client:
        await client.login(spec.username, spec.password, options.auth)
        await client.select(options.folder, read_only=True)
        listing = await client.listing()
        caps = client.capabilities
        await client.logout()
    if not options.push:
        push = "push off (polled)"
    elif "IDLE" in caps:
        push = "IDLE offered (push)"
    else:
        push = "no IDLE (polled)"
    expunge = "UIDPLUS" if "UIDPLUS" in caps else "no UIDPLUS (see README)"
    octets = sum(size for _, size in listing)
    waiting = f"{len(listing)} message(s), {octets} bytes waiting in {options.folder!r}"
    return f"{waiting}; {push}; {expunge}"


def fixed_recipients(accounts: Iterable[AccountSpec]) -> list[str]:
    """Every recipient fixed in the config, once each (case-insensitive), in config order."""
    seen: dict[str, str] = {}
    for spec in accounts:
        targets = list(spec.deliver_to)
        if spec.shared is not None:
            targets += [r for rule in spec.shared.rules for r in rule.deliver_to]
        for recipient in targets:
            seen.setdefault(recipient.lower(), recipient)
    return list(seen.values())


def check_sender(policy: DeliveryPolicy) -> str:
    """The envelope sender real mail would have: a foreign one, or the fixed one."""
    match policy.sender_policy:
        case SenderPolicy.RETURN_PATH:
            return CHECK_SENDER
        case SenderPolicy.NULL:
            return ""
        case SenderPolicy.FIXED:
            return policy.fixed_sender or ""


def hint(stage: str, reply: Reply) -> str:
    """What most likely causes a refusal at ``stage`` ("mail" or "rcpt") on Exchange.

    Reading the reply text is fine here: a hint decides nothing, it only points the
    administrator at a setting.
    """
    enhanced, _ = split_enhanced_code(reply.text)
    text = reply.text.lower()
    if reply.code == AUTH_REQUIRED:
        return (
            "the receive connector does not accept mail from this host without "
            'authentication: add "Anonymous users" to its permission groups (port 25), or set '
            "[smtp] username and password for a connector with AUTH (port 587)"
        )
    if stage == "mail" and (enhanced in ("5.7.60", "5.7.1") or "send as" in text):
        return (
            "the connector's permissions do not let this host send mail from outside senders: "
            "grant ms-Exch-SMTP-Accept-Any-Sender on the receive connector (Add-ADPermission "
            "-ExtendedRights ms-Exch-SMTP-Accept-Any-Sender, to ANONYMOUS LOGON or the AUTH "
            "account)"
        )
    if stage == "rcpt" and enhanced == "5.7.64":
        return (
            "Exchange Online (TenantAttribution): no inbound connector matches this host: "
            "add its public IP address or certificate to an inbound connector from your "
            "organisation's email server"
        )
    if stage == "rcpt" and (enhanced in ("5.7.1", "5.7.54") or "relay" in text):
        return (
            "relay denied: the recipient's domain is not an accepted domain, or the connector "
            "may not relay: grant ms-Exch-SMTP-Accept-Any-Recipient on the receive connector, "
            "or correct the address"
        )
    if stage == "rcpt" and (enhanced in ("5.1.1", "5.1.10") or "unknown" in text):
        return (
            "the recipient does not exist in Exchange: check deliver_to (and the shared "
            "mailboxes' rule targets): a mailbox, mail contact or group address"
        )
    if stage == "mail":
        return "every message with this sender would be refused"
    return "every message to this recipient would be refused"


def _reply_row(target: str, where: str, tls: str, stage: str, reply: Reply) -> _Row:
    shown = _shown(str(reply))
    if reply.accepted:
        return _Row(target, where, tls, "ok", shown)
    if reply.reply_class(SmtpStage.MAIL if stage == "mail" else SmtpStage.RCPT) == 5:
        return _Row(target, where, tls, "FAILED", f"{shown}: {hint(stage, reply)}")
    return _Row(target, where, tls, "temporary", f"{shown}: refused for now, try again later")


async def _check_smtp(target: SmtpTarget, recipients: Sequence[str]) -> list[_Row]:
    smtp = target.settings
    # "smtp" for [smtp], the table most sites have alone; "smtp NAME" for [smtp_targets.NAME].
    label = "smtp" if target.name == DEFAULT_TARGET else f"smtp {target.name}"
    where, tls = f"{smtp.host}:{smtp.port}", str(smtp.tls)
    rows: list[_Row] = []
    deliverer = SmtpDeliverer(smtp)
    try:
        try:
            await deliverer.connect()
        except ConnectorError as exc:
            return [_Row(label, where, tls, "FAILED", str(exc))]
        limit = deliverer.max_size
        auth = ", logged in" if smtp.username else ""
        size = f", size limit {limit} bytes" if limit else ""
        rows.append(_Row(label, where, tls, "ok", f"session accepted{auth}{size}"))
        sender = check_sender(target.policy)
        try:
            rows += await _check_envelope(deliverer, sender, recipients, where, tls, label)
        except ConnectorError as exc:
            rows.append(_Row(f"{label} MAIL FROM:<{sender}>", where, tls, "FAILED", str(exc)))
    finally:
        await deliverer.close()
    return rows


async def _check_envelope(
    deliverer: SmtpDeliverer,
    sender: str,
    recipients: Sequence[str],
    where: str,
    tls: str,
    label: str = "smtp",
) -> list[_Row]:
    """MAIL FROM the test sender, RCPT TO each recipient, RSET.  If the sender is refused,
    the recipients are still tested, with the null sender (the probe the delivery makes)."""
    rows: list[_Row] = []
    mail_sender = sender
    for start in range(0, max(len(recipients), 1), RCPT_BATCH):
        batch = recipients[start : start + RCPT_BATCH]
        result = await deliverer.probe(mail_sender, batch)
        if start == 0:
            mail = f"{label} MAIL FROM:<{sender}>"
            rows.append(_reply_row(mail, where, tls, "mail", result.mail))
        if not result.mail.accepted and mail_sender and batch:
            mail_sender = ""
            result = await deliverer.probe(mail_sender, batch)
        if not result.mail.accepted:
            detail = f"not tested: MAIL FROM:<{mail_sender}> was refused"
            rows += [_Row(f"{label} RCPT TO:<{r}>", where, tls, "-", detail) for r in batch]
            continue
        for recipient, reply in result.rcpt.items():
            rows.append(_reply_row(f"{label} RCPT TO:<{recipient}>", where, tls, "rcpt", reply))
    return rows


async def _guarded(task: asyncio.Task[str]) -> tuple[bool, str]:
    try:
        return True, await task
    except ConnectorError as exc:
        return False, str(exc)


def _secrets(runtime: Runtime, accounts: Iterable[tuple[AccountSpec, str]]) -> set[str]:
    """Every password the runtime holds: the accounts' (not a token source), the targets'."""
    found = {spec.password for spec, _ in accounts if isinstance(spec.password, str)}
    found |= {t.settings.password for t in runtime.targets.values() if t.settings.password}
    found |= {runtime.smtp.password} if runtime.smtp.password else set()
    if runtime.imap_store is not None:
        found.add(runtime.imap_store.password)
    return found


async def check_connections(runtime: Runtime, out: TextIO | None = None) -> int:
    """Try every connection at once; print a table; 0 when all succeeded, else 1."""
    out = out if out is not None else sys.stdout
    accounts = [(spec, "") for spec in runtime.accounts]
    accounts += [(spec, " (disabled)") for spec in runtime.disabled]
    pop3 = [
        (
            f"{'pop3' if spec.imap is None else 'imap'} {spec.name}{mark}",
            f"{spec.endpoint.host}:{spec.endpoint.port}",
            str(spec.endpoint.tls),
            asyncio.create_task(_check_pop3(spec)),
        )
        for spec, mark in accounts
    ]
    # Every target, each with the recipients of the accounts that deliver there (a target no
    # account uses is still tested: notices go through [smtp], and a cut-over is prepared).
    targets = dict(runtime.targets) or {DEFAULT_TARGET: runtime.default_target}
    users: dict[str, list[AccountSpec]] = {name: [] for name in targets}
    for spec, _ in accounts:
        target = spec.smtp.name if spec.smtp is not None else DEFAULT_TARGET
        users.setdefault(target, []).append(spec)
        targets.setdefault(target, spec.smtp or runtime.default_target)
    smtp = [
        asyncio.create_task(_check_smtp(target, fixed_recipients(users[name])))
        for name, target in targets.items()
    ]
    rows: list[_Row] = []
    for name, where, tls, task in pop3:
        ok, text = await _guarded(task)
        rows.append(_Row(name, where, tls, "ok" if ok else "FAILED", text))
    for checked in smtp:
        rows += await checked
    # A password pasted into a host, user name or recipient would otherwise be shown here.
    secrets = _secrets(runtime, accounts)
    cells = [[mask_secrets(c, secrets) for c in r.cells()] for r in rows]
    print(format_table(["TARGET", "ADDRESS", "TLS", "RESULT", "DETAIL"], cells), file=out)
    return 1 if any(r.result == "FAILED" for r in rows) else 0
