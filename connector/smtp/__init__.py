"""SMTP delivery to Exchange: ``SmtpDeliverer.deliver(raw, envelope) -> Delivered``.

One idea per module, imports pointing down the list:

* ``envelope``: who a message is from and for, the address checks, what of the envelope is
  fixed by the config (pure; no aiosmtplib).
* ``failures``: aiosmtplib's, ``ssl``'s and the socket's exceptions as
  :class:`~connector.errors.DeliveryError` facts.
* ``content``: DATA's content, dot-stuffed in pieces without copying the message.
* ``connection``: aiosmtplib's ``SMTP`` with a redacted transcript, pipelined replies and our
  content writer; the only module that touches aiosmtplib's private attributes.
* ``evidence``: does a 5xx at MAIL or RCPT depend on the message? (docs/design.md §6.2)
* ``deliverer``: the session per cycle, the transaction, the probe.

Layers above use the names below.  Only ``envelope``'s are imported eagerly: the cycle's
recipients and the dead-letter format check addresses without loading aiosmtplib; the rest
load on first use (PEP 562 ``__getattr__``), as ``connector.pop3`` does with its shell.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from connector.smtp.envelope import (
    Envelope,
    SenderPolicy,
    address_problem,
    envelope_sender,
    needs_smtputf8,
)

if TYPE_CHECKING:
    from connector.smtp.content import (
        content_pieces,
        prepare_content,
        prepare_wire,
        stuffed_pieces,
    )
    from connector.smtp.deliverer import Delivered, SmtpDeliverer, SmtpSettings
    from connector.smtp.evidence import ProbeResult, Reply
    from connector.smtp.failures import EndOfDataTimeout, delivery_error

_LAZY: dict[str, str] = {
    "Delivered": "connector.smtp.deliverer",
    "SmtpDeliverer": "connector.smtp.deliverer",
    "SmtpSettings": "connector.smtp.deliverer",
    "ProbeResult": "connector.smtp.evidence",
    "Reply": "connector.smtp.evidence",
    "EndOfDataTimeout": "connector.smtp.failures",
    "delivery_error": "connector.smtp.failures",
    "content_pieces": "connector.smtp.content",
    "prepare_content": "connector.smtp.content",
    "prepare_wire": "connector.smtp.content",
    "stuffed_pieces": "connector.smtp.content",
}

__all__ = [
    "Delivered",
    "EndOfDataTimeout",
    "Envelope",
    "ProbeResult",
    "Reply",
    "SenderPolicy",
    "SmtpDeliverer",
    "SmtpSettings",
    "address_problem",
    "content_pieces",
    "delivery_error",
    "envelope_sender",
    "needs_smtputf8",
    "prepare_content",
    "prepare_wire",
    "stuffed_pieces",
]


def __getattr__(name: str) -> Any:
    """Load the module that holds ``name`` on its first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
