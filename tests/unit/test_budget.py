"""The memory budget (connector/budget.py, docs/design.md §10.6): octets shared by every cycle,
waited for in order, never exceeded, never leaked by a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from connector.budget import MemoryBudget


async def test_a_charge_that_does_not_fit_waits_until_one_is_released() -> None:
    budget = MemoryBudget(100)
    first = await budget.acquire(70)
    waiting = asyncio.create_task(budget.acquire(50))
    await asyncio.sleep(0)
    assert not waiting.done()
    assert budget.in_use == 70
    budget.release(first)
    assert await waiting == 50
    assert budget.in_use == 50
    assert budget.peak == 70


async def test_try_acquire_never_waits_and_never_jumps_the_queue() -> None:
    budget = MemoryBudget(100)
    held = budget.try_acquire(60)
    assert held == 60
    assert budget.try_acquire(50) is None  # no room
    waiter = asyncio.create_task(budget.acquire(50))
    await asyncio.sleep(0)
    assert budget.try_acquire(10) is None  # room, but someone waits: served first
    budget.release(held)
    assert await waiter == 50
    assert budget.try_acquire(10) == 10


async def test_a_charge_larger_than_the_budget_takes_the_whole_of_it() -> None:
    budget = MemoryBudget(100)
    assert await budget.acquire(10**9) == 100
    assert budget.try_acquire(1) is None
    budget.release(100)
    assert budget.in_use == 0


async def test_a_cancelled_waiter_takes_nothing_and_lets_the_next_one_in() -> None:
    budget = MemoryBudget(100)
    held = await budget.acquire(90)
    big = asyncio.create_task(budget.acquire(80))
    small = asyncio.create_task(budget.acquire(10))
    await asyncio.sleep(0)
    assert not small.done()  # behind the big one
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    assert await small == 10
    budget.release(held)
    budget.release(10)
    assert budget.in_use == 0


async def test_a_waiter_cancelled_as_it_was_granted_gives_the_charge_back() -> None:
    budget = MemoryBudget(100)
    held = await budget.acquire(100)
    waiter = asyncio.create_task(budget.acquire(40))
    await asyncio.sleep(0)
    budget.release(held)  # grants the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.in_use == 0


async def test_many_accounts_share_it_and_it_is_never_exceeded() -> None:
    budget = MemoryBudget(1000)

    async def account(sizes: list[int]) -> None:
        for size in sizes:
            taken = await budget.acquire(size)
            assert budget.in_use <= budget.total
            await asyncio.sleep(0)
            budget.release(taken)

    await asyncio.gather(*(account([300, 700, 999, 1, 500] * 20) for _ in range(8)))
    assert budget.in_use == 0
    assert budget.peak <= 1000


def test_releasing_more_than_was_taken_is_a_bug() -> None:
    budget = MemoryBudget(10)
    with pytest.raises(RuntimeError):
        budget.release(1)
