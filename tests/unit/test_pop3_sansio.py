"""The POP3 core stays sans-I/O (docs/design.md §2): importing it pulls in no network or loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import connector.pop3.protocol as protocol

FORBIDDEN = ("asyncio", "socket", "ssl", "selectors")


def test_fresh_interpreter_imports_no_io_modules() -> None:
    code = (
        "import sys\n"
        "import connector.pop3.protocol\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    # -I: isolated mode, so no sitecustomize or user site can import asyncio behind our back.
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_protocol_imports_only_stdlib_and_errors() -> None:
    tree = ast.parse(Path(protocol.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    local = {name for name in imported if name.split(".")[0] == "connector"}
    # _scan: the C helper of _unstuff (no I/O, no imports of its own).
    assert local == {"connector.errors", "connector.pop3._scan"}
    third_party = {
        name
        for name in imported - local
        if name.split(".")[0] not in sys.stdlib_module_names and name != "__future__"
    }
    assert third_party == set()
    assert not {name.split(".")[0] for name in imported} & set(FORBIDDEN)
