"""End to end: Dovecot's dot-stuffed RETR body goes to DATA as it is (issue 5, cut 1).

A real ``once`` cycle (Dovecot -> pop3-connector -> aiosmtpd): every message arrives as Dovecot
stored it, byte for byte (docs/design.md §5.2, invariant 4), and only the messages whose wire
form cannot be forwarded (a first line starting with ".", which Dovecot 2.3 does not stuff; a
lone CR) take the old un-stuff/re-stuff path.  Which path ran is seen by counting the old path's
entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

import connector.smtp.content
from tests.integration.conftest import Setup, strip_trace

pytestmark = pytest.mark.integration

BIG_LINE = b"QUJD" * 19 + b"\r\n"


def test_messages_arrive_byte_for_byte_and_mostly_unscanned(
    setup_factory: Callable[..., Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    old_path: list[bytes] = []
    prepare_content = connector.smtp.content.prepare_content

    def counting(parts: Sequence[bytes]) -> tuple[tuple[bytes, ...], int]:
        old_path.append(parts[-1])
        return prepare_content(parts)

    monkeypatch.setattr(connector.smtp.content, "prepare_content", counting)
    # The in-memory paths, the 20 MiB messages included (by default they would be spooled:
    # tests/integration/test_spool.py).
    s = setup_factory(service_extra='spool_threshold = "64MiB"')
    # (stored in the Maildir, received by the SMTP server after our trace line, old path?)
    cases: list[tuple[bytes, bytes, bool]] = [
        (b"Subject: plain\r\n\r\nbody\r\n", b"", False),
        (b"Subject: dots\r\n\r\n.\r\n..\r\n.middle\r\n...\r\nend\r\n.\r\n", b"", False),
        (b"Subject: dot at the end\r\n\r\nx\r\n.", b"\r\n", False),  # POP3 adds the CRLF
        ("Subject: Grüße\r\n\r\n8-bit: äöü\r\n".encode(), b"", False),
        (b"Subject: no final newline\r\n\r\nlast", b"\r\n", False),
        (b"Subject: bare LF\n\n.dot\nx\n", b"", False),  # Dovecot sends CRLF
        (b".first line is a dot\r\n\r\nx\r\n", b"", True),  # Dovecot leaves line 1 unstuffed
        (b"..two dots first\r\n\r\nx\r\n", b"", True),
        (b".\r\n", b"", True),  # a "." only message
        # Stuffed and over WIRE_COPY_LIMIT: re-stuffed from raw rather than kept twice.
        (b"Subject: 20 MiB\r\n\r\n" + (BIG_LINE * 4096 + b".\r\n..x\r\n") * 80, b"", True),
        (b"Subject: 20 MiB, no dots\r\n\r\n" + BIG_LINE * 4096 * 80, b"", False),
    ]
    s.dovecot.deliver_many(s.user, [stored for stored, _, _ in cases])

    assert s.run("once") == 0

    got = [strip_trace(m.data) for m in s.received()]
    expected = [
        stored.replace(b"\n", b"\r\n") if b"\r" not in stored else stored for stored, *_ in cases
    ]
    expected = [e + added for e, (_, added, _) in zip(expected, cases, strict=True)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g == e  # one by one: a 20 MiB diff is unreadable
    assert sorted(old_path) == sorted(
        e for e, (_, _, old) in zip(expected, cases, strict=True) if old
    )
    assert s.upstream() == []


def test_a_lone_cr_takes_the_old_path(
    setup_factory: Callable[..., Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    old_path: list[bytes] = []
    prepare_content = connector.smtp.content.prepare_content

    def counting(parts: Sequence[bytes]) -> tuple[tuple[bytes, ...], int]:
        old_path.append(parts[-1])
        return prepare_content(parts)

    monkeypatch.setattr(connector.smtp.content, "prepare_content", counting)
    s = setup_factory()
    stored = b"Subject: lone CR\r\n\r\nx\ry\r\n"
    s.dovecot.deliver_many(s.user, [stored, b"Subject: clean\r\n\r\n.x\r\n"])

    assert s.run("once") == 0

    # The lone CR is normalised as aiosmtplib always did (RFC 5321 §2.3.8); nothing else is.
    assert [strip_trace(m.data) for m in s.received()] == [
        b"Subject: lone CR\r\n\r\nx\r\ny\r\n",
        b"Subject: clean\r\n\r\n.x\r\n",
    ]
    assert old_path == [stored]
