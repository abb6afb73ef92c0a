"""Which replica polls which account: ``--shard k/N``, ``--shard auto/N`` (docs/design.md §14.2).

Replica k of N owns the accounts whose name maps to k.  The map must be the same in every
replica, every version and every Python (not ``hash()``, which is salted per process), and
changing N should move as few accounts as it can, since every account that moves takes its
ledger rows with it (``ledger export`` / ``ledger import``, deploy/kubernetes/README.md).

The map: the first 8 octets of SHA-256 of the account's name (UTF-8, as written in the config),
read big-endian, as the key of the jump consistent hash (Lamping and Veach, "A Fast, Minimal
Memory, Consistent Hash Algorithm", 2014, arXiv:1406.2294).  Jump hash spreads keys evenly over
N buckets, and going from N to N+1 moves only the accounts that land in the new bucket (about
1/(N+1) of them) while the others stay where they were; going down from N to M moves only the
accounts of the shards at M and above.  A plain ``key mod N`` would move about three quarters
of the accounts from 3 to 4 replicas.  The floating-point step is the reference code's, in IEEE
754 double precision, which Python's ``float`` is on every platform it runs on.

This module is pure: no I/O beyond reading the pod's name from the environment or the host
name, for ``auto``, in :func:`parse_shard`.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from connector.errors import UsageError, printable

__all__ = ["ALL", "Shard", "parse_shard", "shard_key", "shard_of"]

_MASK64: Final = (1 << 64) - 1
# The 64-bit linear congruential step of the reference implementation (Knuth's MMIX constant).
_LCG: Final = 2862933555777941757
_SPEC_RE: Final = re.compile(r"(?P<k>auto|\d{1,6})/(?P<n>\d{1,6})")
# A StatefulSet's pods are named <name>-<ordinal>; only the digits after the last "-" count.
_ORDINAL_RE: Final = re.compile(r"-(\d{1,6})\Z")
POD_NAME_ENV: Final = "POD_NAME"


def shard_key(name: str) -> int:
    """The 64-bit key of an account: SHA-256 of its name (UTF-8), first 8 octets, big-endian."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in ``range(buckets)`` of a 64-bit ``key`` (Lamping and Veach, Figure 1)."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _LCG + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_of(name: str, count: int) -> int:
    """The shard (0 <= k < count) that owns the account called ``name``."""
    return jump_hash(shard_key(name), count)


@dataclass(frozen=True, slots=True)
class Shard:
    """This process's part of the accounts: ``index`` of ``count`` (0/1: every account)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= k < N and N >= 1")

    def owns(self, name: str) -> bool:
        """Whether this shard polls the account called ``name``."""
        return self.count == 1 or shard_of(name, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


ALL: Final = Shard(0, 1)


def parse_shard(
    text: str,
    *,
    environ: Mapping[str, str] | None = None,
    hostname: Callable[[], str] = socket.gethostname,
) -> Shard:
    """``k/N``, or ``auto/N`` with k from the pod's name (``$POD_NAME`` when set and not
    empty, else the host name: ``pop3-connector-2`` is shard 2).

    Raises :class:`~connector.errors.UsageError` naming the value (the CLI exits 78): in a
    StatefulSet a replica whose ordinal is not below N is a replica count and
    ``POP3_CONNECTOR_SHARDS`` that disagree, and it must not poll anything.
    """
    where = f"--shard {printable(text[:40])}"
    m = _SPEC_RE.fullmatch(text.strip())
    if m is None:
        raise UsageError(f'{where}: expected "k/N" or "auto/N", like 0/3 or auto/3')
    count = int(m["n"])
    if count < 1:
        raise UsageError(f"{where}: N must be at least 1")
    if m["k"] != "auto":
        index = int(m["k"])
        if index >= count:
            raise UsageError(f"{where}: shard {index} is not below {count}")
        return Shard(index, count)
    env = os.environ if environ is None else environ
    pod = env.get(POD_NAME_ENV, "")
    source, name = ("pod name", pod) if pod else ("host name", hostname())
    ordinal = _ORDINAL_RE.search(name)
    shown = printable(name if len(name) <= 80 else name[:80] + "...")
    if ordinal is None:
        raise UsageError(
            f'{where}: {source} "{shown}" does not end in "-k" (a StatefulSet pod\'s ordinal); '
            f"set {POD_NAME_ENV} or give k/N"
        )
    index = int(ordinal[1])
    if index >= count:
        raise UsageError(
            f'{where}: {source} "{shown}" gives shard {index}, not below {count} (do '
            f"spec.replicas and POP3_CONNECTOR_SHARDS agree?)"
        )
    return Shard(index, count)
