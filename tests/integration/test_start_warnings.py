"""What ``run`` says when it starts: a poll interval under a minute is logged as a warning
(``poll_interval = 15`` is seconds, where the SBS schedule said minutes)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.conftest import Setup
from tests.integration.test_service import running

pytestmark = pytest.mark.integration


def test_run_logs_a_poll_interval_under_a_minute(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory(service_extra="poll_interval = 15")
    with running(s.config) as (_, log):
        assert log.wait_for("service.poll_interval: 15 s, a login every 15 seconds"), log.text()
        assert "WARNING" in next(
            line for line in log.text().splitlines() if "service.poll_interval" in line
        )
