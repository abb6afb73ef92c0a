"""systemd's service notifications (sd_notify(3)), spoken directly: no libsystemd, no dependency.

With ``Type=notify`` systemd starts the unit's dependents only after ``READY=1``, and with
``WatchdogSec=`` it kills and restarts a service that has not sent ``WATCHDOG=1`` for that long
(systemd.service(5)).  The protocol is one datagram per notification, newline-separated
``KEY=VALUE`` assignments, to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or
``@name`` for the abstract namespace).  ``$WATCHDOG_USEC`` gives the watchdog timeout, and
``$WATCHDOG_PID``, when set, the one process it is meant for.

The watchdog pings come from a task in the service's event loop and only while the scheduler is
alive: a loop frozen by a bug (a blocking call, a runaway computation) sends nothing, and systemd
restarts the process.  Outside systemd (no ``$NOTIFY_SOCKET``; Windows) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Final

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)

NOTIFY_VARIABLES: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""What systemd gives the service for notifications; none of a child's business."""


class SystemdNotifier:
    """Sends notifications to ``address``; ``watchdog`` is the timeout in seconds, or None."""

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = address or None
        self.watchdog = watchdog
        self._warned = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> SystemdNotifier:
        """The notifier systemd's variables describe (see the module docstring)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not hasattr(socket, "AF_UNIX"):
            address = None  # Windows: systemd is not there either
        watchdog = None
        usec, for_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID")
        mine = for_pid is None or for_pid == str(os.getpid() if pid is None else pid)
        if usec.isascii() and usec.isdigit() and int(usec) > 0 and mine:
            watchdog = int(usec) / 1_000_000
        return cls(address, watchdog)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when not under systemd or it failed.

        Never raises and never blocks: a notification that cannot be sent is logged (once) and
        dropped; systemd's own timeouts then speak for it.
        """
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc.strerror or exc)
                self._warned = True
            return False
        return True

    async def keep_alive(self, alive: Callable[[], bool]) -> None:
        """Send ``WATCHDOG=1`` every half watchdog timeout while ``alive()``; until cancelled.

        Half, as sd_watchdog_enabled(3) advises, so that one late ping does not kill us.
        """
        if self.watchdog is None or self.address is None:
            return
        while True:
            if alive():
                self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog / 2)
