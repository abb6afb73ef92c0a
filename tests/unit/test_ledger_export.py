"""``ledger export`` / ``ledger import``: an account's rows moved to another ledger
(docs/design.md §14.3)."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from connector.ledger import (
    MIGRATIONS,
    CycleRecord,
    Failures,
    Identity,
    Ledger,
    RecipientsDone,
)
from connector.ledger_export import EXPORT_FORMAT, LedgerExport, parse_export

NOW = 1_800_000_000.0


def table(path: Path, name: str, account: str) -> list[tuple[Any, ...]]:
    key = "name" if name == "accounts" else "account"
    with sqlite3.connect(path) as db:
        return db.execute(
            f"SELECT * FROM {name} WHERE {key} = ? ORDER BY 2, 3",  # noqa: S608
            (account,),
        ).fetchall()


def everything(path: Path, account: str) -> dict[str, list[tuple[Any, ...]]]:
    return {t: table(path, t, account) for t in ("messages", "recipients_done", "accounts")}


async def fill(ledger: Ledger, account: str) -> None:
    """Rows of every kind an account can have."""
    identity = Identity(1234, "ab" * 32)
    await ledger.record_delivered(account, "u1", 1000, "250 2.0.0 OK", NOW, identity=identity)
    await ledger.record_dead_lettered(account, "u2", 2000, "data: 554 5.1.0 no", NOW, "dl-1")
    await ledger.record_deferred(
        account,
        "u3",
        3000,
        "451 4.3.0 later",
        NOW,
        done=RecipientsDone(("uidl:u3",), ("a@firma.local",)),
    )
    await ledger.record_failed(account, "u4", 400, "ValueError: boom", NOW)
    await ledger.record_delivered(
        account,
        "u5",
        500,
        "250 OK",
        NOW,
        done=RecipientsDone(("mid:<x@y>:abc",), ("b@firma.local",)),
    )
    await ledger.record_cycle(
        account,
        CycleRecord(NOW, NOW + 2.5, "failed", "535 no", 7, 7000, NOW + 900, Failures(3, 1, True)),
    )
    await ledger.set_breaker(account, "550 5.7.1 every sender refused")


async def test_rows_move_exactly_and_alone(tmp_path: Path) -> None:
    old, new = tmp_path / "old.sqlite3", tmp_path / "new.sqlite3"
    source = await Ledger.open(old)
    try:
        await fill(source, "info")
        await fill(source, "stays")
        export = await source.export_accounts(["info"], exported_at="2027-01-15T08:00:00Z")
    finally:
        await source.close()
    text = export.dumps()
    assert text.isascii()
    doc = json.loads(text)
    assert (doc["format"], doc["version"], doc["schema"]) == (EXPORT_FORMAT, 1, len(MIGRATIONS))
    assert [m["uidl"] for m in doc["accounts"][0]["messages"]] == ["u1", "u2", "u3", "u4", "u5"]
    assert "account" not in doc["accounts"][0]["messages"][0]  # the key is the account's own

    target = await Ledger.open(new)
    try:
        await fill(target, "other")  # the new owner's own accounts stay as they are
        before = everything(new, "other")
        result = await target.import_accounts(parse_export(text.encode()), replace=False)
    finally:
        await target.close()
    assert result.imported == {"info": 5 + 2 + 1}
    assert result.conflicts == {}
    assert everything(new, "info") == everything(old, "info")
    assert everything(new, "other") == before
    assert everything(new, "stays") == {"messages": [], "recipients_done": [], "accounts": []}


async def test_an_account_with_rows_is_refused_unless_replace(tmp_path: Path) -> None:
    old, new = tmp_path / "old.sqlite3", tmp_path / "new.sqlite3"
    source = await Ledger.open(old)
    try:
        await fill(source, "info")
        export = await source.export_accounts(["info"], exported_at="")
    finally:
        await source.close()
    target = await Ledger.open(new)
    try:
        # Left from an earlier resharding: another message, and a cycle record.
        await target.record_delivered("info", "stale", 1, "250 OK", NOW - 86400)
        stale = everything(new, "info")
        refused = await target.import_accounts(export, replace=False)
        assert (refused.imported, refused.conflicts) == ({}, {"info": 1})
        assert everything(new, "info") == stale  # nothing written
        replaced = await target.import_accounts(export, replace=True)
        assert (replaced.imported, replaced.conflicts) == ({"info": 8}, {"info": 1})
    finally:
        await target.close()
    assert everything(new, "info") == everything(old, "info")  # the stale row is gone


async def test_an_account_without_rows_exports_empty(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "l.sqlite3")
    try:
        export = await ledger.export_accounts(["never"], exported_at="")
        (account,) = export.accounts
        assert (account.count, account.account) == (0, None)
        result = await ledger.import_accounts(export, replace=False)
        assert result.imported == {"never": 0}
    finally:
        await ledger.close()


async def test_export_reads_beside_a_writer(tmp_path: Path) -> None:
    """WAL: the running service's connection and the export's, on one file."""
    path = tmp_path / "l.sqlite3"
    service = await Ledger.open(path)
    try:
        await fill(service, "info")
        beside = await Ledger.open(path)
        try:
            export = await beside.export_accounts(["info"], exported_at="")
        finally:
            await beside.close()
        await service.record_delivered("info", "u9", 9, "250 OK", NOW)  # still writes
    finally:
        await service.close()
    assert len(export.accounts[0].messages) == 5


def _doc(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "schema": len(MIGRATIONS),
        "exported_at": "",
        "accounts": [{"name": "info", "account": None, "messages": [], "recipients_done": []}],
    }
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x00\x01", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (_doc(format="something else"), '"format" is not'),
        (_doc(version=2), "version 2: this program reads version 1"),
        (_doc(schema="7"), '"schema" is not a schema version'),
        (_doc(accounts={}), '"accounts" is not a list'),
        (_doc(accounts=[{"name": "in fo", "messages": [], "recipients_done": []}]), "not an"),
        (_doc(accounts=[{"name": "x", "messages": {}, "recipients_done": []}]), "a list"),
        (
            _doc(accounts=[{"name": "x", "messages": [{"uidl": [1]}], "recipients_done": []}]),
            "accounts[0].messages[0].uidl: expected a string, a number or null",
        ),
        (
            _doc(accounts=[{"name": "x", "messages": [{"a b": 1}], "recipients_done": []}]),
            "a column name is not a name",
        ),
        (
            _doc(
                accounts=[
                    {"name": "x", "messages": [], "recipients_done": []},
                    {"name": "x", "messages": [], "recipients_done": []},
                ]
            ),
            "appears twice",
        ),
    ],
)
def test_files_that_are_not_exports_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_export(data)


def test_a_utf16_file_from_windows_powershell_is_read() -> None:
    data = _doc().decode()
    assert parse_export(("\ufeff" + data).encode("utf-16-le")).accounts[0].name == "info"


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (_doc(schema=len(MIGRATIONS) + 1), "newer than this program's"),
        (
            _doc(
                accounts=[
                    {
                        "name": "info",
                        "account": None,
                        "messages": [{"uidl": "u", "colour": "red"}],
                        "recipients_done": [],
                    }
                ]
            ),
            "account info: messages has no column 'colour' here",
        ),
        (
            _doc(
                accounts=[
                    {
                        "name": "info",
                        "account": {"name": "other"},
                        "messages": [],
                        "recipients_done": [],
                    }
                ]
            ),
            "account info: accounts has no column 'name' here",
        ),
    ],
)
async def test_what_this_ledger_cannot_take_is_refused_whole(
    tmp_path: Path, doc: bytes, problem: str
) -> None:
    ledger = await Ledger.open(tmp_path / "l.sqlite3")
    try:
        with pytest.raises(ValueError, match=re.escape(problem)):
            await ledger.import_accounts(parse_export(doc), replace=False)
    finally:
        await ledger.close()
    assert everything(tmp_path / "l.sqlite3", "info")["accounts"] == []


async def test_a_bad_value_rolls_the_whole_import_back(tmp_path: Path) -> None:
    from connector.errors import LedgerError

    accounts = [
        {"name": "good", "account": None, "messages": [], "recipients_done": []},
        {
            "name": "bad",
            "account": None,
            "messages": [
                {
                    "uidl": "u",
                    "state": "stolen",
                    "size": 1,
                    "attempts": 1,
                    "first_seen": NOW,
                    "last_attempt": NOW,
                    "last_response": "250",
                }
            ],
            "recipients_done": [],
        },
    ]
    ledger = await Ledger.open(tmp_path / "l.sqlite3")
    try:
        await ledger.record_delivered("good", "keep", 1, "250", NOW)
        export = LedgerExport(
            len(MIGRATIONS),
            "",
            parse_export(_doc(accounts=accounts)).accounts,
        )
        with pytest.raises(LedgerError, match="CHECK constraint"):
            await ledger.import_accounts(export, replace=True)
    finally:
        await ledger.close()
    assert [r[1] for r in table(tmp_path / "l.sqlite3", "messages", "good")] == ["keep"]


def test_the_written_file_is_what_is_read() -> None:
    export = parse_export(_doc())
    again = parse_export(io.BytesIO(export.dumps().encode()).read())
    assert again == export
