"""connector/runtime.py: the configuration turned into runtime values, and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector.config import MASK, load_settings
from connector.errors import ConfigError
from connector.runtime import build_runtime

SECRET = "Hunter2-secret"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def test_a_bad_ca_file_is_named_with_the_account_and_without_a_secret(tmp_path: Path) -> None:
    """The error names the account beside its index, as the config's own errors do, and masks
    a password that also appears in the path (pasted into the wrong key)."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[service]\nstate_dir = "{tmp_path}"\n[smtp]\nhost = "127.0.0.1"\ntls = "none"\n'
        f'[[accounts]]\nname = "info"\nhost = "pop.example"\nca_file = "{tmp_path / SECRET}"\n'
        f'username = "info"\npassword = "{SECRET}"\ndeliver_to = ["info@firma.local"]\n'
    )
    with pytest.raises(ConfigError) as info:
        build_runtime(load_settings(path))
    (problem,) = info.value.problems
    assert SECRET not in problem
    assert problem.startswith(f'accounts[0] (name "info").ca_file: cannot load {tmp_path}/{MASK}')
