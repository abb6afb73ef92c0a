"""Service.apply_runtime (SIGHUP): accounts added, removed after their cycle, changed in place."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Any, Final, Literal, Union, get_args, get_origin

import pytest
import trustme
from pydantic import BaseModel

from connector.config import AccountConfig, Settings, SmtpConfig, load_settings
from connector.ledger import Ledger
from connector.metrics import Metrics
from connector.runtime import Runtime, build_runtime
from connector.service import Service
from connector.shard import Shard


def runtime(tmp_path: Path, accounts: dict[str, str], parallel: int = 8) -> Runtime:
    blocks = "".join(
        f"""
[[accounts]]
name = "{name}"
host = "{host}"
tls = "none"
username = "u"
password = "p"
deliver_to = ["{name}@firma.test"]
"""
        for name, host in accounts.items()
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path}"\nmax_parallel_accounts = {parallel}\n'
        f'[smtp]\nhost = "127.0.0.1"\ntls = "none"\nhelo_name = "c.test"\n{blocks}'
    )
    config.chmod(0o600)
    return build_runtime(load_settings(config))


async def test_apply_runtime_adds_removes_and_changes(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        metrics = Metrics()
        service = Service(
            runtime(tmp_path, {"info": "a.test", "old": "b.test"}), ledger, metrics=metrics
        )
        info, old = service.accounts["info"], service.accounts["old"]
        info.failing = True
        service.apply_runtime(runtime(tmp_path, {"info": "c.test", "new": "d.test"}, 2))

        assert list(service.accounts) == ["info", "new"]
        assert old.removed  # its loop ends after the cycle in flight
        assert old.poll_now.is_set()  # woken, so it does not sleep out its interval first
        assert service.accounts["info"] is info  # same state: failures, lock, last result kept
        assert info.spec.endpoint.host == "c.test"
        assert info.poll_now.is_set()  # failing and changed: the change may be the fix
        assert not service.accounts["new"].removed
        assert service.runtime.max_parallel == 2
        get = metrics.registry.get_sample_value
        assert get("pop3_connector_dead_letters", {"account": "new"}) == 0
        assert get("pop3_connector_dead_letters", {"account": "old"}) is None

        # Re-added while its old cycle might still run: the same lock, never two cycles at once.
        service.apply_runtime(runtime(tmp_path, {"info": "c.test", "old": "b.test"}))
        assert service.accounts["old"] is not old
        assert service.accounts["old"].lock is old.lock
        unchanged = service.accounts["info"]
        unchanged.poll_now.clear()
        service.apply_runtime(runtime(tmp_path, {"info": "c.test", "old": "b.test"}))
        assert service.accounts["info"] is unchanged
        assert not unchanged.poll_now.is_set()
    finally:
        await ledger.close()


# --------------------------------------------------------------------------------------------
# Every account key, changed alone, is applied by a reload
# --------------------------------------------------------------------------------------------

# An account that gives every key of AccountConfig (and of its nested tables) a value, so that
# each can be changed from it.  Durations and sizes as numbers, paths as Path (see _changed).
BASE: Final[dict[str, Any]] = {
    "name": "info",
    "protocol": "pop3",
    "host": "pop.firma.test",
    "port": 1110,
    "tls": "starttls",
    "verify_certificate": True,
    "username": "info@firma.test",
    "password": "secret",
    "auth": "auto",
    "deliver_to": ["info@firma.local"],
    "smtp": "kunde",  # _runtime names "kunde" and "xkunde" as targets
    "poll_interval": 300,
    "enabled": True,
    "max_deferral": 86400,
    "max_message_size": 1000000,
    "oversize": "dead-letter",
    "leave_on_server": False,
    "shared": {
        "domains": ["firma.test"],
        "envelope_headers": ["X-Original-To"],
        "header_recipients": True,
        "rewrite_domain": "firma.local",
        "ignore_addresses": ["catchall@firma.test"],
        "rules": [{"match": "boss@firma.test", "deliver_to": ["chef@firma.local"]}],
        "suppress_duplicates": True,
        "duplicate_window": 3600,
    },
}
# Keys that only have a value beside others (exclusive password sources, XOAUTH2's token
# sources, delete_after with leave_on_server): the account each of them is changed from.
VARIANTS: Final[dict[str, dict[str, Any]]] = {
    "password_file": {"password": None, "password_file": "token-or-password"},
    "password_env": {"password": None, "password_env": "RELOAD_TEST_PASSWORD"},
    "oauth2_token_file": {"password": None, "auth": "xoauth2", "oauth2_token_file": "token"},
    "oauth2_token_command": {
        "password": None,
        "auth": "xoauth2",
        "oauth2_token_command": "token-helper --account info",
    },
    "delete_after": {"leave_on_server": True, "delete_after": 86400},
    # An IMAP account's own keys (docs/design.md §15).
    "folder": {"protocol": "imap", "folder": "INBOX"},
    "push": {"protocol": "imap", "push": True},
    "idle_renewal": {"protocol": "imap", "idle_renewal": 600},
}
# What a reload does with a changed key other than changing the account's spec.
RENAMES: Final = "name"  # the account under its old name is removed, the new one added
REMOVES: Final = "enabled"  # enabled = false: the account is removed
INTERVAL: Final = "poll_interval"  # the scheduler's interval, beside the spec

KeyPath = tuple[str | int, ...]


def _options(annotation: Any) -> tuple[Any, ...]:
    """The types of an ``X | None`` annotation without None (or the annotation alone)."""
    if get_origin(annotation) in {Union, UnionType}:
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The pydantic model an annotation holds, and whether as a list of them."""
    for option in _options(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option, False
        if get_origin(option) is list:
            (item,) = get_args(option)
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item, True
    return None


def account_keys(model: type[BaseModel] = AccountConfig, at: KeyPath = ()) -> Iterator[KeyPath]:
    """Every key of an account as a path (``("shared", "rules", 0, "match")``), read from the
    config models, so that a key added later is covered without touching this test."""
    for name, info in model.model_fields.items():
        nested = _model(info.annotation)
        if nested is None:
            yield (*at, name)
            continue
        sub, is_list = nested
        if not is_list and type(None) in get_args(info.annotation):
            yield (*at, name)  # an optional table: removing it is a change too
        yield from account_keys(sub, (*at, name, 0) if is_list else (*at, name))


def _field(path: KeyPath) -> Any:
    """The annotation of the key at ``path``."""
    model: type[BaseModel] = AccountConfig
    annotation: Any = None
    for part in path:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        nested = _model(annotation)
        if nested is not None:
            model = nested[0]
    return annotation


def _changed(value: Any, annotation: Any, path: KeyPath) -> Any:
    """A value of the key's type that differs from ``value`` and still validates.

    The table of changes per type: a Literal takes another of its values; a bool flips; a
    number grows; a string gets an "x" in front (still a host, an address, a domain, a header
    name, a pattern or an account name); a path names its twin ("x" + name, different
    contents); a list changes each item; an optional table is removed.
    """
    for option in _options(annotation):
        if get_origin(option) is Literal:
            return next(v for v in get_args(option) if v != value and v != "xoauth2")
    match value:
        case bool():
            return not value
        case int() | float():
            return value + 60
        case str():
            return "x" + value
        case Path():
            return value.with_name("x" + value.name)
        case list():
            return [_changed(v, get_args(_options(annotation)[0])[0], path) for v in value]
        case dict():
            return None
        case None:
            raise AssertionError(
                f"{_dotted(path)} has no value to change: give it one in BASE or VARIANTS"
            )
    raise AssertionError(f"{_dotted(path)}: add a change for {type(value).__name__} values")


def _dotted(path: KeyPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _get(data: Any, path: KeyPath) -> Any:
    for part in path:
        data = data[part] if isinstance(part, int) else data.get(part)
    return data


def _set(data: dict[str, Any], path: KeyPath, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    target: Any = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


def _account(tmp_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """BASE with ``overrides`` (None drops a key); file names become files in ``tmp_path``."""
    account = {k: v for k, v in {**copy.deepcopy(BASE), **overrides}.items() if v is not None}
    for key in ("password_file", "oauth2_token_file"):
        if key in account:
            account[key] = tmp_path / account[key]
    account["ca_file"] = tmp_path / "ca.pem"
    return account


def _runtime(
    tmp_path: Path, account: dict[str, Any], target: dict[str, Any] | None = None
) -> Runtime:
    smtp = {"host": "127.0.0.1", "tls": "none", "helo_name": "c.test"}
    return build_runtime(
        Settings(
            service={"state_dir": tmp_path},
            smtp=smtp,
            smtp_targets={"kunde": target or smtp, "xkunde": {**smtp, "host": "127.0.0.2"}},
            accounts=[account],
        )
    )


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each file a key may name, and its "x" twin with other contents."""
    for name in ("ca.pem", "xca.pem"):
        trustme.CA().cert_pem.write_to_path(str(tmp_path / name))
    for name in ("token-or-password", "token"):
        (tmp_path / name).write_text("first\n")
        (tmp_path / ("x" + name)).write_text("second\n")
    monkeypatch.setenv("RELOAD_TEST_PASSWORD", "first")
    monkeypatch.setenv("xRELOAD_TEST_PASSWORD", "second")
    return tmp_path


def test_every_account_key_is_enumerated() -> None:
    """The keys the reload test changes include the ones a hand-kept list once missed."""
    keys = {_dotted(k) for k in account_keys()}
    assert {"oversize", "shared", "shared.rules[0].match", "ca_file", "host"} <= keys
    assert len(keys) >= 30


@pytest.mark.parametrize("key", list(account_keys()), ids=_dotted)
async def test_reload_applies_each_account_key(files: Path, key: KeyPath) -> None:
    """SIGHUP with one account key changed: the account's spec (or its interval, or the
    account itself) becomes the new config's, from its next cycle on."""
    top = str(key[0])
    before = _account(files, VARIANTS.get(top, {}))
    after = _set(before, key, _changed(_get(before, key), _field(key), key))
    old_runtime, new_runtime = _runtime(files, before), _runtime(files, after)
    ledger = await Ledger.open(files / "ledger.sqlite3")
    try:
        service = Service(old_runtime, ledger)
        state = service.accounts["info"]
        old_spec = state.spec

        # The same config again, rebuilt (new SSL contexts and all): nothing changed.
        service.apply_runtime(_runtime(files, before))
        assert service.accounts["info"] is state
        assert state.spec is old_spec

        service.apply_runtime(new_runtime)
        if top == RENAMES:
            assert list(service.accounts) == ["xinfo"]
            assert service.accounts["xinfo"].spec == new_runtime.accounts[0]
        elif top == REMOVES:
            assert "info" not in service.accounts
            assert state.removed
        elif top == INTERVAL:
            assert service.accounts["info"] is state
            assert state.interval == new_runtime.intervals["info"] != old_runtime.intervals["info"]
        else:
            (new_spec,) = new_runtime.accounts
            assert new_spec != old_spec, f"{_dotted(key)} does not reach the account's spec"
            assert service.accounts["info"] is state
            assert state.spec is new_spec, f"a reload ignored a change of {_dotted(key)}"
    finally:
        await ledger.close()


# --------------------------------------------------------------------------------------------
# SIGHUP reads the file in a thread
# --------------------------------------------------------------------------------------------


async def test_sighup_reads_and_builds_the_config_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading thousands of accounts takes seconds (bench/README.md, "fleet"): meanwhile the
    loop goes on (the cycles, the HTTP endpoint, the watchdog pings).  Here the reading blocks
    until the test, on the loop, lets it go: a reload on the loop would never let it."""
    import asyncio
    import os
    import signal
    import threading

    from connector import cli

    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n[metrics]\nlisten = ""\n'
        '[smtp]\nhost = "127.0.0.1"\ntls = "none"\nhelo_name = "c.test"\n'
        '[[accounts]]\nname = "off"\nhost = "127.0.0.1"\ntls = "none"\nusername = "u"\n'
        'password = "p"\ndeliver_to = ["a@b.test"]\nenabled = false\n'
    )
    config.chmod(0o600)
    settings = load_settings(config)
    entered, release = threading.Event(), threading.Event()
    load = cli._load

    def slow_load(path: Path, shard: Shard) -> tuple[Settings, Runtime]:
        entered.set()
        if not release.wait(10):
            raise RuntimeError("the loop never went on")
        return load(path, shard)

    monkeypatch.setattr(cli, "_load", slow_load)
    monkeypatch.setattr(cli, "setup_logging", lambda *args: None)  # keep caplog's handler
    caplog.set_level("INFO", logger="connector")

    async def until(what: str) -> None:
        for _ in range(1000):
            if what in caplog.text:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {what!r} in the log")

    running = asyncio.create_task(
        cli._run(build_runtime(settings), cli.RunOptions.of(settings, config), config)
    )
    await until(" running: ")
    os.kill(os.getpid(), signal.SIGHUP)
    assert await asyncio.to_thread(entered.wait, 10)
    for _ in range(5):
        await asyncio.sleep(0.01)  # the loop runs while the file is being read
    release.set()
    await until("configuration reloaded")
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(running, 10) == 0


# Every key of an SMTP target ([smtp_targets.NAME], the keys of [smtp]): a change reaches the
# accounts that deliver there, as a change of their own.
TARGET: Final[dict[str, Any]] = {
    "host": "exchange.kunde.test",
    "port": 2525,
    "tls": "starttls",
    "verify_certificate": True,
    "ca_file": Path("ca.pem"),
    "username": "connector",
    "password": "smtp-secret",
    "helo_name": "connector.kunde.test",
    "envelope_sender": "return-path",
    "dsn": True,
    "timeout": 60,
    "data_termination_timeout": 600,
}
TARGET_VARIANTS: Final[dict[str, dict[str, Any]]] = {
    "password_file": {"password": None, "password_file": "token-or-password"},
    "password_env": {"password": None, "password_env": "RELOAD_TEST_PASSWORD"},
}


@pytest.mark.parametrize("key", list(SmtpConfig.model_fields))
async def test_reload_applies_each_smtp_target_key(files: Path, key: str) -> None:
    """SIGHUP with one key of an account's SMTP target changed: the account's spec changes,
    and a failing account polls at once (the change may be the fix: a new SMTP password)."""
    target = {k: v for k, v in {**TARGET, **TARGET_VARIANTS.get(key, {})}.items() if v is not None}
    for name in ("ca_file", "password_file"):
        if name in target:
            target[name] = files / target[name]
    annotation = SmtpConfig.model_fields[key].annotation
    value = "null" if key == "envelope_sender" else _changed(target[key], annotation, (key,))
    changed = {**target, key: value}
    account = _account(files, {})
    old_runtime = _runtime(files, account, target)
    ledger = await Ledger.open(files / "ledger.sqlite3")
    try:
        service = Service(old_runtime, ledger)
        state = service.accounts["info"]
        old_spec = state.spec
        state.failing = True
        service.apply_runtime(_runtime(files, account, target))  # rebuilt, not changed
        assert state.spec is old_spec
        assert not state.poll_now.is_set()
        new_runtime = _runtime(files, account, changed)
        service.apply_runtime(new_runtime)
        assert service.accounts["info"] is state
        assert state.spec is new_runtime.accounts[0], f"a reload ignored smtp_targets.*.{key}"
        assert state.poll_now.is_set()
    finally:
        await ledger.close()
