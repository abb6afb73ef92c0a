"""IMAP accounts (``protocol = "imap"``): a sans-I/O response core (``protocol``), its asyncio
shell (``client``), the session the cycle drives (``session``) and the IDLE watcher (``idle``).

The values an account's spec holds (:class:`ImapAuth`, :class:`ImapOptions`) are defined here;
the shell's names load lazily (PEP 562 ``__getattr__``), so that importing
``connector.imap.protocol`` never drags in asyncio, socket or ssl
(tests/unit/test_imap_protocol.py checks it), and a POP3-only ``once`` never loads any of it.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from connector.imap.client import ImapClient, Selected
    from connector.imap.idle import IdleWatcher, Wake
    from connector.imap.session import ImapSession

IDLE_RENEWAL: Final = 25 * 60.0
"""Seconds after which IDLE is ended and issued again: RFC 2177 §3 asks clients to do so at
least every 29 minutes, since a server may log out a client idle for 30; a few minutes'
margin covers a slow round trip."""


class ImapAuth(enum.StrEnum):
    """The ``auth`` key of an IMAP account (README, "IMAP accounts")."""

    AUTO = "auto"  # AUTHENTICATE PLAIN when offered, else LOGIN
    LOGIN = "login"  # the LOGIN command (RFC 3501 §6.2.3)
    PLAIN = "plain"  # AUTHENTICATE PLAIN (RFC 4616), with SASL-IR (RFC 4959) when offered
    XOAUTH2 = "xoauth2"  # AUTHENTICATE XOAUTH2 with an OAuth2 access token (connector.oauth2)


@dataclass(frozen=True, slots=True)
class ImapOptions:
    """What an IMAP account adds to its :class:`~connector.cycle.AccountSpec`.

    ``folder`` uses ``/`` between levels whatever the server's separator; ``push``: wait with
    IDLE (RFC 2177) when the server offers it, else poll; ``idle_renewal``: seconds between
    DONE and a new IDLE.
    """

    folder: str = "INBOX"
    auth: ImapAuth = ImapAuth.AUTO
    push: bool = True
    idle_renewal: float = IDLE_RENEWAL


_LAZY: Final = {
    "ImapClient": "connector.imap.client",
    "Selected": "connector.imap.client",
    "IdleWatcher": "connector.imap.idle",
    "Wake": "connector.imap.idle",
    "ImapSession": "connector.imap.session",
}

__all__ = [
    "IDLE_RENEWAL",
    "IdleWatcher",
    "ImapAuth",
    "ImapClient",
    "ImapOptions",
    "ImapSession",
    "Selected",
    "Wake",
]


def __getattr__(name: str) -> Any:
    """Load the asyncio shell on first use of one of its names."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
