"""connector/cli.py: arguments, usage errors and what the commands print on the terminal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector.cli import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def config(tmp_path: Path, extra: str = "", accounts: str = "") -> Path:
    accounts = accounts or (
        '[[accounts]]\nname = "info"\nhost = "127.0.0.1"\nport = 1\ntls = "none"\n'
        'username = "info"\npassword = "pw"\ndeliver_to = ["info@firma.local"]\n'
    )
    path = tmp_path / "config.toml"
    path.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n[metrics]\nlisten = ""\n'
        f'[smtp]\nhost = "127.0.0.1"\ntls = "none"\nhelo_name = "c.test"\n{extra}{accounts}'
    )
    path.chmod(0o600)
    return path


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_requeue_to_must_be_an_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: list[str]
) -> None:
    """``--to bad`` is a usage error naming --to, before anything is read or sent (it ended in
    a 553 and advice blaming [smtp])."""
    argv = ["--config", str(config(tmp_path)), "dead-letters", "requeue", "--all", *dry_run]
    err = usage_error([*argv, "--to", "ok@firma.local", "--to", "b\x1bad"], capsys)
    assert 'argument --to: "b\\x1bad" is not a mail address' in err
    assert "\x1b" not in err


def test_a_bad_environment_variable_is_not_blamed_on_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config(tmp_path)
    monkeypatch.setenv("POP3_CONNECTOR_SMTP__PORTT", "1")
    assert main(["--config", str(path), "check"]) == 78
    err = capsys.readouterr().err
    assert err.startswith(
        "pop3-connector: invalid configuration in the environment (POP3_CONNECTOR_* variables):\n"
        "  POP3_CONNECTOR_SMTP__PORTT (environment variable, smtp.portt): unknown key\n"
    )
    assert str(path) not in err


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--shard", "5/2", "status"], "--shard 5/2: shard 5 is not below 2"),
        (["once", "--account", "nope"], "--account nope: no enabled account of that name"),
        (["once", "--account", "no\x1b[31mpe"], "--account no\\x1b[31mpe: no enabled account"),
    ],
)
def test_a_bad_option_value_is_reported_as_such_not_as_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], problem: str
) -> None:
    assert main(["--config", str(config(tmp_path)), *argv]) == 78
    err = capsys.readouterr().err
    assert err.startswith(f"pop3-connector: {problem}")
    assert "invalid configuration" not in err
    assert "\x1b" not in err


def test_requeue_without_a_selection_shows_requeues_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(config(tmp_path)), "dead-letters", "requeue", "--dry-run"]
    err = usage_error(argv, capsys)
    assert err.startswith("usage: pop3-connector dead-letters requeue ")
    assert "give an ID, or select with --account/--stage/--since/--all" in err


@pytest.mark.parametrize("command", ["check", "status", "run"])
def test_shard_help_describes_the_accounts_not_polling(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--shard K/N the accounts of shard K of N" in help_text
    assert "poll only" not in help_text
