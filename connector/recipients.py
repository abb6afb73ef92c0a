"""Shared (catch-all, "multidrop") mailboxes: who a message is for, read from the message.

A provider's catch-all mailbox holds mail for many people of one domain.  The SMTP envelope
that said who each copy was for is gone by the time POP3 hands the message over; what is left
are header fields.  :func:`route` reads them, in this order, and stops at the first that names
an address of ours (a configured domain, or an address a rule matches):

1. The *envelope headers*, as configured (default ``Delivered-To``, ``X-Original-To``,
   ``X-Envelope-To``): the trace fields a provider's MTA writes at final delivery with the
   envelope recipient (Postfix writes ``Delivered-To`` and ``X-Original-To``; RFC 9228 documents
   ``Delivered-To``).  Of each configured name only the topmost field that names one of ours
   counts: the MTA that delivered the copy prepends its field above any earlier hop's (RFC 5321
   §4.4), and an earlier hop may name an alias that has since been expanded (``team@`` before
   ``bob@``).  This is how a Bcc'd copy finds its reader: its ``To`` names somebody else.
2. ``To`` and ``Cc`` (every field of both; RFC 5322 §3.6.3), unless turned off.  Mail that came
   through a mailing list names the list here, not us: a rule for the list's address routes it.
3. Nobody of ours: the account's ``deliver_to``, SBS's "undeliverable POP3 mail" mailbox, so
   that mail with no usable recipient (Bcc without an envelope header, a list without a rule)
   never vanishes.

Addresses in ``ignore`` never count: a catch-all mailbox's own address, which providers write
into ``Delivered-To`` above the real recipient's ``X-Original-To`` (by default the account's
user name when it is an address).  Each other address found is mapped by the first rule whose
pattern matches it (shell-style ``*`` and ``?``, case-insensitive) to that rule's Exchange
addresses; an address of one of our domains that no rule matches goes to itself, with the
domain rewritten when ``rewrite_domain`` is set (``bob@firma.example`` -> ``bob@firma.local``).
Exchange decides whether such a mailbox exists: a ``550 5.1.1`` to its RCPT is about the
message (docs/design.md §6.4), and the cycle dead-letters a copy naming it while the other
recipients get theirs.

Pure functions on bytes and frozen data; no I/O.  Header fields are read by
:mod:`connector.headers` (bounded block, capped values) and address lists by
:func:`connector.addresses.address_list` (one pass, no recursion: a few hundred nested ``(``
once made ``email.utils.getaddresses`` raise ``RecursionError``).  Values are decoded as ASCII
with surrogate escapes (8-bit bytes never raise), and an address that could not go on an SMTP
envelope as it is (``smtp.address_problem``) is ignored, never "repaired".  A field that
was too long to read whole (:data:`connector.headers.MAX_VALUE`) counts with what was read of
it, and :attr:`Routing.unread` names it, so the cycle can say so in its log.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from connector import headers
from connector.addresses import read_address_list
from connector.smtp.envelope import address_problem

__all__ = [
    "DEFAULT_ENVELOPE_HEADERS",
    "Routing",
    "Rule",
    "SharedMailbox",
    "message_id",
    "route",
]

DEFAULT_ENVELOPE_HEADERS: Final = ("Delivered-To", "X-Original-To", "X-Envelope-To")


@dataclass(frozen=True, slots=True)
class Rule:
    """``pattern`` (lower case, ``*``/``?`` wildcards) -> Exchange recipients."""

    pattern: str
    deliver_to: tuple[str, ...]

    def matches(self, address: str) -> bool:
        """Whether ``address`` (lower case) matches the pattern."""
        return fnmatch.fnmatchcase(address, self.pattern)


@dataclass(frozen=True, slots=True)
class SharedMailbox:
    """The ``[accounts.shared]`` settings of one account, ready for :func:`route`."""

    domains: frozenset[str]  # lower case
    envelope_headers: tuple[str, ...] = DEFAULT_ENVELOPE_HEADERS
    header_recipients: bool = True  # look at To and Cc when no envelope header names one of ours
    rules: tuple[Rule, ...] = ()
    rewrite_domain: str | None = None
    duplicate_window: float = 7 * 86400.0  # 0: no suppression by Message-ID
    # Addresses (lower case) that never count as a recipient: the catch-all mailbox's own,
    # which a provider writes into Delivered-To above the real recipient's X-Original-To.
    ignore: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Routing:
    """Where one message goes and why.

    ``recipients``: the Exchange addresses, in order, without duplicates (case-insensitive).
    ``source``: the header name that decided (``"Delivered-To"``, ``"To/Cc"``) or ``"fallback"``.
    ``found``: the addresses of ours read from that header (empty for the fallback).
    ``configured``: those of ``recipients`` that come from the config (the fallback, a rule's
    targets) rather than from the message: a permanent refusal of one of them is our setup's
    fault (docs/design.md §6.1), not the message's.
    ``unread``: what could not be read whole among what was consulted: the names of fields
    cut at :data:`connector.headers.MAX_VALUE` or that do not parse to their end (an unclosed
    comment, quote or bracket), and ``"header"`` when the header block itself was larger
    than the reader's caps.  Routing went on with what was read; the cycle logs it.
    """

    recipients: tuple[str, ...]
    source: str
    found: tuple[str, ...]
    configured: frozenset[str]
    unread: tuple[str, ...] = ()


def message_id(raw: bytes) -> str | None:
    """The first ``Message-ID`` (RFC 5322 §3.6.4) as written, without spaces; None if absent."""
    field = headers.first(raw, "message-id")
    if field is None or field.cut:
        return None  # longer than any Message-ID a mailer writes: no key from it
    text = "".join(field.text.split())
    return text if text and text.isascii() else None


def _addresses(values: Iterable[str], unread: list[str] | None = None, name: str = "") -> list[str]:
    """The addr-specs in address-list field values (RFC 5322 §3.4), lower-cased domain.  A
    value that did not read to its end adds ``name`` to ``unread``."""
    out: list[str] = []
    for value in values:
        found, whole = read_address_list(value)
        if not whole and unread is not None:
            unread.append(name)
        for address in found:
            local, at, domain = address.rpartition("@")
            if at and local and domain:
                candidate = f"{local}@{domain.lower().rstrip('.')}"
                if address_problem(candidate) is None:
                    out.append(candidate)
    return out


def _map(address: str, shared: SharedMailbox) -> tuple[tuple[str, ...], bool] | None:
    """Where ``address`` goes, and whether that came from the config; None: not ours."""
    lowered = address.lower()
    if lowered in shared.ignore:
        return None
    for rule in shared.rules:
        if rule.matches(lowered):
            return rule.deliver_to, True
    local, _, domain = address.rpartition("@")
    if domain in shared.domains:
        if shared.rewrite_domain is not None:
            rewritten = f"{local}@{shared.rewrite_domain}"
            # A long local part on a longer domain may pass the RFC 5321 §4.5.3.1.3 limit:
            # such an address could not go on the envelope at all, so it is not a recipient.
            return ((rewritten,), False) if address_problem(rewritten) is None else None
        return (address,), False
    return None


def _routed(
    found: Sequence[str], shared: SharedMailbox
) -> tuple[list[str], list[str], set[str]] | None:
    ours: list[str] = []
    recipients: list[str] = []
    configured: set[str] = set()
    for address in found:
        mapped = _map(address, shared)
        if mapped is None:
            continue
        ours.append(address)
        targets, from_config = mapped
        recipients.extend(targets)
        if from_config:
            configured.update(t.lower() for t in targets)
    return (ours, recipients, configured) if ours else None


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for address in addresses:
        key = address.lower()
        if key not in seen:
            seen.add(key)
            out.append(address)
    return tuple(out)


def route(raw: bytes, shared: SharedMailbox, fallback: Sequence[str]) -> Routing:
    """Where the message ``raw`` of a shared mailbox goes (see the module docstring)."""
    header = headers.read(raw)
    unread: list[str] = [] if header.complete else ["header"]
    for name in shared.envelope_headers:
        wanted = name.lower()
        for field in header.fields:
            if field.name != wanted:
                continue
            if field.cut:
                unread.append(name)
            hit = _routed(_addresses([field.text], unread, name), shared)
            if hit is not None:
                return _routing(hit, name, unread)
    if shared.header_recipients:
        found: list[str] = []
        for field in header.fields:
            if field.name in ("to", "cc"):
                label = field.name.capitalize()
                if field.cut:
                    unread.append(label)
                found += _addresses([field.text], unread, label)
        hit = _routed(found, shared)
        if hit is not None:
            return _routing(hit, "To/Cc", unread)
    targets = _unique(fallback)
    return Routing(
        targets, "fallback", (), frozenset(t.lower() for t in targets), tuple(dict.fromkeys(unread))
    )


def _routing(hit: tuple[list[str], list[str], set[str]], source: str, unread: list[str]) -> Routing:
    ours, recipients, configured = hit
    targets = _unique(recipients)
    return Routing(
        targets,
        source,
        _unique(ours),
        frozenset(t.lower() for t in targets if t.lower() in configured),
        tuple(dict.fromkeys(unread)),
    )
