"""connector/runtime.py: the configuration turned into runtime values, and its errors."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trustme

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


def test_accounts_with_the_same_trust_share_one_context(tmp_path: Path) -> None:
    """One SSLContext per (verify_certificate, ca_file) in a build, not one per account: each
    loads the system trust store (bench/README.md: 10,000 POP3S accounts took minutes and
    gigabytes to start)."""
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    accounts = [
        f'tls = "implicit"\nca_file = "{ca_file}"',
        f'tls = "implicit"\nca_file = "{ca_file}"',
        f'tls = "starttls"\nca_file = "{ca_file}"',
        'tls = "implicit"\nverify_certificate = false',
        'tls = "none"',
        'tls = "implicit"',
    ]
    blocks = "".join(
        f'\n[[accounts]]\nname = "a{i}"\nhost = "pop.test"\nusername = "u"\npassword = "p"\n'
        f'deliver_to = ["a@b.test"]\n{extra}\n'
        for i, extra in enumerate(accounts)
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path}"\n[smtp]\nhost = "smtp.test"\ntls = "starttls"\n'
        f'helo_name = "c.test"\n{blocks}'
    )
    config.chmod(0o600)
    runtime = build_runtime(load_settings(config))
    ctx = [a.endpoint.ssl_context for a in runtime.accounts]
    assert ctx[0] is not None
    assert ctx[0] is ctx[1] is ctx[2]
    assert ctx[3] is not None
    assert ctx[3] is not ctx[0]
    assert ctx[3].verify_mode == ssl.CERT_NONE
    assert ctx[0].verify_mode == ssl.CERT_REQUIRED
    assert ctx[4] is None
    assert ctx[5] is not None
    assert ctx[5] is runtime.smtp.ssl_context  # the system's trust alone, as SMTP's
    assert ctx[5] not in (ctx[0], ctx[3])
    # A reload builds its own (a CA file changed in place is read again).
    again = build_runtime(load_settings(config))
    assert again.accounts[0].endpoint.ssl_context is not ctx[0]
    assert again.accounts[0] == runtime.accounts[0]  # and the spec is unchanged by value
