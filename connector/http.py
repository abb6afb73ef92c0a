"""The HTTP endpoint on ``metrics.listen`` (PRODUCT §8): /metrics, /healthz, /status, POST /poll.

A small HTTP/1.1 server on ``asyncio.start_server``, in the service's own event loop: no extra
thread, and the handlers read the scheduler's state directly.  Each request gets one response,
then the connection is closed (``Connection: close``, RFC 9112 §9.6), which keeps the parser to
a request line and header fields.  Scrapers (Prometheus, curl, a load balancer's health check)
need nothing more.

Routes::

    GET  /metrics               Prometheus text exposition
    GET  /healthz               200 "ok" while the scheduler is alive, else 503
    GET  /status                JSON: {"accounts": [...]} (PRODUCT §8)
    POST /poll[?account=NAME]   start a cycle now (all accounts, or one); 202, or 404 if unknown

The endpoint never authenticates anyone: it listens on loopback by default, and nothing it
serves is secret (no password, address or message content appears in any response).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, urlsplit

from connector.metrics import CONTENT_TYPE

__all__ = ["HttpEndpoint", "Operations", "Response"]

log = logging.getLogger(__name__)

MAX_HEAD: Final = 16 * 1024
"""Request line plus header fields; anything longer is refused (431)."""
MAX_BODY: Final = 64 * 1024
"""A POST body is read and discarded up to this size (nothing we serve takes a body)."""
REQUEST_TIMEOUT: Final = 10.0
"""A client that sends no complete request within this is dropped (slowloris)."""


class Operations(Protocol):
    """What the endpoint serves; the service implements it."""

    def metrics_text(self) -> bytes:
        """The Prometheus exposition."""
        ...

    def healthy(self) -> bool:
        """True while the scheduler is alive."""
        ...

    async def status(self) -> Mapping[str, Any]:
        """The /status document."""
        ...

    def poll_now(self, name: str | None = None) -> list[str]:
        """Start a cycle now; return the accounts woken.  Unknown ``name``: KeyError."""
        ...


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response."""

    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    allow: str | None = None


def _text(status: HTTPStatus, text: str | None = None, *, allow: str | None = None) -> Response:
    return Response(status, ((text or status.phrase) + "\n").encode(), allow=allow)


def _json(status: HTTPStatus, doc: Mapping[str, Any]) -> Response:
    body = json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"
    return Response(status, body, "application/json")


class HttpEndpoint:
    """The server.  ``await start(host, port)``; ``address`` is the bound (host, port)."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: any free port).  Raises OSError if busy."""
        self._server = await asyncio.start_server(
            self._client, host, port, limit=MAX_HEAD, reuse_address=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The first bound socket's (host, port)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("not started")
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def url(self) -> str:
        """``http://host:port`` of the first bound socket (IPv6 in brackets)."""
        host, port = self.address
        sock = self._server.sockets[0] if self._server is not None else None
        if sock is not None and sock.family == socket.AF_INET6:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop listening and drop the connections in progress."""
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HttpEndpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- one connection ------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # kept, so that close() can cancel it (STYLE §4: no lost tasks)
            self._clients.add(task)
        try:
            response = await self._respond(reader)
            if response is not None:
                await self._write(writer, response)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled; nothing to answer
        except Exception:
            log.exception("HTTP endpoint: unexpected error")
            with contextlib.suppress(ConnectionError, TimeoutError):
                await self._write(writer, _text(HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    async def _respond(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = headers.get("content-length", "0")
                if not length.isdigit() or int(length) > MAX_BODY:
                    return _text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                if int(length):
                    await reader.readexactly(int(length))  # discarded: nothing takes a body
        except asyncio.IncompleteReadError:
            return None  # closed before a whole request: no one to answer
        except asyncio.LimitOverrunError:
            return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _text(HTTPStatus.BAD_REQUEST)
        method, target, _ = parts
        return await self.route(method, target)

    async def route(self, method: str, target: str) -> Response:
        """The response to ``method target`` (public for tests without a socket)."""
        url = urlsplit(target)
        query = parse_qs(url.query, keep_blank_values=True)
        match url.path:
            case "/metrics":
                if method != "GET":
                    return _text(HTTPStatus.METHOD_NOT_ALLOWED, allow="GET")
                return Response(HTTPStatus.OK, self.ops.metrics_text(), CONTENT_TYPE)
            case "/healthz":
                if method != "GET":
                    return _text(HTTPStatus.METHOD_NOT_ALLOWED, allow="GET")
                if self.ops.healthy():
                    return _text(HTTPStatus.OK, "ok")
                return _text(HTTPStatus.SERVICE_UNAVAILABLE, "scheduler not running")
            case "/status":
                if method != "GET":
                    return _text(HTTPStatus.METHOD_NOT_ALLOWED, allow="GET")
                return _json(HTTPStatus.OK, await self.ops.status())
            case "/poll":
                if method != "POST":
                    return _text(HTTPStatus.METHOD_NOT_ALLOWED, allow="POST")
                names = query.get("account", [])
                if len(names) > 1:
                    return _text(HTTPStatus.BAD_REQUEST, "at most one account=NAME")
                try:
                    woken = self.ops.poll_now(names[0] if names else None)
                except KeyError:
                    # The name is echoed as JSON, so nothing in it can break the response.
                    return _json(HTTPStatus.NOT_FOUND, {"error": "no such account"})
                return _json(HTTPStatus.ACCEPTED, {"polling": woken})
            case _:
                return _text(HTTPStatus.NOT_FOUND)

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: Response) -> None:
        head = [
            f"HTTP/1.1 {response.status.value} {response.status.phrase}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if response.allow is not None:
            head.append(f"Allow: {response.allow}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        # A client that never reads must not hold a task and a socket until shutdown.
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await writer.drain()
