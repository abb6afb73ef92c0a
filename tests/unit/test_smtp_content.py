"""connector.smtp.content: the DATA content we write instead of aiosmtplib's sendmail()."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.smtp import (
    content_pieces,
    prepare_content,
)
from connector.smtp.content import content_of, streamed_content
from connector.spool import Spool, Spooled
from tests.unit.test_spool import PROFILE, messages_st, spool_bytes

# ------------------------------------------------------------------------------------------
# DATA content: what we write instead of aiosmtplib's sendmail()
# ------------------------------------------------------------------------------------------


def aiosmtplib_content(message: bytes) -> bytes:
    """What aiosmtplib 5.1 writes after DATA's 354 (SMTPProtocol.execute_data_command)."""
    normalised = normalize_message_line_endings(message)
    return PERIOD_REGEX.sub(b"..", normalised) + b".\r\n"


def our_content(trace: bytes, raw: bytes) -> tuple[bytes, int]:
    parts, size = prepare_content((trace, raw))
    return b"".join(content_pieces(parts)), size


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b".",
        b".\r\n",
        b"..\r\n.\r\n",
        b"Subject: x\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast",
        b"no final line end",
        b"bare LF\nand .dot after it\n",
        b"bare CR\rand CRLF\r\n.x\r",
        b"\r\n\r\n",
        b"\n.\n",
        b"x\r",
        b"trailing CR then dot\r.\r\n",
    ],
)
@pytest.mark.parametrize("trace", [b"", b"Received: from a by b; now\r\n", b"Odd: bare\n"])
def test_content_matches_aiosmtplib(trace: bytes, raw: bytes) -> None:
    content, size = our_content(trace, raw)
    assert content == aiosmtplib_content(trace + raw)
    # RFC 1870 SIZE: aiosmtplib counted the normalised message, final CRLF included.
    assert size == len(normalize_message_line_endings(trace + raw))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"\xff", b" "])).map(
        b"".join
    ),
    st.lists(st.sampled_from([b"\r\n", b".", b"R"])).map(b"".join),
)
def test_content_matches_aiosmtplib_for_any_bytes(raw: bytes, trace: bytes) -> None:
    content, size = our_content(trace, raw)
    assert content == aiosmtplib_content(trace + raw)
    assert size == len(normalize_message_line_endings(trace + raw))


def test_crlf_content_is_sliced_not_copied() -> None:
    # Three 1 MiB runs between dot lines, plus a tail: every piece of the message is a view
    # of it (no copy), at most 1 MiB long; the inserted dots are the only new bytes.
    chunk = b"x" * (1024 * 1024 - 2) + b"\r\n"
    raw = b"Subject: big\r\n\r\n" + (chunk + b".dot\r\n") * 3 + chunk * 2
    parts, size = prepare_content((b"Received: x\r\n", raw))
    assert parts[1] is raw
    assert size == len(raw) + len(b"Received: x\r\n")
    pieces = list(content_pieces(parts))
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert all(v.obj is raw or v.obj is parts[0] for v in views)
    assert max(len(p) for p in pieces) <= 1024 * 1024
    assert [p for p in pieces if isinstance(p, bytes)] == [b".", b".", b".", b".\r\n"]
    assert b"".join(pieces) == aiosmtplib_content(b"Received: x\r\n" + raw)


# ------------------------------------------------------------------------------------------
# DATA from a spool file (docs/design.md §5.3): octet for octet what the in-memory path sends
# ------------------------------------------------------------------------------------------


async def pieces_of_file(spooled: Spooled, trace: bytes, size: int) -> tuple[bytes, int]:
    def chunks() -> AsyncIterator[bytes]:
        return spooled.chunks(size)

    content = streamed_content(
        trace,
        chunks,
        size=spooled.size,
        ascii=spooled.ascii,
        lone=spooled.lone,
        last=spooled.last,
    )
    out = b"".join([bytes(piece) async for piece in content.pieces()])
    assert content.ascii == (trace + spooled.path.read_bytes()).isascii()
    return out, content.size


@settings(PROFILE, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=messages_st, size=st.integers(1, 9), trace=st.booleans())
async def test_data_from_a_spool_file_is_what_the_in_memory_path_sends(
    tmp_path: Path, raw: bytes, size: int, trace: bool
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.clean()
    spooled = await spool_bytes(spool, raw, [])
    line = b"Received: from pop by us; date\r\n" if trace else b""
    memory = content_of(line, raw, None)
    expected = b"".join(bytes(piece) for piece in memory.pieces())
    streamed, octets = await pieces_of_file(spooled, line, size)
    assert streamed == expected
    assert octets == memory.size
    spooled.remove()
