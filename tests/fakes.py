"""In-memory implementations of the connector's seams (docs/design.md §2), for fetcher and
service tests.

Each fake passes the same contract suite as the real thing (tests/unit/test_deadletter.py), so a
test that passes against a fake says something about the real code.
"""

from __future__ import annotations

import builtins
import collections
import itertools

from connector.deadletter import (
    DeadLetterInfo,
    DeadLetterRecord,
    parse_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.errors import DeadLetterError


class InMemoryDeadLetterStore:
    """A :class:`~connector.deadletter.DeadLetterArchive` in a dict.

    It stores the same bytes a real store would (our header lines, then the original), and
    parses them back the same way.  Set ``fail_put`` to make ``put`` raise DeadLetterError, as
    a full disk or a refused IMAP APPEND would; ``put_calls`` counts every call, failed or not.
    """

    store_name = "memory"

    def __init__(self) -> None:
        self.messages: dict[str, bytes] = {}
        self.fail_put = False
        self.put_calls = 0
        self._ids = itertools.count(1)

    async def put(self, raw: bytes, info: DeadLetterInfo) -> str:
        """Store a copy; return its id, or raise DeadLetterError while ``fail_put`` is set."""
        self.put_calls += 1
        if self.fail_put:
            raise DeadLetterError(self.store_name, "injected failure")
        id = f"mem-{next(self._ids):06d}"
        self.messages[id] = with_dead_letter_headers(raw, info)
        return id

    async def list(self) -> builtins.list[DeadLetterRecord]:
        """Every dead letter, oldest first."""
        records = []
        for id, data in self.messages.items():
            parsed = parse_dead_letter_headers(data)
            assert parsed is not None  # put() wrote them
            info, header_len = parsed
            records.append(
                DeadLetterRecord(
                    id=id,
                    account=info.account,
                    uidl=info.uidl,
                    stage=info.stage,
                    response=info.response,
                    failed_at=info.failed_at,
                    size=len(data) - header_len,
                )
            )
        records.sort(key=lambda r: (r.failed_at, r.id))
        return records

    async def get(self, id: str) -> bytes:
        """The stored bytes.  Unknown id: KeyError."""
        return self.messages[id]

    async def remove(self, id: str) -> None:
        """Forget one dead letter.  Unknown id: KeyError."""
        del self.messages[id]

    async def count_by_account(self) -> dict[str, int]:
        """Number of dead letters per account."""
        return dict(collections.Counter(r.account for r in await self.list()))
