"""connector.http: the endpoint on a real loopback socket (port 0), with a stand-in service.

Besides the routes: what docs/design.md §11.2 asks of an endpoint left on beside a browser and other
local users.  Malformed requests (generated) get a 4xx and never a traceback; a Host that is not
ours is refused (DNS rebinding); a request a browser sends cross-site without a preflight cannot
poll; idle connections are capped; a port someone else holds is retried, not fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from connector.http import MAX_BODY, MAX_HEAD, HttpEndpoint, Request, RequestRefused, parse_head
from connector.metrics import CONTENT_TYPE, Metrics

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
JSON = "Content-Type: application/json\r\n"


class Ops:
    """Implements connector.http.Operations; records the polls asked for."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.metrics.set_accounts(["info", "sales"])
        self.alive = True
        self.polled: list[str | None] = []
        self.held: dict[str, float] = {}

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def healthy(self) -> bool:
        return self.alive

    async def status(self) -> Mapping[str, Any]:
        return {"accounts": [{"name": "info", "result": "ok"}]}

    def poll_now(self, name: str | None = None) -> tuple[list[str], dict[str, float]]:
        if name not in (None, "info", "sales"):
            raise KeyError(name)
        self.polled.append(name)
        names = ["info", "sales"] if name is None else [name]
        return [n for n in names if n not in self.held], {
            n: t for n, t in self.held.items() if n in names
        }


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


def request(
    method: str, target: str, body: bytes = b"", *, host: str = "127.0.0.1", extra: str = ""
) -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{length}{extra}\r\n"
    return head.encode() + body


def poll(target: str = "/poll", *, extra: str = JSON, host: str = "127.0.0.1") -> bytes:
    return request("POST", target, host=host, extra=extra)


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
    status, _, body = await exchange(endpoint, poll())
    assert (status, json.loads(body)) == (202, {"polling": ["info", "sales"], "held_back": []})
    raw = request("POST", "/poll?account=sales", b'{"x": 1}', extra=JSON)
    status, _, body = await exchange(endpoint, raw)
    assert (status, json.loads(body)) == (202, {"polling": ["sales"], "held_back": []})
    status, _, body = await exchange(endpoint, poll("/poll?account=%3Cscript%3E"))
    assert (status, json.loads(body)) == (404, {"error": "no such account"})
    assert (await exchange(endpoint, poll("/poll?account=a&account=b")))[0] == 400
    assert ops.polled == [None, "sales"]


async def test_poll_says_which_accounts_are_held_back_and_until_when(
    served: tuple[HttpEndpoint, Ops],
) -> None:
    endpoint, ops = served
    ops.held = {"sales": 1_798_386_575.0}
    status, _, body = await exchange(endpoint, poll())
    assert status == 202
    assert json.loads(body) == {
        "polling": ["info"],
        "held_back": [{"account": "sales", "until": "2026-12-27T15:49:35Z"}],
    }


@pytest.mark.parametrize(
    ("method", "target", "status", "allow"),
    [
        ("GET", "/poll", 405, "POST"),
        ("POST", "/metrics", 405, "GET"),
        ("DELETE", "/status", 405, "GET"),
        ("PUT", "/healthz", 405, "GET"),
        ("OPTIONS", "/poll", 405, "POST"),  # no CORS preflight is ever granted
        ("GET", "/", 404, None),
        ("GET", "/metrics/../etc/passwd", 404, None),
    ],
)
async def test_wrong_method_or_path(
    served: tuple[HttpEndpoint, Ops], method: str, target: str, status: int, allow: str | None
) -> None:
    endpoint, ops = served
    got, headers, _ = await exchange(endpoint, request(method, target, extra=JSON))
    assert got == status
    assert headers.get("allow") == allow
    assert "access-control-allow-origin" not in headers
    assert ops.polled == []


