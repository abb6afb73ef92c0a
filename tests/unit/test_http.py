"""connector.http: the endpoint on a real loopback socket (port 0), with a stand-in service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connector.http import MAX_HEAD, HttpEndpoint
from connector.metrics import CONTENT_TYPE, Metrics


class Ops:
    """Implements connector.http.Operations; records the polls asked for."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.metrics.set_accounts(["info", "sales"])
        self.alive = True
        self.polled: list[str | None] = []

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def healthy(self) -> bool:
        return self.alive

    async def status(self) -> Mapping[str, Any]:
        return {"accounts": [{"name": "info", "result": "ok"}]}

    def poll_now(self, name: str | None = None) -> list[str]:
        if name not in (None, "info", "sales"):
            raise KeyError(name)
        self.polled.append(name)
        return ["info", "sales"] if name is None else [name]


@pytest.fixture
async def served() -> AsyncIterator[tuple[HttpEndpoint, Ops]]:
    ops = Ops()
    endpoint = HttpEndpoint(ops)
    await endpoint.start("127.0.0.1", 0)
    async with endpoint:
        yield endpoint, ops


async def exchange(endpoint: HttpEndpoint, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = endpoint.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()  # the server closes after one response
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(status_line.split()[1]), headers, body


def request(method: str, target: str, body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {target} HTTP/1.1\r\nHost: x\r\n{length}\r\n".encode() + body


async def test_metrics_is_the_prometheus_exposition(served: tuple[HttpEndpoint, Ops]) -> None:
    endpoint, _ = served
    status, headers, body = await exchange(endpoint, request("GET", "/metrics"))
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "pop3_connector_messages" in names
    assert endpoint.url == f"http://127.0.0.1:{endpoint.address[1]}"


async def test_healthz_follows_the_scheduler(served: tuple[HttpEndpoint, Ops]) -> None:
    endpoint, ops = served
    assert (await exchange(endpoint, request("GET", "/healthz")))[::2] == (200, b"ok\n")
    ops.alive = False
    assert (await exchange(endpoint, request("GET", "/healthz")))[0] == 503


async def test_status_is_json(served: tuple[HttpEndpoint, Ops]) -> None:
    endpoint, _ = served
    status, headers, body = await exchange(endpoint, request("GET", "/status"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"accounts": [{"name": "info", "result": "ok"}]}


async def test_poll_all_one_and_unknown(served: tuple[HttpEndpoint, Ops]) -> None:
    endpoint, ops = served
    status, _, body = await exchange(endpoint, request("POST", "/poll"))
    assert (status, json.loads(body)) == (202, {"polling": ["info", "sales"]})
    status, _, body = await exchange(endpoint, request("POST", "/poll?account=sales", b"x=1"))
    assert (status, json.loads(body)) == (202, {"polling": ["sales"]})
    status, _, body = await exchange(endpoint, request("POST", "/poll?account=%3Cscript%3E"))
    assert (status, json.loads(body)) == (404, {"error": "no such account"})
    assert (await exchange(endpoint, request("POST", "/poll?account=a&account=b")))[0] == 400
    assert ops.polled == [None, "sales"]


@pytest.mark.parametrize(
    ("method", "target", "status", "allow"),
    [
        ("GET", "/poll", 405, "POST"),
        ("POST", "/metrics", 405, "GET"),
        ("DELETE", "/status", 405, "GET"),
        ("PUT", "/healthz", 405, "GET"),
        ("GET", "/", 404, None),
        ("GET", "/metrics/../etc/passwd", 404, None),
    ],
)
async def test_wrong_method_or_path(
    served: tuple[HttpEndpoint, Ops], method: str, target: str, status: int, allow: str | None
) -> None:
    endpoint, ops = served
    got, headers, _ = await exchange(endpoint, request(method, target))
    assert got == status
    assert headers.get("allow") == allow
    assert ops.polled == []


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"POST /poll HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        (b"POST /poll HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 413),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
    ],
)
async def test_bad_requests_are_refused(
    served: tuple[HttpEndpoint, Ops], raw: bytes, status: int
) -> None:
    endpoint, ops = served
    assert (await exchange(endpoint, raw))[0] == status
    assert ops.polled == []


async def test_a_client_that_hangs_up_early_does_no_harm(
    served: tuple[HttpEndpoint, Ops],
) -> None:
    endpoint, _ = served
    host, port = endpoint.address
    _, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /metr")
    writer.close()
    await writer.wait_closed()
    assert (await exchange(endpoint, request("GET", "/healthz")))[0] == 200


async def test_close_drops_a_stalled_client() -> None:
    endpoint = HttpEndpoint(Ops())
    await endpoint.start("127.0.0.1", 0)
    host, port = endpoint.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # never finishes its request
    await writer.drain()
    await asyncio.wait_for(endpoint.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await writer.wait_closed()
    with pytest.raises(RuntimeError):
        _ = endpoint.address
