"""``pop3-connector check --connect``: log in everywhere, like the SBS connector's "Test" button.

Each POP3 account: connect, TLS as configured, login, STAT, QUIT (nothing is fetched or deleted).
SMTP: connect, EHLO, STARTTLS, AUTH, QUIT.  One line per target; exit 1 when any failed.
"""

from __future__ import annotations

import asyncio

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
    return f"ok: {count} message(s), {octets} bytes waiting"


async def _check_smtp(runtime: Runtime) -> str:
    deliverer = SmtpDeliverer(runtime.smtp)
    try:
        await deliverer.connect()
        limit = deliverer.max_size
    finally:
        await deliverer.close()
    size = f", size limit {limit} bytes" if limit else ""
    return f"ok: accepted our {runtime.smtp.tls} session{size}"


async def _guarded(coro: asyncio.Future[str] | asyncio.Task[str]) -> tuple[bool, str]:
    try:
        return True, await coro
    except ConnectorError as exc:
        return False, f"FAILED: {exc}"


async def check_connections(runtime: Runtime) -> int:
    """Try every connection; print one line each; 0 when all succeeded, else 1."""
    targets = [
        (
            f"pop3 {spec.name} ({spec.endpoint.host}:{spec.endpoint.port}, {spec.endpoint.tls})",
            asyncio.ensure_future(_check_pop3(spec)),
        )
        for spec in runtime.accounts
    ]
    targets.append(
        (
            f"smtp ({runtime.smtp.host}:{runtime.smtp.port}, {runtime.smtp.tls})",
            asyncio.ensure_future(_check_smtp(runtime)),
        )
    )
    width = max(len(name) for name, _ in targets)
    all_ok = True
    for name, fut in targets:
        ok, text = await _guarded(fut)
        all_ok &= ok
        print(f"{name:<{width}}  {text}")
    return 0 if all_ok else 1
