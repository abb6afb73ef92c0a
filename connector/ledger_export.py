"""An account's ledger rows as a file: ``ledger export`` and ``ledger import``.

docs/design.md §14.3.  When an account moves to another replica (a resharding,
deploy/kubernetes/README.md) or to another machine, its rows must move with it: the new owner
would otherwise not know what was delivered, and with ``leave_on_server`` it would deliver every
message still upstream again.

The file is JSON, ASCII only (it survives any console encoding), versioned::

    {"format": "pop3-connector ledger export", "version": 1, "schema": 7,
     "exported_at": "2026-11-27T15:49:35Z",
     "accounts": [{"name": "info",
                   "account": {"last_cycle_started": ..., "breaker": ..., "failures": ...},
                   "messages": [{"uidl": ..., "state": "delivered", ...}, ...],
                   "recipients_done": [{"key": ..., "recipient": ..., "at": ...}, ...]}]}

Every column of the three tables that hold an account's rows (``messages``,
``recipients_done``, ``accounts``: docs/design.md §8.2), by name, but the account's own key
column; ``schema`` is the exporting ledger's ``user_version``.  A column a later migration adds
is carried by name; an import into an older program refuses a file from a newer schema, and a
file from an older one gets the column defaults.  The heartbeat is the ledger's, not an
account's, and is not exported.

The functions here run on the ledger's thread (``Ledger.export_accounts`` and
``Ledger.import_accounts`` submit them), inside one transaction each: an export is one
snapshot (WAL lets it read beside a running service), an import writes all or nothing.
:func:`parse_export` checks a file's shape before anything is written; the table constraints
(the states, NOT NULL, the keys) check the values.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "AccountRows",
    "ImportResult",
    "LedgerExport",
    "export_rows",
    "import_rows",
    "parse_export",
]

EXPORT_FORMAT: Final = "pop3-connector ledger export"
EXPORT_VERSION: Final = 1

# table -> the column that names the account (left out of each exported row)
_TABLES: Final = {"messages": "account", "recipients_done": "account", "accounts": "name"}
_ORDER: Final = {"messages": "uidl", "recipients_done": "key, recipient", "accounts": "name"}
# An account's name as the config allows it (config._NAME_RE), checked again here since the
# file may come from anywhere.
_NAME_MAX: Final = 64

Row = dict[str, str | int | float | None]


@dataclass(frozen=True, slots=True)
class AccountRows:
    """One account's rows, as exported."""

    name: str
    account: Row | None  # the accounts row (last cycle, breaker, failures); None: never ran
    messages: tuple[Row, ...]
    recipients_done: tuple[Row, ...]

    @property
    def count(self) -> int:
        return len(self.messages) + len(self.recipients_done) + (self.account is not None)


