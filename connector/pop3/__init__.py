"""POP3: a sans-I/O protocol core (``protocol``) and its asyncio shell (``client``).

Layers above use the shell (:class:`Pop3Client` and its parameter types), named here; the
core's names are imported from ``connector.pop3.protocol`` itself.

The shell's names are loaded lazily (PEP 562 ``__getattr__``): importing
``connector.pop3.protocol`` runs this file first, and it must not drag in asyncio, socket or
ssl (docs/design.md §2; tests/unit/test_pop3_protocol.py checks it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connector.pop3.client import (
        AuthMethod,
        Pop3Client,
        Pop3Endpoint,
        Pop3Timeouts,
        Retrieved,
    )

_FROM_CLIENT = frozenset({"AuthMethod", "Pop3Client", "Pop3Endpoint", "Pop3Timeouts", "Retrieved"})

__all__ = [
    "AuthMethod",
    "Pop3Client",
    "Pop3Endpoint",
    "Pop3Timeouts",
    "Retrieved",
]


def __getattr__(name: str) -> Any:
    """Load the asyncio shell on first use of one of its names."""
    if name in _FROM_CLIENT:
        value = getattr(importlib.import_module("connector.pop3.client"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
