"""Servers that do not dot-stuff a message's first line (Dovecot 2.3, seen on the wire).

RFC 1939 §3 says every line starting with "." is stuffed; Dovecot skips the first line.  RETR's
"+OK <octets>" tells the readings apart; without a count the RFC reading stands.
"""

from __future__ import annotations

import pytest

from connector.errors import Pop3ProtocolError
from connector.pop3.protocol import Command, Connection, Message, Ok, Verb


def retr(reply: bytes) -> Message:
    conn = Connection()
    conn.receive_data(b"+OK hi\r\n")
    conn.next_event()
    for verb, arg in ((Verb.USER, "u"), (Verb.PASS, "p")):
        conn.send(Command(verb, (arg,)))
        conn.receive_data(b"+OK\r\n")
        assert isinstance(conn.next_event(), Ok)
    conn.send(Command(Verb.RETR, (1,)))
    for i in range(len(reply)):  # byte by byte: the decision must not depend on chunking
        conn.receive_data(reply[i : i + 1])
    event = conn.next_event()
    assert isinstance(event, Message)
    return event


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"+OK 3 octets\r\n.\r\n.\r\n", b".\r\n"),  # Dovecot: a message that is only "."
        (b"+OK 6 octets\r\n.\r\n..\r\n.\r\n", b".\r\n.\r\n"),
        (b"+OK 10 octets\r\n..two\r\nx\r\n.\r\n", b"..two\r\nx\r\n"),  # unstuffed first line
        (b"+OK 9 octets\r\n..two\r\nx\r\n.\r\n", b".two\r\nx\r\n"),  # properly stuffed
        (b"+OK 11 octets\r\n.foo\r\nbar\r\n.\r\n", b".foo\r\nbar\r\n"),
        (b"+OK message follows\r\n..two\r\n.\r\n", b".two\r\n"),  # no count: RFC reading
        # Stored without a final line end: counted as stored, sent with a CRLF added.
        (b"+OK 1 octets\r\n.\r\n.\r\n", b".\r\n"),
        (b"+OK 3 octets\r\n..x\r\n.\r\n", b"..x\r\n"),
        (b"+OK 0 octets\r\n.\r\n", b""),
        (b"+OK\r\n.\r\n", b""),
    ],
)
def test_first_line_readings(wire: bytes, message: bytes) -> None:
    assert retr(wire).raw == message


def test_a_dot_first_line_that_does_not_add_up_is_refused() -> None:
    with pytest.raises(Pop3ProtocolError):
        retr(b"+OK 50 octets\r\n.\r\nx\r\n.\r\n")
