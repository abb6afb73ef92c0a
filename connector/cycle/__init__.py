"""One cycle of one account: the message lifecycle of docs/design.md §5.

``lifecycle``  :class:`Cycle`, from login to QUIT, and every message's path through it
``values``     what a cycle is given (:class:`AccountSpec`) and reports (:class:`Outcome`)
``identity``   UIDLs and their stand-ins; the key of a shared mailbox's copies
``refusal``    the circuit breaker against our own misjudgement at MAIL and RCPT
``trace``      the ``Received:`` line added to every message delivered
"""

from connector.cycle.identity import duplicate_key, header_digest, uid_listing
from connector.cycle.lifecycle import (
    ERROR_LIMIT,
    FETCH_CEILING,
    SETTLE_EVERY,
    Cycle,
    CycleObserver,
    CycleStopped,
    Deliverer,
    LogObserver,
    error_summary,
)
from connector.cycle.refusal import BREAKER_THRESHOLD, Breaker
from connector.cycle.trace import trace_header
from connector.cycle.values import AccountSpec, CycleStats, DeliveryPolicy, Outcome, Oversize

__all__ = [
    "BREAKER_THRESHOLD",
    "ERROR_LIMIT",
    "FETCH_CEILING",
    "SETTLE_EVERY",
    "AccountSpec",
    "Breaker",
    "Cycle",
    "CycleObserver",
    "CycleStats",
    "CycleStopped",
    "Deliverer",
    "DeliveryPolicy",
    "LogObserver",
    "Outcome",
    "Oversize",
    "duplicate_key",
    "error_summary",
    "header_digest",
    "trace_header",
    "uid_listing",
]
