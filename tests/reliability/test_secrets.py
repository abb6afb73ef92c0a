"""Secrets stay out of every output: debug logs, ``repr`` of runtime objects, ``check``, and the
environment of the ``oauth2_token_command`` we run.

The secrets are generated (hypothesis) with quotes and backslashes, the characters that change
a secret's form on its way out: IMAP quotes them (RFC 3501 §4.3), TOML, JSON and ``repr``
escape them, so each output is searched for each of those forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.cli import setup_logging
from connector.config import load_settings, render_settings
from connector.deadletter import DeadLetterInfo
from connector.deadletter.imap import ImapStore
from connector.imap.protocol import quote_astring
from connector.oauth2 import OAuth2TokenSource
from connector.runtime import build_runtime, open_store
from connector.tls import TlsMode
from tests.component.test_deadletter_imap import FakeImap
from tests.integration.conftest import Setup
from tests.integration.test_cycle import deny_spammer, message
from tests.reliability.test_security import _cli
from tests.servers import QUOTED_PASSWORD, QUOTED_USER

PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Printable text from the Basic Multilingual Plane (TOML's \u escapes cover it), with the
# characters that get quoted or escaped on the way out made frequent.
_TAILS = st.text(
    st.sampled_from("\"\\' ") | st.characters(max_codepoint=0xFFFF, categories=["L", "N", "P"]),
    min_size=3,
    max_size=24,
)


def _secret(prefix: str) -> st.SearchStrategy[str]:
    # A distinctive prefix, so that no secret can occur in an output by coincidence.
    return _TAILS.map(lambda tail: prefix + tail)


def forms(secret: str) -> set[str]:
    """The secret as it could appear: raw, IMAP-quoted, JSON/TOML-escaped, repr'd."""
    quoted = quote_astring(secret)
    return {
        secret,
        quoted,
        json.dumps(secret)[1:-1],
        repr(secret)[1:-1],
        repr(quoted.encode())[2:-1],
        repr(secret.encode())[2:-1],
    }


def assert_absent(secret: str, **outputs: str) -> None:
    for name, text in outputs.items():
        for form in forms(secret):
            assert form not in text, f"{name} shows {form!r}"


@pytest.fixture
def keep_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    imap_level = logging.getLogger("aioimaplib").level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("aioimaplib").setLevel(imap_level)


# -- aioimaplib at log_level = "debug" -------------------------------------------------------


async def _append_through_fake_imap(password: str, body: bytes) -> list[bytes]:
    fake = FakeImap()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    async with server:
        store = ImapStore("127.0.0.1", fake.port, TlsMode.NONE, None, "user", password, "DL")
        info = DeadLetterInfo("info", "u1", "data", "554 no", datetime(2026, 1, 1, tzinfo=UTC))
        await store.put(body, info)
        await asyncio.wait_for(fake.closed.wait(), 5)
    return fake.sent("LOGIN")


@pytest.mark.usefixtures("keep_logging")
@settings(PROFILE, max_examples=min(PROFILE.max_examples, 30))
@given(password=_secret("Pw7"))
def test_imap_login_and_dead_letters_stay_out_of_the_debug_log(password: str) -> None:
    err = io.StringIO()
    body = b"Subject: private\r\n\r\nBODY-OF-A-DEAD-LETTER\r\n"
    with contextlib.redirect_stderr(err):
        setup_logging("debug")
        logging.getLogger("connector").debug("the log is at debug")
        logins = asyncio.run(_append_through_fake_imap(password, body))
    log = err.getvalue()
    assert "the log is at debug" in log
    assert logins
    assert logins[0].endswith(quote_astring(password).encode() + b"\r\n")
    assert_absent(password, log=log)
    assert "BODY-OF-A-DEAD-LETTER" not in log
    assert "aioimaplib" not in log  # nothing of its DEBUG and INFO lines


