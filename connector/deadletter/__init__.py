"""Dead-letter stores (STUB: API contract, to be implemented)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    account: str
    uidl: str
    stage: str          # mail | rcpt | data | size | expired
    response: str       # "554 5.1.0 Sender denied"
    failed_at: dt.datetime  # aware, UTC


class DeadLetterStore(Protocol):
    async def put(self, raw: bytes, info: DeadLetterInfo) -> str:
        """Store durably; return the dead letter's id.  Raises DeadLetterError."""
        ...
