"""Shared pieces of the reliability suite: hypothesis profiles and the end-to-end rig.

Hypothesis profiles: ``dev`` (default, fast) and ``ci`` (``HYPOTHESIS_PROFILE=ci``), the same
names and budgets as tests/unit/test_pop3_properties.py, plus ``long`` for a run by hand.  The
fuzz tests read the profile with ``settings.get_profile`` so they do not depend on import order.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Re-exported so that tests here get the integration rig (one Dovecot user, an aiosmtpd sink,
# a state dir and a config file) without copying it.
from tests.integration.conftest import setup_factory

__all__ = ["setup_factory"]

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
settings.register_profile(
    "long", max_examples=200_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
