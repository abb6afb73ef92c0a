"""The two limit probes, each run as its own process so that its CPU and RSS are measured alone.

``python -m bench.probes pop3 JOB.json OUT.json``: every account at once, ``window`` RETR
commands in flight per connection (RFC 2449 §6.6 PIPELINING), each reply read in bulk up to the
terminating ".CRLF" (RFC 1939 §3) and discarded after its Message-ID is noted.  No DELE: it shows
how fast POP3 alone can go.

``python -m bench.probes smtp JOB.json OUT.json``: the corpus files sent over ``connections``
SMTP connections; MAIL, RCPT and DATA pipelined (RFC 2920), the message dot-stuffed with one
``bytes.replace`` (RFC 5321 §4.5.2) and sent together with the next MAIL/RCPT/DATA, so each
message costs one round trip.  It shows how fast the receiver can take the corpus.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Final

_MSGID: Final = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
_LIMIT: Final = 1 << 27


def _msgid(raw: bytes) -> str:
    end = raw.find(b"\r\n\r\n")
    m = _MSGID.search(raw, 0, end if end >= 0 else len(raw))
    return m.group(1).decode("ascii", "replace") if m else ""


async def _ok(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    if not line.startswith(b"+OK"):
        raise RuntimeError(f"POP3 said {line[:80]!r}")
    return line


async def pop3_account(
    host: str, port: int, user: str, password: str, window: int, seen: Counter[str]
) -> int:
    """RETR every message of one mailbox, ``window`` at a time; return the bytes read."""
    reader, writer = await asyncio.open_connection(host, port, limit=_LIMIT)
    try:
        await _ok(reader)
        writer.write(f"USER {user}\r\nPASS {password}\r\nSTAT\r\n".encode())
        await _ok(reader)
        await _ok(reader)
        count = int((await _ok(reader)).split()[1])
        total = 0
        sent = 0
        for n in range(1, count + 1):
            if sent < count:
                upto = min(count, n - 1 + window)
                writer.write(b"".join(b"RETR %d\r\n" % i for i in range(sent + 1, upto + 1)))
                sent = upto
            # The whole reply, status line included, ends with CRLF "." CRLF.
            raw = await reader.readuntil(b"\r\n.\r\n")
            if not raw.startswith(b"+OK"):
                raise RuntimeError(f"RETR {n}: {raw[:80]!r}")
            seen[_msgid(raw[raw.find(b"\n") + 1 :])] += 1
            total += len(raw)
        writer.write(b"QUIT\r\n")
        await reader.readline()
        return total
    finally:
        writer.close()


async def _smtp_replies(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError("SMTP connection closed")
            if line[3:4] != b"-":
                out.append(line)
                break
    return out


def stuff(raw: bytes) -> bytes:
    """RFC 5321 §4.5.2 dot-stuffing of CRLF text, plus the terminator."""
    body = raw.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


async def smtp_connection(host: str, port: int, paths: list[str], queue: list[int]) -> int:
    """Send corpus files, taken from the shared ``queue``, over one connection."""
    reader, writer = await asyncio.open_connection(host, port, limit=_LIMIT)
    envelope = b"MAIL FROM:<sender@bench.example>\r\nRCPT TO:<bench@example.test>\r\nDATA\r\n"
    total = 0
    try:
        await _smtp_replies(reader, 1)
        writer.write(b"EHLO probe.bench.example\r\n")
        await _smtp_replies(reader, 1)
        pending = b""
        while queue:
            i = queue.pop()
            writer.write(pending + envelope)
            replies = await _smtp_replies(reader, 4 if pending else 3)
            if not replies[-1].startswith(b"354") or any(r[:1] != b"2" for r in replies[:-1]):
                raise RuntimeError(f"SMTP said {replies!r}")
            with open(paths[i], "rb") as f:  # noqa: ASYNC230 - the page cache answers at once
                raw = f.read()
            pending = stuff(raw)
            total += len(raw)
        writer.write(pending + b"QUIT\r\n")
        replies = await _smtp_replies(reader, 2 if pending else 1)
        if pending and not replies[0].startswith(b"250"):
            raise RuntimeError(f"SMTP said {replies!r}")
        return total
    finally:
        writer.close()


async def run_pop3(job: dict[str, Any]) -> dict[str, Any]:
    seen: Counter[str] = Counter()
    sizes = await asyncio.gather(
        *(
            pop3_account(job["host"], job["port"], user, job["password"], job["window"], seen)
            for user in job["users"]
        )
    )
    return {"seen": dict(seen), "bytes": sum(sizes)}


async def run_smtp(job: dict[str, Any]) -> dict[str, Any]:
    paths: list[str] = job["paths"]
    queue = list(range(len(paths)))[::-1]  # pop() from the end keeps corpus order
    sizes = await asyncio.gather(
        *(
            smtp_connection(job["host"], job["port"], paths, queue)
            for _ in range(job["connections"])
        )
    )
    return {"bytes": sum(sizes)}


def main(argv: list[str]) -> int:
    """``python -m bench.probes pop3|smtp JOB.json OUT.json``."""
    kind, job_path, out_path = argv
    job = json.loads(Path(job_path).read_text())
    result = asyncio.run(run_pop3(job) if kind == "pop3" else run_smtp(job))
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
