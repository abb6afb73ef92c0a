"""``pop3-connector check --connect``: log in everywhere, like the SBS connector's "Test" button.

Each POP3 account: connect, TLS as configured, login, STAT, QUIT (nothing is fetched or deleted).
SMTP: connect, EHLO, STARTTLS, AUTH, QUIT.  All at once; then one table row per target; exit 1
when any failed.  The texts are our errors' ``str()``, which never carry a password.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from connector.admin import format_table
from connector.delivery import SmtpDeliverer
from connector.errors import ConnectorError
from connector.fetcher import AccountSpec
from connector.pop3 import Pop3Client
from connector.service import Runtime


async def _check_pop3(spec: AccountSpec) -> str:
    async with await Pop3Client.connect(spec.endpoint, spec.timeouts) as pop:
        await pop.login(spec.username, spec.password, spec.auth)
        count, octets = await pop.stat()
        await pop.quit()
    return f"{count} message(s), {octets} bytes waiting"


async def _check_smtp(runtime: Runtime) -> str:
    deliverer = SmtpDeliverer(runtime.smtp)
    try:
        await deliverer.connect()
        limit = deliverer.max_size
    finally:
        await deliverer.close()
    auth = ", logged in" if runtime.smtp.username else ""
    size = f", size limit {limit} bytes" if limit else ""
    return f"session accepted{auth}{size}"


async def _guarded(task: asyncio.Task[str]) -> tuple[bool, str]:
    try:
        return True, await task
    except ConnectorError as exc:
        return False, str(exc)


async def check_connections(runtime: Runtime, out: TextIO | None = None) -> int:
    """Try every connection at once; print a table; 0 when all succeeded, else 1."""
    out = out if out is not None else sys.stdout
    targets: list[tuple[str, str, str, asyncio.Task[str]]] = [
        (
            f"pop3 {spec.name}",
            f"{spec.endpoint.host}:{spec.endpoint.port}",
            str(spec.endpoint.tls),
            asyncio.create_task(_check_pop3(spec)),
        )
        for spec in runtime.accounts
    ]
    smtp = runtime.smtp
    targets.append(
        (
            "smtp",
            f"{smtp.host}:{smtp.port}",
            str(smtp.tls),
            asyncio.create_task(_check_smtp(runtime)),
        )
    )
    rows = []
    all_ok = True
    for name, where, tls, task in targets:
        ok, text = await _guarded(task)
        all_ok &= ok
        rows.append([name, where, tls, "ok" if ok else "FAILED", text])
    print(format_table(["TARGET", "ADDRESS", "TLS", "RESULT", "DETAIL"], rows), file=out)
    return 0 if all_ok else 1