@pytest.mark.integration
def test_a_debug_run_with_the_imap_store_shows_no_password_and_no_dead_letter(
    setup_factory: Callable[..., Setup],
) -> None:
    probe = setup_factory()
    s = setup_factory(
        dead_letter=f"""
[dead_letter]
store = "imap"
host = "127.0.0.1"
port = {probe.dovecot.ports["imap"]}
tls = "none"
username = "{QUOTED_USER}"
password = {json.dumps(QUOTED_PASSWORD)}
"""
    )
    spam = message(2, sender="spam@bad.example", body=b"SECRET-BODY-7f3\r\n")
    s.dovecot.deliver_many(s.user, [message(1), spam])
    s.sink.handler.rule = deny_spammer
    runs = [_cli(s.config, *args) for args in (["once"], ["dead-letters", "list"], ["status"])]
    assert [r.returncode for r in runs] == [0, 0, 0], runs[0].stderr
    assert len(s.dovecot.maildir_files(QUOTED_USER, "POP3 Connector.Dead Letters")) == 1
    output = "".join(r.stdout + r.stderr for r in runs)
    assert "C: MAIL FROM:<spam@bad.example>" in output  # the transcript was on
    assert_absent(QUOTED_PASSWORD, output=output)
    for run in "Fq8zR2kLw", "Hn4Tq7Xb", "Pz7Jm9Wc":  # no piece of it either
        assert run not in output
    assert "SECRET-BODY-7f3" not in output


# -- repr of runtime objects, and check --------------------------------------------------------


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string of BMP text is a TOML basic string


@settings(PROFILE, max_examples=min(PROFILE.max_examples, 40))
@given(pop3=_secret("Ac1"), smtp=_secret("Sm2"), imap=_secret("Im3"))
def test_runtime_objects_and_check_output_hide_every_secret(
    pop3: str, smtp: str, imap: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(
            f"""
[service]
state_dir = "{tmp}/state"
[smtp]
host = "exchange.firma.test"
helo_name = "connector.test"
username = "connector"
password = {_toml(smtp)}
[dead_letter]
store = "imap"
host = "imap.firma.test"
username = "archive"
password = {_toml(imap)}
[[accounts]]
name = "info"
host = "pop.example.net"
username = "info@firma.example"
password = {_toml(pop3)}
deliver_to = ["info@firma.test"]
""",
            encoding="utf-8",
        )
        config.chmod(0o600)
        loaded = load_settings(config)
        runtime = build_runtime(loaded)
        outputs = {
            "repr(settings)": repr(loaded),
            "repr(runtime)": repr(runtime),
            "repr(smtp)": repr(runtime.smtp),
            "repr(account)": repr(runtime.accounts[0]),
            "repr(imap spec)": repr(runtime.imap_store),
            "repr(store)": repr(open_store(runtime)),
            "check": render_settings(loaded),
        }
    assert runtime.smtp.password == smtp  # the secrets are there, only not shown
    for secret in (pop3, smtp, imap):
        assert_absent(secret, **outputs)


# -- the oauth2_token_command's environment -----------------------------------------------------

_DUMP_ENV = (
    "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w')); print('tok')"
)


@settings(
    PROFILE,
    max_examples=min(PROFILE.max_examples, 8),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(other=_secret("Ot4"), smtp=_secret("Sm5"), imap=_secret("Im6"))
def test_the_token_command_inherits_no_other_secret(other: str, smtp: str, imap: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "env.json"
        command = shlex.join([sys.executable, "-c", _DUMP_ENV, str(dump)])
        config = Path(tmp) / "config.toml"
        config.write_text(
            f"""
[service]
state_dir = "{tmp}/state"
[smtp]
host = "exchange.firma.test"
helo_name = "connector.test"
username = "connector"
[dead_letter]
store = "imap"
host = "imap.firma.test"
username = "archive"
password_env = "ARCHIVE_PASSWORD"
[[accounts]]
name = "m365"
host = "outlook.office365.com"
username = "info@firma.example"
auth = "xoauth2"
oauth2_token_command = {_toml(command)}
deliver_to = ["info@firma.test"]
[[accounts]]
name = "other"
host = "pop.example.net"
username = "other@firma.example"
password_env = "Other_Account_Password"
deliver_to = ["other@firma.test"]
""",
            encoding="utf-8",
        )
        secrets = {
            "Other_Account_Password": other,
            "POP3_CONNECTOR_SMTP__PASSWORD": smtp,
            "ARCHIVE_PASSWORD": imap,
        }
        with mock.patch.dict(os.environ, {**secrets, "HELPER_SETTING": "kept"}):
            runtime = build_runtime(load_settings(config))
            source = runtime.accounts[0].password
            assert isinstance(source, OAuth2TokenSource)
            assert asyncio.run(source()) == "tok"
        child = json.loads(dump.read_text(encoding="utf-8"))
    assert runtime.smtp.password == smtp
    assert child["HELPER_SETTING"] == "kept"  # the rest of the environment is the helper's
    assert child["PATH"] == os.environ["PATH"]
    for name, secret in secrets.items():
        assert name not in child
        assert_absent(secret, env=json.dumps(child), repr=repr(source))
