"""The smtp package's shape: its public names resolve, and its pure part stays pure.

``connector.smtp.envelope`` (addresses, the envelope, what is fixed by the config) is used by
``recipients`` and the dead-letter format, which are pure; importing it must not load
aiosmtplib or the network modules (the package's ``__init__`` loads the rest on first use).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import connector.smtp

FORBIDDEN = ("aiosmtplib", "asyncio", "socket", "ssl")


def test_the_pure_part_imports_no_io_modules() -> None:
    code = (
        "import sys\n"
        "import connector.smtp.envelope, connector.recipients\n"
        "from connector.smtp import Envelope, address_problem\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    # -I: isolated mode, so no sitecustomize or user site imports anything behind our back.
    # Without coverage.py's variables: under scripts/test it would start in the child (pyproject's
    # patch = ["subprocess"]) and import socket itself.
    fresh = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, env=fresh
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", connector.smtp.__all__)
def test_every_public_name_resolves_to_its_module_object(name: str) -> None:
    value = getattr(connector.smtp, name)
    home = importlib.import_module(value.__module__)
    assert getattr(home, name) is value
    assert name in home.__all__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'deliver'"):
        _ = connector.smtp.deliver