@dataclass(frozen=True, slots=True)
class LedgerExport:
    """A parsed export file."""

    schema: int
    exported_at: str
    accounts: tuple[AccountRows, ...]

    def document(self) -> dict[str, Any]:
        """The JSON document of the file."""
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "schema": self.schema,
            "exported_at": self.exported_at,
            "accounts": [
                {
                    "name": a.name,
                    "account": a.account,
                    "messages": list(a.messages),
                    "recipients_done": list(a.recipients_done),
                }
                for a in self.accounts
            ],
        }

    def dumps(self) -> str:
        """The file's text: ASCII JSON, one line per row, ending in a line break."""
        return json.dumps(self.document(), indent=1, ensure_ascii=True) + "\n"


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import did: rows written per account, or, when accounts already had rows and
    ``replace`` was not given, those accounts and their row counts (nothing written)."""

    imported: dict[str, int]
    conflicts: dict[str, int]


def _rows(conn: sqlite3.Connection, table: str, name: str) -> list[Row]:
    key = _TABLES[table]
    # Table and column names are ours (_TABLES, _ORDER), never the caller's.
    cur = conn.execute(
        f"SELECT * FROM {table} WHERE {key} = ? ORDER BY {_ORDER[table]}",  # noqa: S608
        (name,),
    )
    columns = [d[0] for d in cur.description]
    return [{c: v for c, v in zip(columns, values, strict=True) if c != key} for values in cur]


def export_rows(
    conn: sqlite3.Connection, names: Sequence[str], *, exported_at: str
) -> LedgerExport:
    """On the ledger thread: the rows of each account of ``names``, in one read transaction
    (a consistent snapshot beside a writer, in WAL mode)."""
    conn.execute("BEGIN")
    try:
        (schema,) = conn.execute("PRAGMA user_version").fetchone()
        accounts = []
        for name in names:
            found = _rows(conn, "accounts", name)
            accounts.append(
                AccountRows(
                    name,
                    found[0] if found else None,
                    tuple(_rows(conn, "messages", name)),
                    tuple(_rows(conn, "recipients_done", name)),
                )
            )
    finally:
        conn.execute("COMMIT")
    return LedgerExport(int(schema), exported_at, tuple(accounts))


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _count(conn: sqlite3.Connection, name: str) -> int:
    return sum(
        conn.execute(
            f"SELECT count(*) FROM {table} WHERE {key} = ?",  # noqa: S608 - our own names
            (name,),
        ).fetchone()[0]
        for table, key in _TABLES.items()
    )


def import_rows(
    conn: sqlite3.Connection, export: LedgerExport, *, replace: bool, schema: int
) -> ImportResult:
    """On the ledger thread, in one write transaction: write every account's rows.

    An account that has rows here already (any: a message, a recipient, a cycle record) is a
    conflict: nothing is written unless ``replace``, which deletes its rows first.  ``schema``
    is this ledger's version: a file from a newer one is refused, as is a column this ledger
    does not have.
    """
    if export.schema > schema:
        raise ValueError(
            f"the file was exported from ledger schema {export.schema}, newer than this "
            f"program's {schema}; import it with the pop3-connector that exported it, or newer"
        )
    known = {table: _columns(conn, table) for table in _TABLES}
    for account in export.accounts:
        for table, rows in (
            ("messages", account.messages),
            ("recipients_done", account.recipients_done),
            ("accounts", [account.account] if account.account is not None else []),
        ):
            for row in rows:
                unknown = sorted((set(row) - known[table]) | (set(row) & {_TABLES[table]}))
                if unknown:
                    raise ValueError(
                        f"account {account.name}: {table} has no column {unknown[0]!r} here"
                    )
    conn.execute("BEGIN IMMEDIATE")
    try:
        conflicts = {a.name: n for a in export.accounts if (n := _count(conn, a.name))}
        if conflicts and not replace:
            conn.execute("ROLLBACK")
            return ImportResult({}, conflicts)
        imported: dict[str, int] = {}
        for account in export.accounts:
            for table, key in _TABLES.items():
                conn.execute(f"DELETE FROM {table} WHERE {key} = ?", (account.name,))  # noqa: S608
            _insert(conn, "messages", account.name, account.messages)
            _insert(conn, "recipients_done", account.name, account.recipients_done)
            if account.account is not None:
                _insert(conn, "accounts", account.name, (account.account,))
            imported[account.name] = account.count
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return ImportResult(imported, conflicts)


def _insert(conn: sqlite3.Connection, table: str, name: str, rows: Sequence[Row]) -> None:
    """Rows whose columns :func:`import_rows` has checked against the table's own."""
    by_columns: dict[tuple[str, ...], list[tuple[object, ...]]] = {}
    for row in rows:
        columns = tuple(sorted(row))
        by_columns.setdefault(columns, []).append((name, *(row[c] for c in columns)))
    for columns, params in by_columns.items():
        names = ", ".join((_TABLES[table], *columns))
        marks = ", ".join("?" * (len(columns) + 1))
        conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", params)  # noqa: S608


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    # Windows PowerShell 5.1's `>` writes UTF-16 with a byte-order mark; everything else, UTF-8
    # (with or without a mark).  The file is ASCII as written.
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


def _row(value: object, where: str) -> Row:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object of columns")
    row: Row = {}
    for column, cell in value.items():
        if not isinstance(column, str) or not column.isidentifier():
            raise ValueError(f"{where}: a column name is not a name")
        if isinstance(cell, bool):
            cell = int(cell)
        if cell is not None and not isinstance(cell, str | int | float):
            raise ValueError(f"{where}.{column}: expected a string, a number or null")
        row[column] = cell
    return row


def _account(value: object, i: int) -> AccountRows:
    where = f"accounts[{i}]"
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object")
    name = value.get("name")
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= _NAME_MAX
        or not all(c.isalnum() or c in "._-@" for c in name)
        or not name.isascii()
    ):
        raise ValueError(f"{where}.name: not an account name")
    lists: dict[str, tuple[Row, ...]] = {}
    for key in ("messages", "recipients_done"):
        rows = value.get(key)
        if not isinstance(rows, list):
            raise ValueError(f"{where}.{key}: expected a list")
        lists[key] = tuple(_row(r, f"{where}.{key}[{n}]") for n, r in enumerate(rows))
    account = value.get("account")
    extra = set(value) - {"name", "account", "messages", "recipients_done"}
    if extra:
        raise ValueError(f"{where}: unknown key {sorted(extra)[0]!r}")
    return AccountRows(
        name,
        None if account is None else _row(account, f"{where}.account"),
        lists["messages"],
        lists["recipients_done"],
    )


def parse_export(data: bytes) -> LedgerExport:
    """The file's content, checked for shape; ``ValueError`` with one line saying what is
    wrong (never a row's content)."""
    try:
        doc = json.loads(_decode(data))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("not a ledger export: not JSON") from None
    if not isinstance(doc, Mapping) or doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f'not a ledger export: "format" is not "{EXPORT_FORMAT}"')
    if doc.get("version") != EXPORT_VERSION:
        raise ValueError(
            f"ledger export version {doc.get('version')!r}: this program reads version "
            f"{EXPORT_VERSION}"
        )
    schema, accounts = doc.get("schema"), doc.get("accounts")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise ValueError('not a ledger export: "schema" is not a schema version')
    if not isinstance(accounts, list):
        raise ValueError('not a ledger export: "accounts" is not a list')
    parsed = tuple(_account(a, i) for i, a in enumerate(accounts))
    names = [a.name for a in parsed]
    if len(set(names)) != len(names):
        raise ValueError("an account appears twice in the file")
    exported_at = doc.get("exported_at")
    return LedgerExport(schema, exported_at if isinstance(exported_at, str) else "", parsed)
