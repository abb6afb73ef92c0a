"""connector/tls.py: the one place for the TLS mode, the client context and the loopback test."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from connector.errors import ConfigError
from connector.tls import TlsMode, is_loopback, make_ssl_context, tls_reason_hint


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST",
        "localhost.",  # fully qualified
        "mail.localhost",  # RFC 6761 §6.3: every name under localhost
        "127.0.0.1",
        "127.8.9.10",  # the whole of 127.0.0.0/8
        "::1",
        "[::1]",
    ],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    ["exchange.firma.local", "localhost.firma.local", "10.0.0.1", "::2", "[fe80::1]", "", "127"],
)
def test_hosts_that_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_context_verifies_by_default_and_only_turns_it_off_when_asked() -> None:
    strict = make_ssl_context(True, None, "smtp")
    assert (strict.verify_mode, strict.check_hostname) == (ssl.CERT_REQUIRED, True)
    loose = make_ssl_context(False, None, "smtp")
    assert (loose.verify_mode, loose.check_hostname) == (ssl.CERT_NONE, False)


def test_an_unloadable_ca_file_is_a_config_error_naming_its_key(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^accounts\[2\]\.ca_file: cannot load "):
        make_ssl_context(True, bad, "accounts[2]")


def test_the_hint_names_a_plain_text_port_only_for_wrong_version_number() -> None:
    assert "plain text" in tls_reason_hint("WRONG_VERSION_NUMBER")
    assert tls_reason_hint("CERTIFICATE_VERIFY_FAILED") == ""
    assert tls_reason_hint(None) == ""


def test_modes_are_the_config_values() -> None:
    assert [m.value for m in TlsMode] == ["implicit", "starttls", "none"]
