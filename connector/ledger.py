"""SQLite ledger (STUB: API contract, to be implemented)."""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Self


class MessageState(enum.StrEnum):
    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    uidl: str
    state: MessageState
    size: int
    attempts: int
    first_seen: float   # unix time
    last_attempt: float
    last_response: str


@dataclass(frozen=True, slots=True)
class CycleRecord:
    started: float
    finished: float
    result: str                 # "ok" | "failed"
    error: str | None
    mailbox_messages: int | None
    mailbox_bytes: int | None
    next_poll: float | None


class Ledger:
    @classmethod
    async def open(cls, path: Path) -> Self:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def sync_listing(self, account: str, listed: Collection[str], now: float) -> dict[str, LedgerEntry]:
        """Rows of ``account`` whose UIDL is in ``listed``; marks the others gone and prunes the
        ones gone longer than the prune age.  One thread hop."""
        raise NotImplementedError

    async def record_delivered(self, account: str, uidl: str, size: int, response: str, now: float) -> None:
        raise NotImplementedError

    async def record_dead_lettered(self, account: str, uidl: str, size: int, response: str, now: float) -> None:
        raise NotImplementedError

    async def record_deferred(self, account: str, uidl: str, size: int, response: str, now: float) -> LedgerEntry:
        raise NotImplementedError

    async def record_cycle(self, account: str, record: CycleRecord) -> None:
        raise NotImplementedError
