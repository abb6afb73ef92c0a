"""connector.config: ``[accounts.shared]``, ``[[accounts.shared.rules]]`` and ``oversize``.

Valid settings map to the router's :class:`~connector.recipients.SharedMailbox` through
``runtime.shared_mailbox``; every invalid one is a ConfigError naming its key path.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from connector.config import Settings, load_settings, render_settings
from connector.errors import ConfigError
from connector.recipients import DEFAULT_ENVELOPE_HEADERS, Rule, SharedMailbox
from connector.runtime import shared_mailbox

SECRET = "s3cr3t-Pa55word!"  # must never appear in an error

BASE = f"""
[smtp]
host = "exchange.example.local"

[[accounts]]
name = "info"
host = "pop.example.net"
username = "info@firma.example"
password = "{SECRET}"
deliver_to = ["info@firma.local"]

[[accounts]]
name = "catchall"
host = "pop.example.net"
username = "catchall@provider.example"
password = "{SECRET}"
deliver_to = ["undeliverable@firma.local"]
"""

SHARED = """
[accounts.shared]
domains = ["Firma.Example", "firma.de."]
envelope_headers = ["X-Original-To", "Delivered-To"]
header_recipients = false
rewrite_domain = "Firma.Local"
suppress_duplicates = false
duplicate_window = "2d"

[[accounts.shared.rules]]
match = "INFO@firma.example"
deliver_to = ["info@firma.local", "chef@firma.local"]

[[accounts.shared.rules]]
match = "dev-?ist@lists.example.org"
deliver_to = ["developers@firma.local"]

