"""One cycle of one account: the message lifecycle of docs/design.md §5.

``lifecycle``  :class:`Cycle`, login to QUIT: each message's path, from RETR to the one tail
               every outcome ends in (ledger write, DELE, observer, count); the seams it runs
               on, as Protocols (``Ledger``, ``Pop3Session``, ``Deliverer``, ``CycleObserver``)
``commit``     :class:`GroupCommit`: delivered rows in the ledger's group commit, and the DELEs
               that wait for them (docs/design.md §8.5)
``refusal``    what an SMTP refusal means (:func:`verdict`, shared with ``dead-letters
               requeue``), its summary line, and the circuit breaker (docs/design.md §6.2)
``identity``   UIDLs and their stand-ins; what the ledger keeps to recognise a message, and
               the check before a DELE unread; the key of a shared mailbox's copies
``values``     what a cycle is given (:class:`AccountSpec`, its :class:`SmtpTarget`) and
               reports (:class:`Outcome`, :class:`CycleStats`)
``trace``      the ``Received:`` line added to every message delivered

``lifecycle`` imports the others; none of them imports ``lifecycle``.
"""

from connector.cycle.commit import SETTLE_EVERY, GroupCommit
from connector.cycle.identity import Identities, duplicate_key, stand_in_uidl, uid_listing
from connector.cycle.lifecycle import (
    ERROR_LIMIT,
    FETCH_CEILING,
    Cycle,
    CycleObserver,
    CycleStopped,
    Deliverer,
    Ledger,
    LogObserver,
    Pop3Session,
    error_summary,
)
from connector.cycle.refusal import (
    BREAKER_THRESHOLD,
    Breaker,
    Verdict,
    refusal_summary,
    verdict,
)
from connector.cycle.trace import trace_header
from connector.cycle.values import (
    AccountSpec,
    CycleStats,
    DeliveryPolicy,
    Outcome,
    Oversize,
    SmtpTarget,
)

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
    "GroupCommit",
    "Identities",
    "Ledger",
    "LogObserver",
    "Outcome",
    "Oversize",
    "Pop3Session",
    "SmtpTarget",
    "Verdict",
    "duplicate_key",
    "error_summary",
    "refusal_summary",
    "stand_in_uidl",
    "trace_header",
    "uid_listing",
    "verdict",
]
