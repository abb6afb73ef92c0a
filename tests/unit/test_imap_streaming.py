"""What the IMAP store's streamed APPEND takes from aioimaplib's insides
(connector/deadletter/imap.py, ``_Session.streaming``; docs/design.md §5.3): this fails, naming
the piece, when an aioimaplib release changes one of them (``pyproject.toml`` pins it)."""

from __future__ import annotations

import inspect

import aioimaplib

PROTOCOL = aioimaplib.IMAP4ClientProtocol


def test_append_sends_the_literals_length_and_keeps_the_data_for_the_continuation() -> None:
    # append() writes "{len(message)}" and leaves the bytes in literal_data, which
    # _continuation() writes when the server's "+" comes: streaming() gives append() a
    # stand-in with only a length and answers that continuation itself.
    source = inspect.getsource(PROTOCOL.append)
    assert "len(message_bytes)" in source, "IMAP4ClientProtocol.append: the literal's {n}"
    assert "self.literal_data = message_bytes" in source, "IMAP4ClientProtocol.literal_data"


def test_the_continuation_is_dispatched_by_the_pending_sync_command() -> None:
    source = inspect.getsource(PROTOCOL._continuation)
    assert "self.pending_sync_command" in source, "IMAP4ClientProtocol.pending_sync_command"
    assert "'APPEND'" in source or '"APPEND"' in source
    assert "self.literal_data" in source
    # Called as a method of the instance, so that an instance attribute shadows it.
    handler = inspect.getsource(PROTOCOL)
    assert "self._continuation(" in handler, "IMAP4ClientProtocol._continuation call"


def test_the_protocol_takes_flow_control_from_the_transport() -> None:
    # pause_writing/resume_writing are asyncio.BaseProtocol's hooks; aioimaplib does not
    # define its own, so the instance attributes streaming() sets are the ones called.
    assert "pause_writing" not in vars(PROTOCOL)
    assert "resume_writing" not in vars(PROTOCOL)
