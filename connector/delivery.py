"""SMTP delivery to Exchange through aiosmtplib (STUB: API contract, to be implemented)."""

from __future__ import annotations

import enum
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from connector.pop3.client import TlsMode


class SenderPolicy(enum.StrEnum):
    RETURN_PATH = "return-path"
    NULL = "null"
    FIXED = "fixed"


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    host: str
    port: int
    tls: TlsMode
    ssl_context: ssl.SSLContext | None  # required unless tls is NONE
    helo_name: str
    username: str | None = None
    password: str | None = None
    dsn: bool = True
    timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Envelope:
    """``sender`` "" is the null sender <>.  ``sender_fixed``: same for every message."""

    sender: str
    recipients: tuple[str, ...]
    sender_fixed: bool
    recipients_fixed: bool = True


@dataclass(frozen=True, slots=True)
class Delivered:
    """Accepted: ``response`` like ``250 2.0.0 Ok: queued as X``.  ``refused``: recipients
    refused while others were accepted, recipient -> response line."""

    response: str
    refused: Mapping[str, str] = field(default_factory=dict)


def envelope_sender(raw: bytes, policy: SenderPolicy, fixed_address: str | None = None) -> tuple[str, bool]:
    """(sender, sender_fixed) per PRODUCT §3 ``envelope_sender``."""
    raise NotImplementedError


class SmtpDeliverer:
    """One SMTP connection reused across a cycle's messages; connects lazily, reconnects
    after a failure that closed the connection.  Raises only DeliveryError."""

    def __init__(self, settings: SmtpSettings, *, transcript: logging.Logger | None = None) -> None:
        self.settings = settings

    async def connect(self) -> None:
        raise NotImplementedError

    @property
    def max_size(self) -> int | None:
        raise NotImplementedError

    async def deliver(self, raw: bytes, envelope: Envelope) -> Delivered:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
