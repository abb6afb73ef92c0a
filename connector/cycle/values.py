"""What a cycle is given (:class:`AccountSpec`, :class:`DeliveryPolicy`) and what it reports
(:class:`Outcome` per message, :class:`CycleStats` per cycle): frozen values and counts, built by
``runtime`` and read by ``service``, ``metrics`` and ``once``'s summary."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from connector.imap import ImapOptions
from connector.pop3 import AuthMethod, Pop3Endpoint, Pop3Timeouts
from connector.recipients import SharedMailbox
from connector.smtp import SenderPolicy

if TYPE_CHECKING:  # the deliverer's module loads aiosmtplib: not for a pure value
    from connector.smtp import SmtpSettings


class Oversize(enum.StrEnum):
    """``oversize``: what happens to a message larger than ``max_message_size``."""

    DEAD_LETTER = "dead-letter"  # fetched and dead-lettered (stage "size"), never sent to SMTP
    LEAVE = "leave"  # left upstream untouched; logged every cycle, one notice per message


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """Everything a cycle needs to know about one account; built from the config by the service.

    A reload compares specs by value (``service.Service.apply_runtime``): every field must be a
    value that compares by its contents (an OAuth2 token source is a frozen dataclass; a field
    that cannot compare is excluded with ``field(compare=False)`` and its inputs compared).
    """

    name: str
    endpoint: Pop3Endpoint
    username: str
    # For auth XOAUTH2: a source of access tokens, awaited at each login (pop3.client.TokenSource).
    password: str | Callable[[], Awaitable[str]] = field(repr=False)
    auth: AuthMethod
    deliver_to: tuple[str, ...]
    max_deferral: float
    timeouts: Pop3Timeouts = field(default_factory=Pop3Timeouts)
    max_message_size: int = 256 * 1024 * 1024
    # Keep finished mail upstream; DELE it only ``delete_after`` seconds after it was finished
    # (never, when None).  ``delete_after`` without ``leave_on_server`` changes nothing.
    leave_on_server: bool = False
    delete_after: float | None = None
    # What to do with a message over max_message_size (docs/design.md §7.1, stage "size").
    oversize: Oversize = field(default_factory=lambda: Oversize.DEAD_LETTER)
    # A shared (catch-all) mailbox: recipients read from each message (recipients.route), with
    # ``deliver_to`` as the fallback for mail that names nobody of ours.
    shared: SharedMailbox | None = None
    # The whole cycle's deadline, connect to QUIT ([service] cycle_timeout): the per-read
    # timeouts alone let a server that sends a byte now and then hold a cycle for ever.
    cycle_timeout: float = 3600.0
    # protocol = "imap": the folder, its login and push (docs/design.md §15); None for POP3.
    # ``endpoint`` then names the IMAP server, and ``auth`` is not used (ImapOptions.auth is).
    imap: ImapOptions | None = None
    # Where its mail goes (`smtp = "NAME"`, docs/design.md §14.1); None: the service's default
    # target ([smtp]).  Part of the spec, so that a reload that changes the target's settings
    # changes the accounts that use it (a failing one then polls at once: it may be the fix).
    smtp: SmtpTarget | None = None


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How messages are put on the SMTP envelope and traced (``[smtp]``, docs/design.md §4.1)."""

    sender_policy: SenderPolicy
    fixed_sender: str | None
    helo_name: str


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    """One SMTP server mail is delivered to: ``[smtp]`` (named ``default``) or one of
    ``[smtp_targets.NAME]`` (docs/design.md §14.1).  Each has its own session settings (TLS
    context, login) and envelope policy; the cycles of its accounts open their sessions there
    and nowhere else, so a target that fails stops its own accounts only."""

    name: str
    settings: SmtpSettings
    policy: DeliveryPolicy


class Outcome(enum.StrEnum):
    """What happened to one message in a cycle (the ``outcome`` label, docs/design.md §11.1)."""

    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    DEFERRED = "deferred"
    SKIPPED = "skipped"  # already in the ledger as delivered or dead-lettered (a DELE that a
    # crash or a failed QUIT left undone), or a shared mailbox's copy: DELE only
    REMOVED = "removed"  # kept upstream (leave_on_server) until delete_after passed: DELE only
    # (kept messages before that are not reported at all)


@dataclass(slots=True)
class CycleStats:
    """Counts of one cycle, for logs, metrics and ``once``'s summary."""

    mailbox_messages: int = 0
    mailbox_bytes: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    deferred: int = 0
    skipped: int = 0
    removed: int = 0
    delivered_bytes: int = 0
    stopped_early: bool = False
    mailbox_known: bool = False  # STAT answered: the mailbox_* fields are real, not defaults
    kept: int = 0  # leave_on_server: finished before, left upstream untouched this cycle
    # Over max_message_size and left upstream (oversize = "leave", or over FETCH_CEILING):
    # (uid, size) for the admin notice.
    oversize_left: list[tuple[str, int]] = field(default_factory=list)
    # The messages (and their octets, from LIST) that the server deleted at this cycle's QUIT
    # (RFC 1939 §6): the DELEs sent, once QUIT was answered +OK; none without that.
    deleted: int = 0
    deleted_bytes: int = 0

    @property
    def left_upstream(self) -> tuple[int, int]:
        """(messages, octets) in the mailbox after the cycle: STAT at its start minus what
        its QUIT deleted (mail that arrived meanwhile is not counted); ``mailbox_known``."""
        return (
            max(self.mailbox_messages - self.deleted, 0),
            max(self.mailbox_bytes - self.deleted_bytes, 0),
        )

    def count(self, outcome: Outcome) -> None:
        match outcome:
            case Outcome.DELIVERED:
                self.delivered += 1
            case Outcome.DEAD_LETTERED:
                self.dead_lettered += 1
            case Outcome.DEFERRED:
                self.deferred += 1
            case Outcome.SKIPPED:
                self.skipped += 1
            case Outcome.REMOVED:
                self.removed += 1
