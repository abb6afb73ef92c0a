"""``--shard`` and ``ledger export|import`` on the command line (docs/design.md §14.2, §14.3)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from connector.cli import EX_CONFIG, EX_FAILED, EX_OK, EX_TEMPFAIL, main
from connector.ledger import Ledger
from connector.service import StateLock
from connector.shard import shard_of

NAMES = [f"kunde{i:02d}" for i in range(12)]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_") or name == "POD_NAME":
            monkeypatch.delenv(name)


def config(tmp_path: Path, state: str = "state") -> Path:
    blocks = "".join(
        f"""
[[accounts]]
name = "{name}"
host = "127.0.0.1"
port = 1
tls = "none"
username = "{name}"
password = "pw"
deliver_to = ["{name}@firma.local"]
"""
        for name in NAMES
    )
    path = tmp_path / f"config-{state}.toml"
    path.write_text(
        f'[service]\nstate_dir = "{tmp_path / state}"\n[metrics]\nlisten = ""\n'
        f'[smtp]\nhost = "127.0.0.1"\ntls = "none"\nhelo_name = "c.test"\n{blocks}'
    )
    path.chmod(0o600)
    return path


def owned(k: int, n: int) -> list[str]:
    return [name for name in NAMES if shard_of(name, n) == k]


def test_check_and_status_show_the_shard_and_its_accounts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config(tmp_path)
    mine = owned(1, 3)
    assert 0 < len(mine) < len(NAMES)
    assert main(["--config", str(path), "check", "--shard", "1/3"]) == EX_OK
    out = capsys.readouterr().out
    assert f"# shard 1/3: {len(mine)} of {len(NAMES)} accounts:" in out
    assert [line[4:] for line in out.splitlines() if line.startswith("#   ")] == mine

    monkeypatch.setenv("POD_NAME", "pop3-connector-1")
    assert main(["--config", str(path), "--shard", "auto/3", "status", "--json"]) == EX_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["shard"] == {"index": 1, "count": 3}
    assert [a["name"] for a in doc["accounts"]] == mine
    assert main(["--config", str(path), "status", "--shard", "auto/3"]) == EX_OK
    table = capsys.readouterr().out
    assert table.startswith(f"shard 1/3: {len(mine)} of {len(NAMES)} accounts\n")
    assert {line.split()[0] for line in table.splitlines()[3:]} == set(mine)


@pytest.mark.parametrize(
    ("argv", "env", "problem"),
    [
        (["--shard", "3/3", "status"], {}, "--shard 3/3: shard 3 is not below 3"),
        (
            ["run", "--shard", "auto/3"],
            {"POD_NAME": "pop3-connector-3"},
            'pod name "pop3-connector-3" gives shard 3, not below 3',
        ),
        (["once", "--shard", "auto/3"], {"POD_NAME": "maint"}, 'does not end in "-k"'),
    ],
)
def test_a_shard_this_process_cannot_be_is_a_config_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    problem: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["--config", str(config(tmp_path)), *argv]) == EX_CONFIG
    assert problem in capsys.readouterr().err


def test_once_names_another_shards_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = owned(0, 3)[0]
    assert main(["--config", str(config(tmp_path)), "once", "--shard", "1/3", "--account", other])
    assert f"--account {other}: not this shard's (1/3)" in capsys.readouterr().err


async def _seed(state: Path, names: list[str]) -> None:
    ledger = await Ledger.open(state / "ledger.sqlite3")
    try:
        for name in names:
            await ledger.record_delivered(name, "u1", 10, "250 OK", 1.0)
    finally:
        await ledger.close()


def _rows(state: Path, name: str) -> list[str]:
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        return [u for (u,) in db.execute("SELECT uidl FROM messages WHERE account = ?", (name,))]


def test_export_then_import_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    old, new = config(tmp_path, "old"), config(tmp_path, "new")
    mover = owned(2, 3)[0]
    asyncio.run(_seed(tmp_path / "old", [mover]))
    capsys.readouterr()

    # From the wrong replica: refused.
    assert main(["--config", str(old), "ledger", "export", "--shard", "0/3", "--account", mover])
    assert f"account {mover} is not shard 0/3's (it is shard 2/3's)" in capsys.readouterr().err
    # A name nobody knows: refused, nothing written.
    assert main(["--config", str(old), "ledger", "export", "--account", "nobody"]) == EX_FAILED
    captured = capsys.readouterr()
    assert (captured.out, "no account nobody in the config or the ledger" in captured.err) == (
        "",
        True,
    )

    argv = ["--config", str(old), "ledger", "export", "--shard", "2/3", "--account", mover]
    assert main(argv) == EX_OK
    captured = capsys.readouterr()
    assert f"account {mover}: 1 message row(s)" in captured.err
    file = tmp_path / f"{mover}.ledger"
    file.write_text(captured.out)

    # Into the new owner, whose service runs: refused (exit 75), nothing written.
    (tmp_path / "new").mkdir()
    with StateLock(tmp_path / "new"):
        assert main(["--config", str(new), "ledger", "import", str(file)]) == EX_TEMPFAIL
    assert "ledger import: another pop3-connector" in capsys.readouterr().err
    assert not (tmp_path / "new" / "ledger.sqlite3").exists()

    j = shard_of(mover, 4)
    wrong = (j + 1) % 4
    assert main(["--config", str(new), "ledger", "import", "--shard", f"{wrong}/4", str(file)])
    assert f"is not shard {wrong}/4's" in capsys.readouterr().err
    argv = ["--config", str(new), "ledger", "import", "--shard", f"{j}/4", str(file)]
    assert main(argv) == EX_OK
    assert f"account {mover}: 1 row(s) imported" in capsys.readouterr().out
    assert _rows(tmp_path / "new", mover) == ["u1"]

    # Again: the account has rows now.  Refused; --replace replaces them.
    assert main(argv) == EX_FAILED
    assert "has 1 row(s)" in capsys.readouterr().err
    assert main([*argv, "--replace"]) == EX_OK
    assert "(replacing 1)" in capsys.readouterr().out
    assert _rows(tmp_path / "new", mover) == ["u1"]

    file.write_text("{}")
    assert main(["--config", str(new), "ledger", "import", str(file)]) == EX_FAILED
    assert "not a ledger export" in capsys.readouterr().err


def test_status_leaves_out_the_rows_another_shards_accounts_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a resharding the old owner keeps the rows of the accounts that left (inert):
    its status shows its own accounts, not those, and still shows an account the config no
    longer has at all."""
    import asyncio

    path = config(tmp_path)
    left = owned(2, 3)[0]
    asyncio.run(_seed(tmp_path / "state", [left, owned(1, 3)[0], "removed-from-config"]))
    capsys.readouterr()
    assert main(["--config", str(path), "status", "--json", "--shard", "1/3"]) == EX_OK
    names = [a["name"] for a in json.loads(capsys.readouterr().out)["accounts"]]
    assert names == [*owned(1, 3), "removed-from-config"]
    assert main(["--config", str(path), "status", "--json"]) == EX_OK  # unsharded: all
    names = [a["name"] for a in json.loads(capsys.readouterr().out)["accounts"]]
    assert left in names