[[accounts.shared.rules]]
match = "*@sales.firma.example"
deliver_to = ["sales@firma.local"]
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without any POP3_CONNECTOR_* variable from the outside."""
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return load_settings(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert SECRET not in str(info.value)
    return info.value.problems


def shared(body: str) -> str:
    """BASE with ``body`` (TOML under [accounts.shared]) added to the second account."""
    return BASE + "\n[accounts.shared]\n" + body


# --------------------------------------------------------------------------------------------
# Valid settings
# --------------------------------------------------------------------------------------------


def test_shared_maps_to_the_router(tmp_path: Path) -> None:
    settings = load(tmp_path, BASE + SHARED)
    info, catchall = settings.accounts
    assert info.shared is None
    assert catchall.shared is not None
    assert shared_mailbox(catchall.shared) == SharedMailbox(
        domains=frozenset({"firma.example", "firma.de"}),
        envelope_headers=("X-Original-To", "Delivered-To"),
        header_recipients=False,
        rules=(
            Rule("info@firma.example", ("info@firma.local", "chef@firma.local")),
            Rule("dev-?ist@lists.example.org", ("developers@firma.local",)),
            Rule("*@sales.firma.example", ("sales@firma.local",)),
        ),
        rewrite_domain="firma.local",
        duplicate_window=0.0,  # suppress_duplicates = false
    )
    # deliver_to stays the account's, as the fallback.
    assert catchall.deliver_to == ["undeliverable@firma.local"]


def test_shared_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, shared('domains = ["firma.example"]\n'))
    config = settings.accounts[1].shared
    assert config is not None
    assert shared_mailbox(config) == SharedMailbox(
        domains=frozenset({"firma.example"}),
        envelope_headers=DEFAULT_ENVELOPE_HEADERS,
        header_recipients=True,
        rules=(),
        rewrite_domain=None,
        duplicate_window=7 * 86400.0,
    )


def test_duplicate_window_is_a_duration(tmp_path: Path) -> None:
    settings = load(tmp_path, shared('domains = ["firma.example"]\nduplicate_window = "1h30m"\n'))
    config = settings.accounts[1].shared
    assert config is not None
    assert shared_mailbox(config).duplicate_window == 5400.0


@pytest.mark.parametrize("oversize", ["dead-letter", "leave"])
def test_oversize_values(tmp_path: Path, oversize: str) -> None:
    text = BASE.replace(
        'deliver_to = ["info@firma.local"]',
        f'deliver_to = ["info@firma.local"]\noversize = "{oversize}"',
    )
    assert load(tmp_path, text).accounts[0].oversize == oversize
    assert load(tmp_path, BASE).accounts[0].oversize == "dead-letter"


def test_check_renders_a_shared_account(tmp_path: Path) -> None:
    """``pop3-connector check`` prints render_settings(); a shared account must not crash it,
    and the rendering must load again to the same settings (masked password aside)."""
    settings = load(tmp_path, BASE + SHARED)
    text = render_settings(settings)
    data = tomllib.loads(text)
    assert data["accounts"][1]["shared"]["domains"] == ["firma.example", "firma.de"]
    assert data["accounts"][1]["shared"]["rules"][0]["match"] == "info@firma.example"
    again = load(tmp_path, text.replace('"********"', f'"{SECRET}"'))
    assert again.accounts[1].shared == settings.accounts[1].shared


# --------------------------------------------------------------------------------------------
# Errors name their key path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            "domains = []\n",
            [
                'accounts[1] (name "catchall").shared.domains: '
                "List should have at least 1 item after validation, not 0"
            ],
            id="empty-domains",
        ),
        pytest.param(
            "header_recipients = true\n",
            ['accounts[1] (name "catchall").shared.domains: Field required'],
            id="missing-domains",
        ),
        pytest.param(
            'domains = ["firma.example", "bad domain"]\n',
            [
                'accounts[1] (name "catchall").shared.domains[1]: '
                'not a valid domain name (expected like firma.example, ASCII) (got "bad domain")'
            ],
            id="bad-domain",
        ),
        pytest.param(
            'domains = ["münchen.example"]\n',
            [
                'accounts[1] (name "catchall").shared.domains[0]: '
                "not a valid domain name (expected like firma.example, ASCII)"
                ' (got "münchen.example")'
            ],
            id="non-ascii-domain",
        ),
        pytest.param(
            'domains = ["firma.example"]\nrewrite_domain = "firma local"\n',
            [
                'accounts[1] (name "catchall").shared.rewrite_domain: '
                'not a valid domain name (expected like firma.example, ASCII) (got "firma local")'
            ],
            id="bad-rewrite-domain",
        ),
        pytest.param(
            'domains = ["firma.example"]\nrewrite_domain = "@firma.local"\n',
            [
                'accounts[1] (name "catchall").shared.rewrite_domain: '
                'not a valid domain name (expected like firma.example, ASCII) (got "@firma.local")'
            ],
            id="rewrite-domain-with-at",
        ),
        pytest.param(
            'domains = ["firma.example"]\nenvelope_headers = ["Delivered To"]\n',
            [
                'accounts[1] (name "catchall").shared.envelope_headers[0]: '
                "not a header field name (like Delivered-To)"
                ' (got "Delivered To")'
            ],
            id="bad-envelope-header",
        ),
        pytest.param(
            'domains = ["firma.example"]\nenvelope_headers = ["Delivered-To:"]\n',
            [
                'accounts[1] (name "catchall").shared.envelope_headers[0]: '
                "not a header field name (like Delivered-To)"
                ' (got "Delivered-To:")'
            ],
            id="envelope-header-with-colon",
        ),
        pytest.param(
            'domains = ["firma.example"]\ndomain = "typo"\n',
            ['accounts[1] (name "catchall").shared.domain: unknown key'],
            id="unknown-key",
        ),
        pytest.param(
            'domains = ["firma.example"]\nduplicate_window = "forever"\n',
            [
                'accounts[1] (name "catchall").shared.duplicate_window: '
                'expected a duration like "30s", "15m", "2h", "5d", "1h30m" or seconds'
                ' (got "forever")'
            ],
            id="bad-duplicate-window",
        ),
        pytest.param(
            'domains = ["firma.example"]\nheader_recipients = "maybe"\n',
            [
                'accounts[1] (name "catchall").shared.header_recipients: '
                'Input should be a valid boolean, unable to interpret input (got "maybe")'
            ],
            id="bad-bool",
        ),
    ],
)
def test_shared_errors_name_the_key(tmp_path: Path, body: str, expected: list[str]) -> None:
    assert problems(tmp_path, shared(body)) == expected


_PATTERN_HINT = (
    'expected an address, where * and ? may stand for any text ("*@sales.firma.example")'
)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        pytest.param(
            'match = "no-at-sign"\ndeliver_to = ["x@firma.local"]',
            [
                f'accounts[1] (name "catchall").shared.rules[1].match: {_PATTERN_HINT}'
                ' (got "no-at-sign")'
            ],
            id="pattern-without-at",
        ),
        pytest.param(
            'match = "a b@firma.example"\ndeliver_to = ["x@firma.local"]',
            [
                f'accounts[1] (name "catchall").shared.rules[1].match: {_PATTERN_HINT}'
                ' (got "a b@firma.example")'
            ],
            id="pattern-with-space",
        ),
        pytest.param(
            'match = "<a@firma.example>"\ndeliver_to = ["x@firma.local"]',
            [
                f'accounts[1] (name "catchall").shared.rules[1].match: {_PATTERN_HINT}'
                ' (got "<a@firma.example>")'
            ],
            id="pattern-with-brackets",
        ),
        pytest.param(
            'match = "a@firma.example"\ndeliver_to = []',
            [
                'accounts[1] (name "catchall").shared.rules[1].deliver_to: '
                "List should have at least 1 item after validation, not 0"
            ],
            id="empty-deliver-to",
        ),
        pytest.param(
            'match = "a@firma.example"\ndeliver_to = ["ok@firma.local", "not an address"]',
            [
                'accounts[1] (name "catchall").shared.rules[1].deliver_to[1]: '
                "not a valid mail address (expected user@domain, ASCII, no <>)"
                ' (got "not an address")'
            ],
            id="bad-deliver-to",
        ),
        pytest.param(
            'deliver_to = ["x@firma.local"]',
            ['accounts[1] (name "catchall").shared.rules[1].match: Field required'],
            id="missing-match",
        ),
        pytest.param(
            'match = "a@firma.example"\ndeliver_to = ["x@firma.local"]\nto = "y"',
            ['accounts[1] (name "catchall").shared.rules[1].to: unknown key'],
            id="unknown-rule-key",
        ),
    ],
)
def test_rule_errors_name_the_key(tmp_path: Path, rule: str, expected: list[str]) -> None:
    text = shared(
        'domains = ["firma.example"]\n'
        '[[accounts.shared.rules]]\nmatch = "ok@firma.example"\ndeliver_to = ["ok@firma.local"]\n'
        f"[[accounts.shared.rules]]\n{rule}\n"
    )
    assert problems(tmp_path, text) == expected


def test_several_shared_problems_all_listed(tmp_path: Path) -> None:
    text = shared(
        'domains = ["firma.example", ""]\nrewrite_domain = "x y"\n'
        '[[accounts.shared.rules]]\nmatch = "nope"\ndeliver_to = ["a@b"]\n'
    )
    assert [p.split(":")[0] for p in problems(tmp_path, text)] == [
        'accounts[1] (name "catchall").shared.domains[1]',
        'accounts[1] (name "catchall").shared.rewrite_domain',
        'accounts[1] (name "catchall").shared.rules[0].match',
    ]


@pytest.mark.parametrize("oversize", ["bounce", "Leave", "dead_letter", ""])
def test_oversize_accepts_only_dead_letter_or_leave(tmp_path: Path, oversize: str) -> None:
    text = BASE.replace(
        'deliver_to = ["info@firma.local"]',
        f'deliver_to = ["info@firma.local"]\noversize = "{oversize}"',
    )
    assert problems(tmp_path, text) == [
        f"accounts[0] (name \"info\").oversize: Input should be 'dead-letter' or 'leave' "
        f'(got "{oversize}")'
    ]
