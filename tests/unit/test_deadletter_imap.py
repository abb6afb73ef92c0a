"""connector.deadletter.imap without a server: mailbox names (modified UTF-7, quoting,
separators), what the constructor refuses, and dead-letter ids.  Against Dovecot:
tests/integration/test_deadletter_imap.py; against a scripted server, for the faults Dovecot will
not produce: tests/component/test_deadletter_imap.py.
"""

from __future__ import annotations

import inspect
import time

import aioimaplib
import pytest

from connector.deadletter.imap import (
    ImapStore,
    _search_uids,
    make_id,
    parse_id,
)
from connector.tls import TlsMode

DEFAULT_FOLDER = "POP3 Connector/Dead Letters"


@pytest.mark.parametrize("folder", ["", "/a", "a/", "a//b", "a\r\nb", "a\0"])
def test_bad_folder_names_are_refused_at_construction(folder: str) -> None:
    with pytest.raises(ValueError, match="folder name"):
        ImapStore("h", 993, TlsMode.IMPLICIT, None, "u", "p", folder)


def test_starttls_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="STARTTLS"):
        ImapStore("h", 143, TlsMode.STARTTLS, None, "u", "p", DEFAULT_FOLDER)


def test_ids_round_trip_and_bad_ids_are_unknown() -> None:
    assert parse_id(make_id(1795823030, 17)) == (1795823030, 17)
    for bad in ("", "imap:1:0", "imap:1", "imap:x:1", "1:2", "imap:1:2:3", "imap:unknown"):
        with pytest.raises(KeyError):
            parse_id(bad)


# The SEARCH answer (its pattern backtracked exponentially once).
@pytest.mark.parametrize(
    ("line", "uids"),
    [
        (b"3 7", [3, 7]),
        (b"SEARCH 3 7", [3, 7]),
        (b"", []),
        (b"3 x", []),
        (b"1" * 40 + b"x", []),
    ],
)
def test_search_uids(line: bytes, uids: list[int]) -> None:
    assert _search_uids(line) == uids


def test_search_answer_of_digits_is_linear() -> None:
    start = time.perf_counter()
    assert _search_uids(b"1" * 100_000 + b"x") == []
    assert time.perf_counter() - start < 0.05


# --------------------------------------------------------------------------------------------
# aioimaplib's insides that the streamed APPEND relies on
# --------------------------------------------------------------------------------------------
# What the IMAP store's streamed APPEND takes from aioimaplib's insides
# (connector/deadletter/imap.py, ``_Session.streaming``; docs/design.md §5.3): this fails,
# naming the piece, when an aioimaplib release changes one of them (``pyproject.toml`` pins it).


AIOIMAPLIB_PROTOCOL = aioimaplib.IMAP4ClientProtocol


def test_append_sends_the_literals_length_and_keeps_the_data_for_the_continuation() -> None:
    # append() writes "{len(message)}" and leaves the bytes in literal_data, which
    # _continuation() writes when the server's "+" comes: streaming() gives append() a
    # stand-in with only a length and answers that continuation itself.
    source = inspect.getsource(AIOIMAPLIB_PROTOCOL.append)
    assert "len(message_bytes)" in source, "IMAP4ClientProtocol.append: the literal's {n}"
    assert "self.literal_data = message_bytes" in source, "IMAP4ClientProtocol.literal_data"


def test_the_continuation_is_dispatched_by_the_pending_sync_command() -> None:
    source = inspect.getsource(AIOIMAPLIB_PROTOCOL._continuation)
    assert "self.pending_sync_command" in source, "IMAP4ClientProtocol.pending_sync_command"
    assert "'APPEND'" in source or '"APPEND"' in source
    assert "self.literal_data" in source
    # Called as a method of the instance, so that an instance attribute shadows it.
    handler = inspect.getsource(AIOIMAPLIB_PROTOCOL)
    assert "self._continuation(" in handler, "IMAP4ClientProtocol._continuation call"


def test_the_protocol_takes_flow_control_from_the_transport() -> None:
    # pause_writing/resume_writing are asyncio.BaseProtocol's hooks; aioimaplib does not
    # define its own, so the instance attributes streaming() sets are the ones called.
    assert "pause_writing" not in vars(AIOIMAPLIB_PROTOCOL)
    assert "resume_writing" not in vars(AIOIMAPLIB_PROTOCOL)