# -- cross-site requests and DNS rebinding ---------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("", 415),  # curl -X POST without a type; a <form> without enctype is urlencoded:
        ("Content-Type: application/x-www-form-urlencoded\r\n", 415),
        ("Content-Type: text/plain;charset=UTF-8\r\n", 415),  # fetch(url, {mode: "no-cors"})
        ("Content-Type: multipart/form-data; boundary=x\r\n", 415),
        ("Content-Type: application/json\r\n", 202),
        ("Content-Type: Application/JSON; charset=utf-8\r\n", 202),
        (JSON + "Origin: http://evil.example\r\n", 403),
        (JSON + "Origin: null\r\n", 403),
        (JSON + "Origin: http://127.0.0.1:1\r\n", 403),  # another port is another origin
        (JSON + "Origin: http://{host}\r\n", 202),
        (JSON + "Sec-Fetch-Site: cross-site\r\n", 403),
        (JSON + "Sec-Fetch-Site: same-site\r\n", 403),  # Grafana on :3000 is "same-site"
        (JSON + "Sec-Fetch-Site: same-origin\r\n", 202),
        (JSON + "Sec-Fetch-Site: none\r\n", 202),
    ],
)
async def test_a_browser_cannot_poll_cross_site(
    served: tuple[HttpEndpoint, Ops], extra: str, status: int
) -> None:
    endpoint, ops = served
    host = f"127.0.0.1:{endpoint.address[1]}"
    got, _, body = await exchange(endpoint, poll(extra=extra.format(host=host), host=host))
    assert got == status, body
    assert ops.polled == ([None] if status == 202 else [])


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1", 200),
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        ("LOCALHOST.", 200),
        ("evil.example:{port}", 421),  # DNS rebinding: the page's own name, now 127.0.0.1
        ("127.0.0.1.evil.example", 421),
        ("[::1]:{port}", 421),  # an address we do not listen on
        ("10.0.0.1", 421),
        ("", 421),
        ("127.0.0.1:{port}@evil.example", 421),
    ],
)
async def test_host_must_name_this_server_on_every_path(
    served: tuple[HttpEndpoint, Ops], host: str, status: int
) -> None:
    endpoint, _ = served
    value = host.format(port=endpoint.address[1])
    for target in ("/status", "/metrics", "/healthz", "/nowhere"):
        got = (await exchange(endpoint, request("GET", target, host=value)))[0]
        assert got == (status if status != 200 or target != "/nowhere" else 404)


async def test_a_wildcard_listener_takes_ip_literals_and_its_allowed_names() -> None:
    ops = Ops()
    async with HttpEndpoint(ops, allowed_hosts=["pop3-connector"]) as endpoint:
        await endpoint.start("0.0.0.0", 0)  # noqa: S104 (the container's listen address)
        port = endpoint.address[1]
        for host, status in [
            (f"127.0.0.1:{port}", 200),
            ("172.18.0.3:9469", 200),  # a container's address, the published port
            ("pop3-connector:9469", 200),  # Prometheus on the compose network
            ("Pop3-Connector", 200),
            ("evil.example", 421),
        ]:
            raw = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert data.startswith(f"HTTP/1.1 {status} ".encode()), (host, data[:40])


