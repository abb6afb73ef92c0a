"""``check --connect`` (connector/check.py) against loopback ports nothing listens on: what its
table shows when every connection fails."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest

from connector.check import check_connections
from connector.config import MASK, load_settings
from connector.runtime import build_runtime
from tests.servers import free_port

SECRET = "Hunter2-secret"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def test_the_table_masks_a_password_pasted_into_a_name(tmp_path: Path) -> None:
    """An account named like its password (pasted into the wrong key): the row that names
    the account shows the mask instead."""
    port = free_port()
    path = tmp_path / "config.toml"
    path.write_text(
        f'[service]\nstate_dir = "{tmp_path}"\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\nhelo_name = "c.test"\n'
        f'[[accounts]]\nname = "{SECRET}"\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\n'
        f'username = "info"\npassword = "{SECRET}"\ndeliver_to = ["info@firma.local"]\n'
    )
    out = io.StringIO()
    assert asyncio.run(check_connections(build_runtime(load_settings(path)), out)) == 1
    table = out.getvalue()
    assert SECRET not in table
    assert f"pop3 {MASK}" in table
