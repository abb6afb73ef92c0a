"""The group commit of ``delivered`` rows, as a cycle sees it (docs/design.md §8.5).

A delivered message's row goes to the ledger's group commit (``Ledger.record_delivered_soon``,
which returns a ticket at once) and the cycle goes on with the next message; the message's DELE
waits until the row is committed (docs/design.md §5.2, invariant 1).  :class:`GroupCommit` keeps
those messages and their tickets.  The cycle settles them, and sends the DELEs the commit allows:

* before the next message's content goes to SMTP, when a row queued earlier may still be
  uncommitted or has failed (:meth:`GroupCommit.due_before_content`), so that a crash duplicates
  at most the message accepted last (invariant 2) and a failed commit stops the cycle before
  another message is delivered;
* when :data:`SETTLE_EVERY` messages wait (:attr:`GroupCommit.full`), to bound the list;
* after the last message, before QUIT.

The ledger thread needs the GIL to commit, which a busy event loop rarely lets go of, so the
wait before the content often finds the commit not yet done: that wait costs CPU
(bench/README.md); it is the price of the one-message window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from connector.errors import LedgerError

SETTLE_EVERY: Final = 32
"""Delivered messages that may wait for their rows' commit before the cycle settles them; a
bound on the list, not on safety: a DELE takes effect only at QUIT (RFC 1939 §6)."""


class Tickets(Protocol):
    """The ledger's side of the group commit (``connector.ledger.Ledger``)."""

    @property
    def settled(self) -> int:
        """Every ticket up to this one is committed or failed."""
        ...

    def failed(self, tickets: Iterable[int]) -> bool:
        """Whether the commit of any of ``tickets`` has failed already (without waiting)."""
        ...

    async def settle(self, tickets: Sequence[int]) -> list[LedgerError | None]:
        """Wait for the commit of every ticket so far; per ticket, None or why it failed."""
        ...


@dataclass(frozen=True, slots=True)
class Settled:
    """What settling found: the messages now safe to DELE, and the first row that failed."""

    committed: list[int]  # message numbers, in the order they were delivered
    failed: LedgerError | None  # its message stays upstream; the cycle stops


class GroupCommit:
    """The delivered messages of one cycle whose ``delivered`` rows are not yet known committed."""

    __slots__ = ("_ledger", "_waiting")

    def __init__(self, ledger: Tickets) -> None:
        self._ledger = ledger
        # (message number to DELE once its row is committed, or None when leave_on_server
        # keeps it upstream; its ticket), in the order delivered.
        self._waiting: list[tuple[int | None, int]] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, number: int | None, ticket: int) -> None:
        """Message ``number`` was delivered and its row queued as ``ticket``; None: no DELE."""
        self._waiting.append((number, ticket))

    @property
    def full(self) -> bool:
        """:data:`SETTLE_EVERY` messages wait: settle before the list grows further."""
        return len(self._waiting) >= SETTLE_EVERY

    def due_before_content(self) -> bool:
        """Whether the cycle must settle before the next message's content goes out: a row
        queued earlier may not be committed yet, or its commit failed (a cheap check that
        does not wait)."""
        waiting, ledger = self._waiting, self._ledger
        return bool(waiting) and (
            ledger.settled < waiting[-1][1] or ledger.failed(ticket for _, ticket in waiting)
        )

    async def settle(self) -> Settled:
        """Wait until every waiting row is committed or has failed, and forget them all."""
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return Settled([], None)
        errors = await self._ledger.settle([ticket for _, ticket in waiting])
        committed: list[int] = []
        failed: LedgerError | None = None
        for (number, _), error in zip(waiting, errors, strict=True):
            if error is not None:
                failed = failed or error
            elif number is not None:
                committed.append(number)
        return Settled(committed, failed)