# -- malformed requests --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET http://127.0.0.1/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET /m\xc3\xa9trics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # no Host (RFC 9112 §3.2)
        (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n", 400),  # space before the colon
        (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n folded\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX: a\nb\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon\r\n\r\n", 400),
        (b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        (b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + b"9" * 5000, 413),
        (b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \xc2\xb2\r\n\r\n", 400),
        (b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1 1\r\n\r\n", 400),
        (b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0x10\r\n\r\n", 400),
        (
            b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
            b"Content-Length: 2\r\n\r\n",
            400,
        ),
        (b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
    ],
)
async def test_bad_requests_are_refused(
    served: tuple[HttpEndpoint, Ops], raw: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint, ops = served
    if b"9" * 5000 in raw:
        raw += b"\r\n\r\n"
    assert (await exchange(endpoint, raw))[0] == status
    assert ops.polled == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# Request heads: plausible pieces, mutated, and raw bytes.
_PIECES = [
    b"GET ",
    b"POST ",
    b"/poll",
    b"/status",
    b"?account=",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"Host: 127.0.0.1",
    b"Host:",
    b"Content-Length: ",
    b"Content-Type: application/json",
    b"Origin: http://127.0.0.1",
    b"Transfer-Encoding: chunked",
    b"Sec-Fetch-Site: cross-site",
    "²".encode(),
    "٣".encode(),  # ARABIC-INDIC DIGIT THREE: str.isdigit() is True
    b"-1",
    b"0",
    b"65536",
    b"9" * 5000,
    b" ",
    b"\t",
    b":",
    b"\x00",
    b"\xff",
    b"%00",
    b"[",
]
heads = st.lists(st.sampled_from(_PIECES) | st.binary(max_size=6), max_size=24).map(b"".join)


@given(head=heads)
def test_parse_head_returns_or_refuses_with_a_4xx(head: bytes) -> None:
    raw = head + b"\r\n\r\n"
    outcome: tuple[Request, int] | RequestRefused
    try:
        outcome = parse_head(raw[: raw.index(b"\r\n\r\n") + 4])
    except RequestRefused as exc:
        outcome = exc
    if isinstance(outcome, RequestRefused):
        assert 400 <= outcome.response.status.value < 500
    else:
        request, length = outcome
        assert 0 <= length <= MAX_BODY
        assert request.target.startswith("/")
        assert "host" in request.headers


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _errors_logged() -> Iterator[_Errors]:
    handler = _Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@settings(
    PROFILE,
    max_examples=min(PROFILE.max_examples, 150),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(head=heads, body=st.binary(max_size=64))
def test_any_request_gets_an_answer_never_a_traceback(head: bytes, body: bytes) -> None:
    async def scenario() -> tuple[bytes, Ops]:
        ops = Ops()
        async with HttpEndpoint(ops, request_timeout=2.0) as endpoint:
            await endpoint.start("127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(*endpoint.address)
            writer.write(head + b"\r\n\r\n" + body)
            writer.write_eof()
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
        return data, ops

    with _errors_logged() as errors:
        data, ops = asyncio.run(scenario())
    assert errors.records == []
    if data:  # nothing at all only when the body promised was not sent whole
        status = int(data.split(b" ", 2)[1])
        assert status < 500, data[:60]
        if ops.polled:
            assert b"application/json" in head.lower()


# -- connections ---------------------------------------------------------------------------


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


async def _until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_idle_connections_are_capped_in_number_and_time() -> None:
    endpoint = HttpEndpoint(Ops(), max_connections=4, request_timeout=1.0)
    await endpoint.start("127.0.0.1", 0)
    async with endpoint:
        idle = [await asyncio.open_connection(*endpoint.address) for _ in range(4)]
        await _until(lambda: len(endpoint._clients) == 4, "the idle connections")
        # A local user opening more: each is answered 503 and closed at once, none is kept.
        for _ in range(20):
            reader, writer = await asyncio.open_connection(*endpoint.address)
            data = await asyncio.wait_for(reader.read(), 5)
            assert data.startswith(b"HTTP/1.1 503 "), data
            writer.close()
            await writer.wait_closed()
        assert len(endpoint._clients) == 4
        # The idle ones are dropped after request_timeout, and the endpoint serves again.
        for reader, _ in idle:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        await _until(lambda: len(endpoint._clients) == 0, "the idle connections to go")
        assert (await exchange(endpoint, request("GET", "/healthz")))[0] == 200
        for _, writer in idle:
            writer.close()
            await writer.wait_closed()


async def test_a_busy_port_is_retried_until_it_is_free(caplog: pytest.LogCaptureFixture) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    endpoint = HttpEndpoint(Ops())
    binding = asyncio.create_task(endpoint.start_retrying("127.0.0.1", port, first_delay=0.05))
    try:
        await _until(
            lambda: any("cannot listen on 127.0.0.1" in r.getMessage() for r in caplog.records),
            "the error about the busy port",
        )
        assert not binding.done()
        squatter.close()
        await asyncio.wait_for(binding, 10)
        assert endpoint.address == ("127.0.0.1", port)
        assert (await exchange(endpoint, request("GET", "/healthz")))[0] == 200
        assert any(
            r.levelno == logging.WARNING and "serving /metrics" in r.getMessage()
            for r in caplog.records
        )
    finally:
        binding.cancel()
        squatter.close()
        await endpoint.close()
