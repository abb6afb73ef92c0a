"""The HTTP endpoint on ``metrics.listen``: /metrics, /healthz, /status, POST /poll.

docs/design.md §11.2.

A small HTTP/1.1 server on ``asyncio.start_server``, in the service's own event loop: no extra
thread, and the handlers read the scheduler's state directly.  Each request gets one response,
then the connection is closed (``Connection: close``, RFC 9112 §9.6), which keeps the parser to
a request line and header fields.  Scrapers (Prometheus, curl, a load balancer's health check)
need nothing more.

Routes::

    GET  /metrics               Prometheus text exposition
    GET  /healthz               200 "ok" while the scheduler is alive, else 503
    GET  /status                JSON: {"accounts": [...]} (docs/design.md §11.2)
    POST /poll[?account=NAME]   poll now (all accounts, or one): 202 with the accounts woken and
                                those held back by their backoff; 404 for an unknown account

The endpoint never authenticates anyone: it listens on loopback by default, and nothing it
serves is secret (no password or message content appears in any response).  It must still be
safe to leave on with every local user and every web page in a browser on the host as clients
(docs/design.md §11.2), so:

* DNS rebinding: a page whose own name now resolves to 127.0.0.1 could read /status as "same
  origin".  Every request's ``Host`` must name the listen address: one of its IP addresses (any
  IP literal when bound to a wildcard address: rebinding needs a name), ``localhost``, the
  listen host's own name, or one of ``allowed_hosts``; else 421 (RFC 9110 §15.5.20).
* Cross-site requests: a page can make a browser send a "simple" POST (RFC 9110 plus the Fetch
  standard's CORS-safelisted headers and types) without asking anyone.  POST /poll needs
  ``Content-Type: application/json``, which a browser sends cross-origin only after a CORS
  preflight we never grant (we answer no OPTIONS), and any request carrying a foreign ``Origin``
  or ``Sec-Fetch-Site: cross-site`` / ``same-site`` is refused (403).
* Hammering: /poll never shortens the backoff of a failing account (the service decides).
* Malformed input: the request head is parsed strictly (RFC 9112 §3 and §5: token methods,
  origin-form targets, no white space before a colon, no line folding, no control characters,
  ASCII digits in Content-Length); whatever does not parse gets a 4xx, never a traceback.
* Descriptors: at most ``max_connections`` at once (more are answered 503 and closed), each
  dropped after ``request_timeout`` without a whole request (slowloris).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, urlsplit

from connector.metrics import CONTENT_TYPE

__all__ = ["HttpEndpoint", "Operations", "Request", "Response", "parse_head"]

log = logging.getLogger(__name__)

MAX_HEAD: Final = 16 * 1024
"""Request line plus header fields; anything longer is refused (431)."""
MAX_BODY: Final = 64 * 1024
"""A POST body is read and discarded up to this size (nothing we serve takes a body)."""
REQUEST_TIMEOUT: Final = 10.0
"""A client that sends no complete request within this is dropped (slowloris)."""
MAX_CONNECTIONS: Final = 32
"""Connections served at once: Prometheus and an admin need a few; a local user opening
thousands must not take the descriptors the ledger and the Maildir need."""
BIND_RETRY_FIRST: Final = 1.0
BIND_RETRY_MAX: Final = 300.0
"""Seconds between attempts to bind a busy or missing listen address (doubling)."""

# RFC 9110 §5.6.2: tchar.  Bounded quantifiers over one class each: no backtracking to speak of.
_TCHAR: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
# RFC 9112 §3: method SP request-target SP HTTP-version; only origin-form targets (§3.2.1).
_REQUEST_LINE: Final = re.compile(rf"({_TCHAR}{{1,32}}) (/[\x21-\x7e]*) HTTP/1\.([01])")
_FIELD_NAME: Final = re.compile(rf"{_TCHAR}{{1,64}}")
# RFC 9110 §5.5: field-value is VCHAR, SP, HTAB and obs-text; CR, LF, NUL and other controls
# are invalid.
_BAD_VALUE_CHAR: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS: Final = re.compile(r"[0-9]+")  # [0-9] is ASCII only: "²".isdigit() is True
# Header fields we read: each may appear once (RFC 9110 §5.3; a second Host or Content-Length
# is how request smuggling starts).
_SINGLE: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "content-type", "origin", "sec-fetch-site"}
)
# RFC 9110 §7.2: uri-host [ ":" port ]; an IPv6 literal in brackets.
_HOST_FIELD: Final = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[^\[\]:/@\s]{1,253})(?::([0-9]{1,5}))?")
_SAFE_FETCH_SITES: Final = frozenset({"same-origin", "none"})


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

    def poll_now(self, name: str | None = None) -> tuple[list[str], dict[str, float]]:
        """Start a cycle now where allowed: the accounts woken, and those held back by their
        backoff (name -> Unix time of their next poll).  Unknown ``name``: KeyError."""
        ...


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response."""

    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    allow: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request head: the header fields we read, by lower-case name."""

    method: str
    target: str
    headers: Mapping[str, str] = field(default_factory=dict)


class RequestRefused(Exception):
    """The request cannot be served; ``response`` says why (always a 4xx)."""

    def __init__(self, status: HTTPStatus, text: str | None = None) -> None:
        self.response = _text(status, text)
        super().__init__(status.value, text)


def _text(status: HTTPStatus, text: str | None = None, *, allow: str | None = None) -> Response:
    return Response(status, ((text or status.phrase) + "\n").encode(), allow=allow)


def _json(status: HTTPStatus, doc: Mapping[str, Any]) -> Response:
    body = json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"
    return Response(status, body, "application/json")


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_head(head: bytes) -> tuple[Request, int]:
    """The request and its body length, from the bytes up to and including the empty line.

    Strict where leniency has been exploited (RFC 9112 §2.2, §3, §5, §6.3): raises
    :class:`RequestRefused` with a 4xx for anything else.  Field names are case-insensitive
    and kept in lower case; only the fields in ``_SINGLE`` are kept, each at most once.
    """
    text = head.decode("latin-1")  # every byte maps to one character: nothing can fail here
    lines = text.removesuffix("\r\n\r\n").split("\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise RequestRefused(HTTPStatus.BAD_REQUEST, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _FIELD_NAME.fullmatch(name):
            # Also catches obs-fold (a line starting with white space, §5.2) and white space
            # before the colon (§5.1), which both must be refused.
            raise RequestRefused(HTTPStatus.BAD_REQUEST, "malformed header field")
        if _BAD_VALUE_CHAR.search(value):
            raise RequestRefused(HTTPStatus.BAD_REQUEST, "control character in a header field")
        key = name.lower()
        if key in _SINGLE:
            if key in headers:
                raise RequestRefused(HTTPStatus.BAD_REQUEST, f"{name} given twice")
            headers[key] = value.strip(" \t")
    if "transfer-encoding" in headers:
        # We read bodies by Content-Length only; chunked bodies are refused (§6.1).
        raise RequestRefused(HTTPStatus.LENGTH_REQUIRED, "send Content-Length, not chunks")
    length = headers.get("content-length", "0")
    if not _DIGITS.fullmatch(length):
        raise RequestRefused(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
    if len(length) > 9 or int(length) > MAX_BODY:
        raise RequestRefused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    if "host" not in headers:
        raise RequestRefused(HTTPStatus.BAD_REQUEST, "Host header required")  # §3.2
    return Request(m.group(1), m.group(2), headers), int(length)


def _host_name(value: str) -> str | None:
    """The host of a Host field value, in lower case, without brackets or a final dot."""
    m = _HOST_FIELD.fullmatch(value)
    if m is None:
        return None
    return m.group(1).strip("[]").lower().removesuffix(".")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class HttpEndpoint:
    """The server.  ``await start(host, port)``; ``address`` is the bound (host, port).

    ``allowed_hosts``: more names a ``Host`` field may give (the name Prometheus scrapes us
    by, when it is not the listen address).
    """

    def __init__(
        self,
        ops: Operations,
        *,
        allowed_hosts: Iterable[str] = (),
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.ops = ops
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._names = {h.lower().removesuffix(".") for h in allowed_hosts} | {"localhost"}
        self._ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._any_ip = False
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: any free port).  Raises OSError if busy."""
        self._server = await asyncio.start_server(
            self._client, host, port, limit=MAX_HEAD, reuse_address=True
        )
        if _ip(host) is None:
            self._names.add(host.lower().removesuffix("."))  # e.g. listen = "localhost:9469"
        for sock in self._server.sockets:
            bound = _ip(str(sock.getsockname()[0]).split("%", 1)[0])
            if bound is not None:
                self._ips.add(bound)
                self._any_ip |= bound.is_unspecified

    async def start_retrying(
        self,
        host: str,
        port: int,
        *,
        first_delay: float = BIND_RETRY_FIRST,
        max_delay: float = BIND_RETRY_MAX,
    ) -> None:
        """:meth:`start`, and while that fails (the port taken by someone else, the address
        not there yet), log it loudly and try again with a doubling delay.  The mail does not
        wait for this: run it beside the scheduler, and cancel it to give up."""
        delay, failed = first_delay, False
        while True:
            try:
                await self.start(host, port)
            except OSError as exc:
                failed = True
                log.error(
                    "cannot listen on %s:%d (%s): /metrics, /healthz, /status and POST /poll "
                    "are unavailable; mail is still collected; trying again in %.0fs",
                    host,
                    port,
                    exc.strerror or exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)
                continue
            (log.warning if failed else log.info)(
                "serving /metrics, /healthz, /status and POST /poll on %s", self.url
            )
            return

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
        if len(self._clients) >= self.max_connections:
            # Answered without reading: a few bytes fit in the socket's buffer, and close()
            # releases the descriptor once they are sent, whatever the client does.
            writer.write(_wire(_text(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")))
            writer.close()
            return
        task = asyncio.current_task()
        # Kept, so that close() can cancel it (docs/design.md §10.1: every task reference is kept).
        if task is not None:
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
                async with asyncio.timeout(self.request_timeout):
                    await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    async def _respond(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            async with asyncio.timeout(self.request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                request, length = parse_head(head)
                if length:
                    await reader.readexactly(length)  # discarded: nothing takes a body
        except asyncio.IncompleteReadError:
            return None  # closed before a whole request: no one to answer
        except asyncio.LimitOverrunError:
            return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        except RequestRefused as refused:
            return refused.response
        try:
            self.check_origin(request)
        except RequestRefused as refused:
            return refused.response
        return await self.route(request)

    def check_origin(self, request: Request) -> None:
        """Refuse (421/403) a request for another host, or one a browser sent cross-site."""
        host = _host_name(request.headers.get("host", ""))
        if host is None or not self._host_allowed(host):
            raise RequestRefused(HTTPStatus.MISDIRECTED_REQUEST, "not a host name of this server")
        origin = request.headers.get("origin")
        if origin is not None and origin.lower() != f"http://{request.headers['host'].lower()}":
            raise RequestRefused(HTTPStatus.FORBIDDEN, "cross-origin requests are refused")
        site = request.headers.get("sec-fetch-site")
        if site is not None and site.lower() not in _SAFE_FETCH_SITES:
            raise RequestRefused(HTTPStatus.FORBIDDEN, "cross-site requests are refused")

    def _host_allowed(self, host: str) -> bool:
        ip = _ip(host)
        if ip is None:
            return host in self._names
        return self._any_ip or ip in self._ips

    async def route(self, request: Request) -> Response:
        """The response to a request that passed :meth:`check_origin`."""
        method = request.method
        url = urlsplit(request.target)
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
                return self._poll(request, query)
            case _:
                return _text(HTTPStatus.NOT_FOUND)

    def _poll(self, request: Request, query: dict[str, list[str]]) -> Response:
        if request.method != "POST":
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, allow="POST")
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            # The one thing a page cannot make a browser send cross-site without a preflight.
            return _text(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST /poll needs Content-Type: application/json"
            )
        names = query.get("account", [])
        if len(names) > 1:
            return _text(HTTPStatus.BAD_REQUEST, "at most one account=NAME")
        try:
            woken, held = self.ops.poll_now(names[0] if names else None)
        except KeyError:
            # The name is echoed as JSON, so nothing in it can break the response.
            return _json(HTTPStatus.NOT_FOUND, {"error": "no such account"})
        held_back = [{"account": n, "until": _rfc3339(t)} for n, t in sorted(held.items())]
        return _json(HTTPStatus.ACCEPTED, {"polling": woken, "held_back": held_back})

    async def _write(self, writer: asyncio.StreamWriter, response: Response) -> None:
        writer.write(_wire(response))
        # A client that never reads must not hold a task and a socket until shutdown.
        async with asyncio.timeout(self.request_timeout):
            await writer.drain()


def _wire(response: Response) -> bytes:
    head = [
        f"HTTP/1.1 {response.status.value} {response.status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if response.allow is not None:
        head.append(f"Allow: {response.allow}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body
