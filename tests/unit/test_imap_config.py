"""IMAP accounts outside the wire (docs/design.md §14): the config keys and their checks, the
runtime values, the classification of IMAP refusals, the ledger's rekeying and the carry-over
of rows when a folder's UIDVALIDITY changes (on the real ledger and on the cycle's fakes)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from connector.config import Settings, load_settings, render_settings
from connector.cycle.identity import carry_over
from connector.errors import (
    ConfigError,
    Disposition,
    ImapAuthError,
    ImapResponseError,
    Pop3AuthError,
    classify,
)
from connector.headers import header_digest
from connector.imap import ImapAuth, ImapOptions
from connector.ledger import Identity, Ledger, RecipientsDone
from connector.runtime import build_runtime
from tests.fakes import FakeLedger

BASE = """
[service]
state_dir = "{state}"
[smtp]
host = "exchange.example.local"
[[accounts]]
name = "office"
host = "imap.example.net"
username = "office@firma.example"
password = "pw-not-shown"
deliver_to = ["office@firma.local"]
"""


def load(tmp_path: Path, extra: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(BASE.format(state=tmp_path) + extra)
    path.chmod(0o600)
    return load_settings(path)


def problems(tmp_path: Path, extra: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    return "\n".join(info.value.problems)


@pytest.mark.parametrize(
    ("extra", "port"),
    [
        ('protocol = "imap"', 993),
        ('protocol = "imap"\ntls = "starttls"', 143),
        ('protocol = "imap"\ntls = "none"', 143),
        ("", 995),
        ('protocol = "pop3"\ntls = "starttls"', 110),
    ],
)
def test_default_ports_follow_the_protocol(tmp_path: Path, extra: str, port: int) -> None:
    runtime = build_runtime(load(tmp_path, extra))
    (spec,) = runtime.accounts
    assert spec.endpoint.port == port


def test_an_imap_account_becomes_imap_options(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        'protocol = "imap"\nauth = "login"\nfolder = "Eingang/Firma"\npush = false\n'
        'idle_renewal = "10m"',
    )
    (spec,) = build_runtime(settings).accounts
    assert spec.imap == ImapOptions("Eingang/Firma", ImapAuth.LOGIN, False, 600.0)
    (pop3,) = build_runtime(load(tmp_path, "")).accounts
    assert pop3.imap is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('folder = "INBOX"', 'folder: only used with protocol = "imap"'),
        ("push = false", 'push: only used with protocol = "imap"'),
        ('idle_renewal = "5m"', 'idle_renewal: only used with protocol = "imap"'),
        ('auth = "login"', '"login" is for IMAP accounts'),
        ('protocol = "imap"\nauth = "apop"', '"apop" is a POP3 login'),
        ('protocol = "imap"\nauth = "user"', '"user" is a POP3 login'),
        ('protocol = "imap"\nidle_renewal = "30m"', "idle_renewal"),
        ('protocol = "imap"\nfolder = "a//b"', "empty level"),
        ('protocol = "imap"\nfolder = "/INBOX"', "empty level"),
        ('protocol = "smtp"', "protocol"),
    ],
)
def test_keys_that_do_not_fit_the_protocol_are_errors(
    tmp_path: Path, extra: str, expected: str
) -> None:
    text = problems(tmp_path, extra)
    assert expected in text
    assert re.search(r"accounts\[0\]", text)
    assert "pw-not-shown" not in text


def test_check_renders_a_config_that_loads_again(tmp_path: Path) -> None:
    for extra in ("", 'protocol = "imap"\nfolder = "Archiv"'):
        settings = load(tmp_path, extra)
        rendered = render_settings(settings)
        again = tmp_path / "again.toml"
        again.write_text(rendered.replace("**********", "pw-not-shown"))
        again.chmod(0o600)
        assert render_settings(load_settings(again)) == rendered
        assert ("folder =" in rendered) == bool(extra)


# --------------------------------------------------------------------------------------------
# What an IMAP refusal means (docs/design.md §14.4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "disposition"),
    [
        (ImapAuthError("LOGIN", "no", "AUTHENTICATIONFAILED"), Disposition.PARK_ACCOUNT),
        (ImapAuthError("LOGIN", "no", "PRIVACYREQUIRED"), Disposition.PARK_ACCOUNT),
        (ImapAuthError("LOGIN", "busy", "UNAVAILABLE"), Disposition.RETRY),
        (ImapAuthError("LOGIN", "no", None), Disposition.RETRY),
        (ImapResponseError("SELECT", "gone", "NONEXISTENT"), Disposition.PARK_ACCOUNT),
        (ImapResponseError("SELECT", "ro", "NOPERM"), Disposition.PARK_ACCOUNT),
        (ImapResponseError("UID FETCH", "oops", "SERVERBUG"), Disposition.RETRY),
        (ImapResponseError("UID STORE", "locked", "INUSE"), Disposition.RETRY),
        (ImapResponseError("NOOP", "what", None, status="BAD"), Disposition.RETRY),
        # A POP3 code in an IMAP answer means nothing special.
        (ImapResponseError("LOGIN", "x", "SYS/PERM"), Disposition.RETRY),
    ],
)
def test_imap_refusals_are_classified(exc: Exception, disposition: Disposition) -> None:
    assert classify(exc) is disposition


def test_a_bare_no_at_login_counts_like_a_bare_err() -> None:
    exc = ImapAuthError("LOGIN", "Authentication failed.", None)
    assert isinstance(exc, Pop3AuthError)  # service._count_failure counts it
    assert str(exc) == "NO Authentication failed. (to LOGIN)"


# --------------------------------------------------------------------------------------------
# The ledger: rows of another epoch, and moving them
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


async def test_entries_outside_takes_every_other_epoch_and_nothing_else(ledger: Ledger) -> None:
    keys = [
        "imap:123:1",
        "imap:123:99",
        "imap:12:5",  # ":" sorts after "3": the range must not be a prefix test
        "imap:1234:5",
        "imap:124:1",
        "0000000165a1b2c",  # a POP3 UIDL of the same account (a protocol change)
    ]
    for key in keys:
        await ledger.record_delivered("a", key, 10, "250 ok", 1.0)
    await ledger.record_delivered("b", "imap:1:1", 10, "250 ok", 1.0)
    outside = await ledger.entries_outside("a", "imap:", "imap:123:")
    assert sorted(e.uidl for e in outside) == ["imap:1234:5", "imap:124:1", "imap:12:5"]
    with pytest.raises(ValueError, match="prefixes"):
        await ledger.entries_outside("a", "imap", "imap:1:")


async def test_rekey_moves_rows_and_their_recipients_and_keeps_a_row_already_there(
    ledger: Ledger,
) -> None:
    done = RecipientsDone(("uidl:imap:1:7",), ("anna@firma.local",))
    await ledger.record_deferred("a", "imap:1:7", 10, "451 later", 5.0, done=done)
    await ledger.record_delivered("a", "imap:1:8", 10, "250 ok", 5.0)
    await ledger.record_delivered("a", "imap:2:2", 10, "250 ok", 6.0)  # already there
    await ledger.rekey("a", {"imap:1:7": "imap:2:1", "imap:1:8": "imap:2:2"})
    moved = await ledger.entry("a", "imap:2:1")
    assert moved is not None
    assert (moved.state.value, moved.first_seen) == ("deferred", 5.0)
    assert await ledger.entry("a", "imap:1:7") is None
    assert await ledger.recipients_by_key("a", ["uidl:imap:2:1"]) == {
        "uidl:imap:2:1": frozenset({"anna@firma.local"})
    }
    kept = await ledger.entry("a", "imap:2:2")
    assert kept is not None
    assert kept.last_attempt == 6.0
    assert await ledger.entry("a", "imap:1:8") is not None  # left for the listing sync


class Renumbered:
    """A session whose folder got a new UIDVALIDITY (cycle.identity.Renumbering)."""

    family = "imap:"

    def __init__(self, epoch: int, headers: dict[int, bytes]) -> None:
        self.epoch = f"imap:{epoch}:"
        self.headers = headers
        self.asked: list[int] = []

    async def header_blocks(self, numbers: Sequence[int]) -> AsyncIterator[tuple[int, bytes]]:
        self.asked += numbers
        for n in numbers:
            if n in self.headers:
                yield n, self.headers[n]


def head(i: int) -> bytes:
    return f"Subject: {i}\r\nMessage-ID: <{i}@x>\r\n\r\n".encode()


def identity(i: int, size: int = 100) -> Identity:
    return Identity(size, header_digest(head(i)))


async def test_carry_over_pairs_rows_with_messages_by_identity() -> None:
    ledger = FakeLedger()
    # Old epoch 5: messages 1, 2 (two byte-identical copies of 2), 3 gone, 4 without identity.
    await ledger.record_delivered("a", "imap:5:10", 100, "250", 1.0, identity=identity(1))
    await ledger.record_delivered("a", "imap:5:11", 100, "250", 1.0, identity=identity(2))
    await ledger.record_deferred("a", "imap:5:12", 100, "451", 1.0, identity=identity(2))
    await ledger.record_delivered("a", "imap:5:13", 100, "250", 1.0, identity=identity(3))
    await ledger.record_delivered("a", "imap:5:14", 100, "250", 1.0)
    session = Renumbered(9, {1: head(2), 2: head(1), 3: head(2), 4: head(7)})
    listing = [(n, f"imap:9:{n}") for n in (1, 2, 3, 4)]
    moved = await carry_over(ledger, "a", session, listing, dict.fromkeys((1, 2, 3, 4), 100))
    assert sorted(moved) == ["imap:5:10", "imap:5:11", "imap:5:12"]
    keys = {uidl for (_, uidl) in ledger.rows}
    assert {"imap:9:1", "imap:9:2", "imap:9:3"} <= keys
    # Byte-identical copies pair in UID order: 11 -> 1 (delivered), 12 -> 3 (deferred).
    assert ledger.rows[("a", "imap:9:1")].state.value == "delivered"
    assert ledger.rows[("a", "imap:9:3")].state.value == "deferred"
    assert "imap:9:4" not in keys  # a new message: delivered
    assert {"imap:5:13", "imap:5:14"} <= keys  # left for the sync to forget


async def test_carry_over_costs_one_read_when_nothing_changed() -> None:
    ledger = FakeLedger()
    await ledger.record_delivered("a", "imap:9:1", 100, "250", 1.0, identity=identity(1))
    session = Renumbered(9, {1: head(1)})
    assert await carry_over(ledger, "a", session, [(1, "imap:9:1")], {1: 100}) == ()
    assert session.asked == []  # no header fetched
