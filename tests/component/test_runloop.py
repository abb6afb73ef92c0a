"""connector.runloop: TLS, STARTTLS and the loopback demo on the loop it chooses (uvloop and
asyncio); which loop it chooses, and signals, are tests/unit/test_runloop.py.

The tests are synchronous on purpose: ``runloop.run`` makes its own loop, which it cannot do
inside pytest-asyncio's running one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from pathlib import Path

import pytest
import trustme

from connector import runloop
from connector.runloop import ENV_VAR

AUTO: Mapping[str, str] = {}
STOCK: Mapping[str, str] = {ENV_VAR: "asyncio"}


@pytest.mark.parametrize("env", [AUTO, STOCK], ids=["uvloop", "asyncio"])
def test_tls_and_starttls_on_the_chosen_loop(env: Mapping[str, str]) -> None:
    """Implicit TLS and an upgrade with StreamWriter.start_tls (POP3 STLS, SMTP STARTTLS)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def session() -> list[bytes]:
        async def implicit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"+OK tls " + await reader.readline())
            await writer.drain()
            writer.close()

        async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()  # STLS
            writer.write(b"+OK begin TLS\r\n")
            await writer.drain()
            await writer.start_tls(server_ctx)
            writer.write(b"+OK upgraded " + await reader.readline())
            await writer.drain()
            writer.close()

        got = []
        tls_server = await asyncio.start_server(implicit, "127.0.0.1", 0, ssl=server_ctx)
        plain_server = await asyncio.start_server(upgrade, "127.0.0.1", 0)
        async with tls_server, plain_server:
            port = tls_server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
            )
            writer.write(b"CAPA\r\n")
            got.append(await reader.readline())
            writer.close()
            await writer.wait_closed()

            port = plain_server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"STLS\r\n")
            got.append(await reader.readline())
            await writer.start_tls(client_ctx, server_hostname="localhost")
            assert writer.get_extra_info("ssl_object") is not None
            writer.write(b"CAPA\r\n")
            got.append(await reader.readline())
            writer.close()
            await writer.wait_closed()
        return got

    assert runloop.run(session(), env=env) == [
        b"+OK tls CAPA\r\n",
        b"+OK begin TLS\r\n",
        b"+OK upgraded CAPA\r\n",
    ]


@pytest.mark.parametrize("env", [AUTO, STOCK], ids=["uvloop", "asyncio"])
def test_the_loopback_demo_delivers_on_the_chosen_loop(
    env: Mapping[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole product path (POP3 pipelining, pipelined SMTP replies, DATA written by
    the smtp package, ledger thread) on each loop; under uvloop it once hung reading replies."""
    from connector.demo import run_demo

    async def demo() -> int:
        async with asyncio.timeout(10):
            return await run_demo(tmp_path)

    assert runloop.run(demo(), env=env) == 0
    assert "pop3-connector demo" in capsys.readouterr().out
