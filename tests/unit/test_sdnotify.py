"""connector.sdnotify without a socket: the environment it reads, the watchdog's interval, and
the variables a helper we run must not inherit.  What systemd would receive over a real
NOTIFY_SOCKET: tests/component/test_sdnotify.py.
"""

from __future__ import annotations

import asyncio

from connector.oauth2 import child_environment
from connector.sdnotify import NOTIFY_VARIABLES, SystemdNotifier


def test_environment_gives_the_socket_and_the_watchdog() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "60000000"}
    notifier = SystemdNotifier.from_environment(env)
    assert (notifier.address, notifier.watchdog) == ("/run/systemd/notify", 60.0)
    other = SystemdNotifier.from_environment({**env, "WATCHDOG_PID": "1"}, pid=2)
    assert other.watchdog is None  # meant for another process (sd_watchdog_enabled(3))
    assert SystemdNotifier.from_environment({}).address is None
    assert SystemdNotifier.from_environment({"WATCHDOG_USEC": "x"}).watchdog is None
    assert not SystemdNotifier(None).notify("READY=1")  # outside systemd: nothing, no error


def test_no_watchdog_no_pings() -> None:
    asyncio.run(SystemdNotifier("/nonexistent", None).keep_alive(lambda: True))  # returns


def test_a_helper_we_run_does_not_get_systemds_variables() -> None:
    env = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1"}
    assert child_environment(env, frozenset()) == {"PATH": "/usr/bin"}
    assert set(NOTIFY_VARIABLES) >= {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
