"""asyncio shell around the sans-I/O POP3 core (STUB: API contract, to be implemented)."""

from __future__ import annotations

import enum
import logging
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Self


class TlsMode(enum.StrEnum):
    """How a connection is secured (PRODUCT §3 ``tls``)."""

    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    NONE = "none"


class AuthMethod(enum.StrEnum):
    """PRODUCT §3 ``auth``: ``auto`` picks SASL PLAIN, then APOP, then USER/PASS by CAPA/greeting."""

    AUTO = "auto"
    USER = "user"
    APOP = "apop"
    PLAIN = "plain"


@dataclass(frozen=True, slots=True)
class Pop3Timeouts:
    """Deadlines per phase, in seconds.  ``idle_read`` bounds each read inside a long RETR."""

    connect: float = 30.0
    command: float = 60.0
    idle_read: float = 60.0


@dataclass(frozen=True, slots=True)
class Pop3Endpoint:
    """Where and how to connect.  ``ssl_context`` is required unless ``tls`` is NONE."""

    host: str
    port: int
    tls: TlsMode
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None  # default: host


class Pop3Client:
    """One POP3 session.  Use ``async with await Pop3Client.connect(...) as c``.

    Every method raises only ``connector.errors.Pop3Error`` subclasses. After a timeout or a
    protocol error the connection is closed and every further call raises Pop3ConnectionError.
    """

    greeting_text: str
    apop_stamp: str | None
    capabilities: dict[str, list[str]]  # upper-case capability name -> arguments ({} if no CAPA)

    @classmethod
    async def connect(
        cls,
        endpoint: Pop3Endpoint,
        timeouts: Pop3Timeouts = Pop3Timeouts(),
        *,
        max_message_size: int = 256 * 1024 * 1024,
        transcript: logging.Logger | None = None,
    ) -> Self:
        """Connect, read the greeting, CAPA, and STLS (then CAPA again) when tls is STARTTLS."""
        raise NotImplementedError

    async def login(self, username: str, password: str, method: AuthMethod = AuthMethod.AUTO) -> None:
        """Authenticate; raises Pop3AuthError on -ERR."""
        raise NotImplementedError

    async def stat(self) -> tuple[int, int]:
        """(message count, mailbox octets)."""
        raise NotImplementedError

    async def uidl(self) -> list[tuple[int, str]]:
        """[(msg number, uid)] for every message; Pop3ResponseError if the server lacks UIDL."""
        raise NotImplementedError

    async def list(self) -> list[tuple[int, int]]:
        """[(msg number, octets)]."""
        raise NotImplementedError

    async def retr(self, number: int) -> bytes:
        """The message exactly as sent, CRLF line ends, dot-unstuffed, without the final dot line."""
        raise NotImplementedError

    async def top(self, number: int, lines: int) -> bytes:
        """Headers, the blank line, and ``lines`` body lines."""
        raise NotImplementedError

    async def dele(self, number: int) -> None:
        raise NotImplementedError

    async def rset(self) -> None:
        raise NotImplementedError

    async def noop(self) -> None:
        raise NotImplementedError

    async def quit(self) -> str:
        """QUIT (RFC 1939 §6: the server deletes the marked messages now); returns the +OK text.
        Closes the connection."""
        raise NotImplementedError

    async def close(self) -> None:
        """Drop the connection without QUIT (nothing is deleted).  Idempotent."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
