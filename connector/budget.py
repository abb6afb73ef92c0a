"""The memory budget for messages in flight: octets shared by every account's cycle.

docs/design.md §10.6.  Each RETR is charged what the message it fetches may cost in memory
before it is sent: the size LIST announced for a message kept in memory, the spool threshold
for one streamed to a spool file (which costs buffers, not its size), and the charge is given
back once the cycle is done with the message.  When the budget is spent, an account waits
before its next RETR instead of growing the process: what strangers send decides how long mail
waits, never how much memory the service takes.

Deadlock cannot happen because only an account that holds nothing waits (:meth:`acquire`,
when its RETR window is empty and no message is in hand); an account that already holds a
charge only takes more when there is room at once (:meth:`try_acquire`, for the pipelined
RETRs behind the first), so every holder can finish what it holds without waiting.  Waiters
are served in order, and :meth:`try_acquire` fails while anyone waits, so a busy account's
pipelining cannot starve an idle one.  No charge is larger than the whole budget: a bigger one
is taken as the whole (the account then runs alone).
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """A counting budget of octets (an asyncio semaphore whose permits have sizes)."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("the memory budget must be at least one octet")
        self.total = total
        self.in_use = 0
        self.peak = 0  # the most ever charged at once (tests, and the bench's report)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def charge(self, octets: int) -> int:
        """What a message of ``octets`` is charged: at least 1, at most the whole budget."""
        return min(max(octets, 1), self.total)

    def try_acquire(self, octets: int) -> int | None:
        """Take ``charge(octets)`` if it fits now and nobody waits; return it, else None."""
        n = self.charge(octets)
        if self._waiters or self.in_use + n > self.total:
            return None
        self._take(n)
        return n

    async def acquire(self, octets: int) -> int:
        """Take ``charge(octets)``, waiting in line for room; return what was taken (give
        exactly that back to :meth:`release`).  Call it only while holding nothing."""
        n = self.try_acquire(octets)
        if n is not None:
            return n
        n = self.charge(octets)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(n)  # granted just as we were cancelled: give it back
            else:
                if entry in self._waiters:  # _wake() may have dropped it already
                    self._waiters.remove(entry)
                self._wake()  # the head may have been us: the next in line may fit now
            raise
        return n

    def release(self, octets: int) -> None:
        """Give back a charge :meth:`acquire` or :meth:`try_acquire` returned."""
        self.in_use -= octets
        if self.in_use < 0:
            raise RuntimeError("memory budget released more than was taken")
        self._wake()

    def _take(self, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        while self._waiters:
            n, waiter = self._waiters[0]
            if waiter.done():  # cancelled while queued; acquire() removes it
                self._waiters.popleft()
                continue
            if self.in_use + n > self.total:
                return
            self._waiters.popleft()
            self._take(n)
            waiter.set_result(None)
