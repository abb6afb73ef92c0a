"""A loopback TCP proxy that can hold back a client's command, for fault injection.

Kept for its importers (tests/integration/test_cycle.py); the implementation, with more faults
(delay, stall, cut, reset), lives in :mod:`tests.faults`.
"""

from __future__ import annotations

from tests.faults import HoldingProxy

__all__ = ["HoldingProxy"]
