"""The sans-I/O POP3 core: tables of server bytes and the events they must produce (h11 style).

Every table case runs three ways: all bytes at once, one byte at a time, and followed by the
start of another reply that must stay in the buffer.  No sockets, no event loop.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import connector.pop3.protocol as protocol
from connector.errors import Pop3ConnectionError, Pop3ProtocolError
from connector.pop3.protocol import (
    MAX_LINE,
    NEED_DATA,
    STREAM_CHUNK,
    TRANSITIONS,
    Capabilities,
    Closed,
    Command,
    Connection,
    Continuation,
    Err,
    Event,
    Greeting,
    Listing,
    LocalProtocolError,
    Message,
    MessageChunk,
    MessageEnd,
    NeedData,
    Ok,
    State,
    Verb,
    apop_digest,
    parse_scan_line,
    parse_stat,
    retr_cap,
    sasl_plain,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def drain(conn: Connection) -> list[Event]:
    """Every event the buffer holds now."""
    events: list[Event] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        assert not isinstance(ev, type(NEED_DATA))
        events.append(ev)
    return events


def greeted(max_message_size: int = 1 << 20) -> Connection:
    conn = Connection(max_message_size=max_message_size)
    conn.receive_data(b"+OK ready\r\n")
    assert drain(conn) == [Greeting("ready", None)]
    return conn


def logged_in(max_message_size: int = 1 << 20) -> Connection:
    conn = greeted(max_message_size)
    conn.send(Command(Verb.USER, ("alice",)))
    conn.send(Command(Verb.PASS, ("pw",)))
    conn.receive_data(b"+OK\r\n+OK logged in\r\n")
    assert drain(conn) == [Ok(""), Ok("logged in")]
    assert conn.state is State.TRANSACTION
    return conn


def setup(state: State, cmds: list[Command]) -> Connection:
    conn = logged_in() if state is State.TRANSACTION else greeted()
    for cmd in cmds:
        conn.send(cmd)
    return conn


TRAILER = b"+OK partial rep"  # the start of the next reply: must stay in the buffer


def run_whole(state: State, cmds: list[Command], data: bytes) -> list[Event]:
    conn = setup(state, cmds)
    conn.receive_data(data)
    return drain(conn)


def run_bytewise(state: State, cmds: list[Command], data: bytes) -> list[Event]:
    conn = setup(state, cmds)
    events: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events += drain(conn)
    return events


def run_trailing(state: State, cmds: list[Command], data: bytes) -> list[Event]:
    conn = setup(state, cmds)
    conn.receive_data(data + TRAILER)
    events: list[Event] = []
    while conn.pending and (ev := conn.next_event()) is not NEED_DATA:
        assert not isinstance(ev, type(NEED_DATA))
        events.append(ev)
    assert conn.buffered == len(TRAILER)
    if not conn.pending:
        conn.send(Command(Verb.CAPA))  # the trailer becomes the start of its reply
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == len(TRAILER)
    return events


RUNNERS = [run_whole, run_bytewise, run_trailing]

T, A = State.TRANSACTION, State.AUTHORIZATION


def C(verb: Verb, *args: str | int) -> Command:
    return Command(verb, args)


MSG = b"From: a@example\r\nSubject: x\r\n\r\nbody\r\n"

# (id, state, commands, server bytes, expected events)
CASES: list[tuple[str, State, list[Command], bytes, list[Event]]] = [
    ("stat", T, [C(Verb.STAT)], b"+OK 2 320\r\n", [Ok("2 320")]),
    ("noop-bare-ok", T, [C(Verb.NOOP)], b"+OK\r\n", [Ok("")]),
    ("bare-lf-status", T, [C(Verb.NOOP)], b"+OK fine\n", [Ok("fine")]),
    ("dele", T, [C(Verb.DELE, 1)], b"+OK message 1 deleted\r\n", [Ok("message 1 deleted")]),
    ("retr", T, [C(Verb.RETR, 1)], b"+OK 37 octets\r\n" + MSG + b".\r\n", [Message(MSG)]),
    ("retr-empty", T, [C(Verb.RETR, 1)], b"+OK 0 octets\r\n.\r\n", [Message(b"")]),
    (
        "retr-dot-stuffed",
        T,
        [C(Verb.RETR, 1)],
        b"+OK\r\n..first\r\nmid\r\n..\r\n...\r\n..x.\r\n.\r\n",
        [Message(b".first\r\nmid\r\n.\r\n..\r\n.x.\r\n")],
    ),
    (
        "retr-unstuffed-dot-tolerated",  # ".x" should have been "..x"; kept as sent (poplib)
        T,
        [C(Verb.RETR, 1)],
        b"+OK\r\n.x\r\n.\r\n",
        [Message(b".x\r\n")],
    ),
    (
        "retr-bare-lf",
        T,
        [C(Verb.RETR, 1)],
        b"+OK\nSubject: a\n\n..dot\nend\n.\n",
        [Message(b"Subject: a\r\n\r\n.dot\r\nend\r\n")],
    ),
    (
        "retr-mixed-line-ends",
        T,
        [C(Verb.RETR, 1)],
        b"+OK\r\na\r\nb\n..c\r\n.\r\n",
        [Message(b"a\r\nb\r\n.c\r\n")],
    ),
    (
        "retr-lone-cr-kept",
        T,
        [C(Verb.RETR, 1)],
        b"+OK\r\na\rb\r\n.\r\n",
        [Message(b"a\rb\r\n")],
    ),
    (
        "retr-dot-cr-not-terminator",
        T,
        [C(Verb.RETR, 1)],
        b"+OK\r\n.\rx\r\n.\r\n",
        [Message(b".\rx\r\n")],
    ),
    (
        "top",
        T,
        [C(Verb.TOP, 1, 0)],
        b"+OK\r\nSubject: x\r\n\r\n.\r\n",
        [Message(b"Subject: x\r\n\r\n")],
    ),
    (
        "retr-err-is-one-line",
        T,
        [C(Verb.RETR, 9), C(Verb.NOOP)],
        b"-ERR no such message\r\n+OK\r\n",
        [Err("no such message", None), Ok("")],
    ),
    ("err-bare", T, [C(Verb.NOOP)], b"-ERR\r\n", [Err("", None)]),
    ("err-in-use", A, [C(Verb.PASS, "pw")], b"-ERR [IN-USE] locked\r\n", [Err("locked", "IN-USE")]),
    (
        "err-sys-temp",
        A,
        [C(Verb.PASS, "pw")],
        b"-ERR [SYS/TEMP] Temporary failure. [host:2026]\r\n",
        [Err("Temporary failure. [host:2026]", "SYS/TEMP")],
    ),
    ("err-code-lowercase", A, [C(Verb.USER, "x")], b"-ERR [auth] no\r\n", [Err("no", "AUTH")]),
    (
        "err-broken-code",
        T,
        [C(Verb.NOOP)],
        b"-ERR [IN-USE no close\r\n",
        [Err("[IN-USE no close", None)],
    ),
    (
        "uidl",
        T,
        [C(Verb.UIDL)],
        b"+OK\r\n1 000000016b0a144d\r\n2 whqtswO00WBw418f9t5JxYwZ\r\n.\r\n",
        [Listing("", ((1, "000000016b0a144d"), (2, "whqtswO00WBw418f9t5JxYwZ")))],
    ),
    ("uidl-empty", T, [C(Verb.UIDL)], b"+OK\r\n.\r\n", [Listing("", ())]),
    ("uidl-one", T, [C(Verb.UIDL, 2)], b"+OK 2 abc\r\n", [Ok("2 abc")]),
    (
        "list",
        T,
        [C(Verb.LIST)],
        b"+OK 2 messages (320 octets)\r\n1 120\r\n2 200\r\n.\r\n",
        [Listing("2 messages (320 octets)", ((1, "120"), (2, "200")))],
    ),
    ("list-one", T, [C(Verb.LIST, 1)], b"+OK 1 120\r\n", [Ok("1 120")]),
    (
        "capa",
        A,
        [C(Verb.CAPA)],
        b"+OK\r\nTOP\r\nUIDL\r\nsasl PLAIN LOGIN\r\nPIPELINING\r\n\r\n.\r\n",
        [
            Capabilities(
                (("TOP", ()), ("UIDL", ()), ("SASL", ("PLAIN", "LOGIN")), ("PIPELINING", ()))
            )
        ],
    ),
    (
        "pipelined",
        T,
        [C(Verb.RETR, 1), C(Verb.RETR, 2), C(Verb.DELE, 1), C(Verb.UIDL)],
        b"+OK\r\none\r\n.\r\n+OK\r\n..two\r\n.\r\n+OK\r\n+OK\r\n1 a\r\n.\r\n",
        [Message(b"one\r\n"), Message(b".two\r\n"), Ok(""), Listing("", ((1, "a"),))],
    ),
    (
        "user-pass-pipelined",
        A,
        [C(Verb.USER, "alice"), C(Verb.PASS, "a pass word")],
        b"+OK\r\n+OK Logged in.\r\n",
        [Ok(""), Ok("Logged in.")],
    ),
    ("auth-challenge", A, [C(Verb.AUTH, "PLAIN")], b"+ \r\n", [Continuation("")]),
    ("auth-ok-with-ir", A, [C(Verb.AUTH, "PLAIN", "AGEAYg==")], b"+OK\r\n", [Ok("")]),
]


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda r: r.__name__)
@pytest.mark.parametrize(
    ("state", "cmds", "data", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_replies(
    runner: object, state: State, cmds: list[Command], data: bytes, expected: list[Event]
) -> None:
    assert callable(runner)
    assert runner(state, cmds, data) == expected


# ---------------------------------------------------------------------------------------------
# Message.wire: the body as received, only when it is SMTP's DATA content of Message.raw
# ---------------------------------------------------------------------------------------------

# (id, body as the server sends it before the terminator, raw, whether wire is the body)
WIRE_CASES: list[tuple[str, bytes, bytes, bool]] = [
    ("no-dots", b"a\r\nb\r\n", b"a\r\nb\r\n", True),
    ("stuffed-dot-line", b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n", True),
    ("stuffed-two-dots", b"a\r\n...\r\n", b"a\r\n..\r\n", True),  # "\r\n..." is one "\r\n.."
    ("stuffed-dot-x", b"a\r\n..x\r\n....y\r\n", b"a\r\n.x\r\n...y\r\n", True),
    # A "." line stuffed as ".." right before the terminator, twice in a row.
    ("stuffed-dot-last", b"a\r\n..\r\n..\r\n", b"a\r\n.\r\n.\r\n", True),
    # A non-conforming server: ".x" not stuffed.  Kept as sent (poplib, "retr-unstuffed-dot-
    # tolerated"), so the body is not DATA's content of raw: SMTP would strip that dot.
    ("unstuffed-dot-x", b"a\r\n.x\r\n", b"a\r\n.x\r\n", False),
    ("unstuffed-after-stuffed", b"a\r\n..\r\n.x\r\n", b"a\r\n.\r\n.x\r\n", False),
    ("unstuffed-before-stuffed", b"a\r\n.x\r\n..y\r\n", b"a\r\n.x\r\n.y\r\n", False),
    ("unstuffed-dot-space", b"a\r\n. \r\n", b"a\r\n. \r\n", False),
    ("unstuffed-last-line", b"a\r\n" * 50 + b".end\r\n", b"a\r\n" * 50 + b".end\r\n", False),
]


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda r: r.__name__)
@pytest.mark.parametrize(
    ("body", "raw", "forwarded"), [c[1:] for c in WIRE_CASES], ids=[c[0] for c in WIRE_CASES]
)
def test_wire_only_when_every_dot_line_came_stuffed(
    runner: object, body: bytes, raw: bytes, forwarded: bool
) -> None:
    assert callable(runner)
    for status in (b"+OK\r\n", b"+OK %d octets\r\n" % len(raw)):
        events = runner(T, [C(Verb.RETR, 1)], status + body + b".\r\n")
        assert events == [Message(raw)]
        assert isinstance(events[0], Message)
        assert events[0].wire == (body if forwarded else None)


# ---------------------------------------------------------------------------------------------
# greetings, states, transitions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"+OK Dovecot (Debian) ready.\r\n", Greeting("Dovecot (Debian) ready.", None)),
        (
            b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n",
            Greeting(
                "POP3 server ready <1896.697170952@dbc.mtview.ca.us>",
                "<1896.697170952@dbc.mtview.ca.us>",
            ),
        ),
        (b"+OK\n", Greeting("", None)),
    ],
)
def test_greeting(data: bytes, expected: Greeting) -> None:
    for chunk in (len(data), 1):
        conn = Connection()
        events: list[Event] = []
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i : i + chunk])
            events += drain(conn)
        assert events == [expected]
        assert conn.state is State.AUTHORIZATION
        assert conn.pending == ()


def test_err_greeting_closes() -> None:
    conn = Connection()
    conn.receive_data(b"-ERR [SYS/TEMP] too many connections\r\n")
    assert drain(conn) == [Err("too many connections", "SYS/TEMP")]
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(C(Verb.CAPA))


def test_commands_may_be_queued_before_the_greeting() -> None:
    conn = Connection()
    conn.send(C(Verb.CAPA))
    conn.receive_data(b"+OK hi\r\n+OK\r\nUSER\r\n.\r\n")
    assert drain(conn) == [Greeting("hi", None), Capabilities((("USER", ()),))]


def sample(verb: Verb) -> Command:
    """A well-formed command for each verb."""
    args: dict[Verb, tuple[str | int, ...]] = {
        Verb.USER: ("alice",),
        Verb.PASS: ("pw",),
        Verb.APOP: ("alice", "c4c9334bac560ecc979e58001b3e22fb"),
        Verb.AUTH: ("PLAIN",),
        Verb.LIST: (1,),
        Verb.UIDL: (1,),
        Verb.RETR: (1,),
        Verb.TOP: (1, 0),
        Verb.DELE: (1,),
    }
    return Command(verb, args.get(verb, ()))


def in_state(state: State) -> Connection:
    match state:
        case State.AUTHORIZATION:
            return greeted()
        case State.TRANSACTION:
            return logged_in()
        case State.UPDATE:
            conn = logged_in()
            conn.send(C(Verb.QUIT))
            return conn
        case State.CLOSED:
            conn = logged_in()
            conn.send(C(Verb.QUIT))
            conn.receive_data(b"+OK bye\r\n")
            drain(conn)
            return conn
        case State.ERROR:
            conn = logged_in()
            conn.send(C(Verb.NOOP))
            conn.receive_data(b"garbage\r\n")
            with pytest.raises(Pop3ProtocolError):
                conn.next_event()
            return conn


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("verb", list(Verb), ids=lambda v: v.value)
def test_state_table(state: State, verb: Verb) -> None:
    conn = in_state(state)
    assert conn.state is state
    if verb in TRANSITIONS[state]:
        assert conn.send(sample(verb)) == sample(verb).to_bytes()
    else:
        with pytest.raises(LocalProtocolError):
            conn.send(sample(verb))


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(
    ("start", "verb", "reply", "after"),
    [
        (A, Verb.PASS, b"+OK\r\n", T),
        (A, Verb.PASS, b"-ERR [AUTH] no\r\n", A),
        (A, Verb.APOP, b"+OK\r\n", T),
        (A, Verb.APOP, b"-ERR\r\n", A),
        (A, Verb.USER, b"+OK\r\n", A),
        (A, Verb.STLS, b"+OK begin TLS\r\n", A),
        (A, Verb.QUIT, b"+OK bye\r\n", State.CLOSED),
        (T, Verb.QUIT, b"+OK bye\r\n", State.CLOSED),
        (T, Verb.QUIT, b"-ERR some deleted messages not removed\r\n", State.CLOSED),
        (T, Verb.RSET, b"+OK\r\n", T),
        (T, Verb.CAPA, b"+OK\r\n.\r\n", T),
    ],
)
def test_transitions(start: State, verb: Verb, reply: bytes, after: State) -> None:
    conn = in_state(start)
    conn.send(sample(verb))
    conn.receive_data(reply)
    assert len(drain(conn)) == 1
    assert conn.state is after


def test_quit_from_transaction_shows_update_until_the_reply() -> None:
    conn = logged_in()
    conn.send(C(Verb.QUIT))
    states = [conn.state]
    conn.receive_data(b"+OK Logging out, messages deleted.\r\n")
    assert drain(conn) == [Ok("Logging out, messages deleted.")]
    states.append(conn.state)
    assert states == [State.UPDATE, State.CLOSED]
    conn.receive_data(b"")
    assert conn.next_event() == Closed()


@pytest.mark.parametrize("verb", [Verb.PASS, Verb.APOP, Verb.AUTH, Verb.STLS, Verb.QUIT])
def test_nothing_is_pipelined_behind_an_exclusive_command(verb: Verb) -> None:
    conn = greeted()
    conn.send(sample(verb))
    with pytest.raises(LocalProtocolError):
        conn.send(C(Verb.CAPA))


def test_sasl_exchange() -> None:
    conn = greeted()
    conn.send(C(Verb.AUTH, "PLAIN"))
    with pytest.raises(LocalProtocolError):
        conn.send_sasl_response("x")  # no challenge yet
    conn.receive_data(b"+ \r\n")
    assert drain(conn) == [Continuation("")]
    conn.receive_data(b"+OK Logged in.\r\n")
    assert conn.next_event() is NEED_DATA  # the server is waiting for us, not answering
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        conn.send_sasl_response("a\r\nQUIT")
    assert conn.send_sasl_response("AHUAcA==") == b"AHUAcA==\r\n"
    assert drain(conn) == [Ok("Logged in.")]
    assert conn.state is State.TRANSACTION


def test_sasl_cancel() -> None:
    conn = greeted()
    conn.send(C(Verb.AUTH, "PLAIN"))
    conn.receive_data(b"+ \r\n")
    drain(conn)
    assert conn.send_sasl_response("*") == b"*\r\n"
    conn.receive_data(b"-ERR [AUTH] Authentication cancelled\r\n")
    assert drain(conn) == [Err("Authentication cancelled", "AUTH")]
    assert conn.state is State.AUTHORIZATION


def test_continuation_outside_auth_is_a_protocol_error() -> None:
    conn = logged_in()
    conn.send(C(Verb.NOOP))
    conn.receive_data(b"+ hi\r\n")
    with pytest.raises(Pop3ProtocolError):
        conn.next_event()


def test_eof_when_idle_is_closed() -> None:
    conn = logged_in()
    conn.receive_data(b"")
    assert conn.next_event() == Closed()
    assert conn.state is State.CLOSED
    conn.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"late")


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "args"),
    [
        (Verb.USER, ("a\r\nDELE 1",)),
        (Verb.USER, ("a\nb",)),
        (Verb.PASS, ("pw\r",)),
        (Verb.PASS, ("p\x00w",)),
        (Verb.USER, ("two words",)),
        (Verb.USER, ("",)),
        (Verb.USER, ()),
        (Verb.RETR, ()),
        (Verb.RETR, ("1", "2")),
        (Verb.RETR, ("one",)),
        (Verb.RETR, (-1,)),
        (Verb.TOP, (1,)),
        (Verb.STAT, ("x",)),
        (Verb.DELE, ("\u0661",)),  # ARABIC-INDIC DIGIT ONE: isdigit(), but not ASCII
    ],
)
def test_bad_commands_are_refused(verb: Verb, args: tuple[str | int, ...]) -> None:
    with pytest.raises(ValueError, match=verb.value):
        Command(verb, args)


def test_command_bytes() -> None:
    assert C(Verb.RETR, 12).to_bytes() == b"RETR 12\r\n"
    assert C(Verb.PASS, "pass with spaces").to_bytes() == b"PASS pass with spaces\r\n"
    assert C(Verb.TOP, 3, 0).to_bytes() == b"TOP 3 0\r\n"
    assert C(Verb.USER, "jörg").to_bytes() == "USER jörg\r\n".encode()


# ---------------------------------------------------------------------------------------------
# servers that do not dot-stuff a message's first line (Dovecot 2.3, seen on the wire): RFC 1939 §3
# says every line starting with "." is stuffed; Dovecot skips the first line.  RETR's "+OK <octets>"
# tells the readings apart; without a count the RFC reading stands.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# caps and protocol errors
# ---------------------------------------------------------------------------------------------


def test_long_lines_inside_a_message_are_fine() -> None:
    line = b"x" * 200_000
    conn = logged_in()
    conn.send(C(Verb.RETR, 1))
    data = b"+OK\r\n" + line + b"\r\n" + b".." + line + b"\r\n.\r\n"
    for i in range(0, len(data), 65536):
        conn.receive_data(data[i : i + 65536])
    assert drain(conn) == [Message(line + b"\r\n." + line + b"\r\n")]


@pytest.mark.parametrize("chunk", [7, 65536, 10**9])
def test_message_over_the_cap_is_refused_never_truncated(chunk: int) -> None:
    conn = logged_in(max_message_size=1000)
    conn.send(C(Verb.RETR, 1))
    data = b"+OK\r\n" + b"y" * 78 + b"\r\n" * 20 + b"z" * 1000 + b"\r\n.\r\n"

    def feed() -> None:
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i : i + chunk])
            drain(conn)

    with pytest.raises(Pop3ProtocolError, match="1000 octets"):
        feed()
    assert conn.state is State.ERROR


def test_message_at_the_cap_is_accepted() -> None:
    body = b"a" * 998 + b"\r\n"
    conn = logged_in(max_message_size=1000)
    conn.send(C(Verb.RETR, 1))
    conn.receive_data(b"+OK\r\n" + body + b".\r\n")
    assert drain(conn) == [Message(body)]


def protocol_error(state: State, cmds: list[Command], data: bytes, match: str) -> None:
    conn = setup(state, cmds)
    conn.receive_data(data)
    with pytest.raises(Pop3ProtocolError, match=match):
        drain(conn)
    assert conn.state is State.ERROR
    with pytest.raises(Pop3ProtocolError):
        conn.next_event()  # stays broken
    with pytest.raises(LocalProtocolError):
        conn.send(C(Verb.NOOP))


@pytest.mark.parametrize(
    ("cmds", "data", "match"),
    [
        ([C(Verb.NOOP)], b"HELLO\r\n", "does not start"),
        ([C(Verb.NOOP)], b"+OKAY\r\n", "does not start"),
        ([C(Verb.NOOP)], b"-ERRNO\r\n", "does not start"),
        ([C(Verb.NOOP)], b"+OK " + b"x" * MAX_LINE, "status line longer"),
        ([C(Verb.NOOP)], b"+OK " + b"x" * MAX_LINE + b"\r\n", "status line longer"),
        ([], b"+OK surprise\r\n", "no command asked"),
        ([C(Verb.UIDL)], b"+OK\r\n1 a\r\n2 a\r\n.\r\n", "listed twice"),
        ([C(Verb.UIDL)], b"+OK\r\n1 a\r\n1 b\r\n.\r\n", "listed twice"),
        ([C(Verb.UIDL)], b"+OK\r\n0 a\r\n.\r\n", "invalid"),
        ([C(Verb.UIDL)], b"+OK\r\n1\r\n.\r\n", "malformed"),
        ([C(Verb.UIDL)], b"+OK\r\nx a\r\n.\r\n", "malformed"),
        ([C(Verb.UIDL)], b"+OK\r\n1 " + b"u" * 71 + b"\r\n.\r\n", "unique-id"),
        ([C(Verb.UIDL)], b"+OK\r\n1 a\xffb\r\n.\r\n", "unique-id"),
        ([C(Verb.LIST)], b"+OK\r\n1 big\r\n.\r\n", "not a number"),
        ([C(Verb.LIST)], b"+OK\r\n1 " + b"9" * MAX_LINE + b"\r\n.\r\n", "listing line"),
    ],
)
def test_protocol_errors(cmds: list[Command], data: bytes, match: str) -> None:
    protocol_error(T, cmds, data, match)


def test_data_behind_the_stls_reply_is_refused() -> None:
    # CVE-2011-0411: plaintext injected after "+OK" must not be read as if it came over TLS.
    protocol_error(A, [C(Verb.STLS)], b"+OK begin\r\n+OK injected\r\n", "STLS")


def test_stls_reply_alone_is_fine() -> None:
    conn = setup(A, [C(Verb.STLS)])
    conn.receive_data(b"+OK Begin TLS negotiation now.\r\n")
    assert drain(conn) == [Ok("Begin TLS negotiation now.")]
    assert conn.buffered == 0


@pytest.mark.parametrize(
    "data", [b"", b"+OK", b"+OK\r\n", b"+OK\r\npartial\r\n", b"+OK\r\nbody\r\n.", b"+OK\r\n.\r"]
)
def test_eof_in_the_middle_of_a_reply(data: bytes) -> None:
    conn = setup(T, [C(Verb.RETR, 1)])
    conn.receive_data(data)
    conn.receive_data(b"")
    with pytest.raises(Pop3ConnectionError, match="middle of a reply"):
        drain(conn)
    assert conn.state is State.ERROR


def test_bad_max_message_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        Connection(max_message_size=0)


# ---------------------------------------------------------------------------------------------
# the core stays sans-I/O (docs/design.md §2): importing it pulls in no network or loop
# ---------------------------------------------------------------------------------------------


FORBIDDEN = ("asyncio", "socket", "ssl", "selectors")


def test_fresh_interpreter_imports_no_io_modules() -> None:
    code = (
        "import sys\n"
        "import connector.pop3.protocol\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    # -I: isolated mode, so no sitecustomize or user site can import asyncio behind our back.
    # Without coverage.py's variables: under scripts/test it would start in the child (pyproject's
    # patch = ["subprocess"]) and import socket itself.
    fresh = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, env=fresh
    )
    assert out.stdout.strip() == "[]"


def test_protocol_imports_only_stdlib_and_errors() -> None:
    tree = ast.parse(Path(protocol.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    local = {name for name in imported if name.split(".")[0] == "connector"}
    # _scan: the C helper of _unstuff (no I/O, no imports of its own).
    assert local == {"connector.errors", "connector.pop3._scan"}
    third_party = {
        name
        for name in imported - local
        if name.split(".")[0] not in sys.stdlib_module_names and name != "__future__"
    }
    assert third_party == set()
    assert not {name.split(".")[0] for name in imported} & set(FORBIDDEN)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def test_parse_stat() -> None:
    assert parse_stat("2 320") == (2, 320)
    assert parse_stat("0 0 extra words") == (0, 0)
    for bad in ("", "2", "two 320", "2 -1"):
        with pytest.raises(Pop3ProtocolError):
            parse_stat(bad)


def test_parse_scan_line() -> None:
    assert parse_scan_line("2 abc") == (2, "abc")
    for bad in ("", "2", "x abc"):
        with pytest.raises(Pop3ProtocolError):
            parse_scan_line(bad)


def test_apop_digest_rfc1939_example() -> None:
    # RFC 1939 §7, the worked example.
    stamp = "<1896.697170952@dbc.mtview.ca.us>"
    assert apop_digest(stamp, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"


def test_sasl_plain_rfc4616() -> None:
    assert sasl_plain("tim", "tanstaaftanstaaf") == "AHRpbQB0YW5zdGFhZnRhbnN0YWFm"
    assert sasl_plain("tim", "x", authzid="Ursel") == "VXJzZWwAdGltAHg="
    with pytest.raises(ValueError, match="NUL"):
        sasl_plain("a\0b", "x")


def test_capabilities_as_dict() -> None:
    caps = Capabilities((("SASL", ("PLAIN",)), ("TOP", ()), ("SASL", ("LOGIN",))))
    assert caps.as_dict() == {"SASL": ["LOGIN"], "TOP": []}


# --------------------------------------------------------------------------------------------
# RETR in streaming mode (docs/design.md §5.3)
# --------------------------------------------------------------------------------------------
# The POP3 core's streaming mode (``send(RETR, stream=True)``): byte tables and properties.  A
# streamed RETR must give, chunk by chunk, exactly the message the whole-message path gives
# (``Message.raw``), for any body and any way the bytes arrive, while its buffer stays bounded
# by a chunk and one read however long the message or its lines (docs/design.md §5.3).


settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def transaction() -> Connection:
    conn = Connection()
    conn.send(Command(Verb.USER, ("u",)))
    conn.send(Command(Verb.PASS, ("p",)))
    conn.receive_data(b"+OK hi\r\n+OK\r\n+OK\r\n")
    while not isinstance(conn.next_event(), NeedData):
        pass
    return conn


def stuff(body: bytes) -> bytes:
    """RFC 1939 §3, the server's side, line ends as they are: one more dot before a leading
    dot on every line."""
    lines = body.split(b"\n")
    return b"\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def retrieve(
    reply: bytes, reads: list[int], *, stream: bool, expect: int | None = None
) -> tuple[bytes, list[Event], int]:
    """Feed a RETR ``reply`` in reads of the given sizes (the rest at the end); return the
    message, the events, and the most octets the core held at once."""
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)), expect=expect, stream=stream)
    events: list[Event] = []
    pos, most = 0, 0
    for size in [*reads, len(reply)]:
        if pos >= len(reply):
            break
        conn.receive_data(reply[pos : pos + size])
        pos += size
        most = max(most, conn.buffered)
        while not isinstance(ev := conn.next_event(), NeedData):
            events.append(ev)
            most = max(most, conn.buffered)
    if not stream:
        (message,) = events
        assert isinstance(message, Message)
        return message.raw, events, most
    chunks = [ev.data for ev in events if isinstance(ev, MessageChunk)]
    end = events[-1]
    assert isinstance(end, MessageEnd)
    assert all(isinstance(ev, MessageChunk) for ev in events[:-1])
    raw = end.prefix + b"".join(chunks)
    assert len(raw) == end.size
    return raw, events, most


def both(reply: bytes, reads: list[int], expect: int | None = None) -> bytes:
    whole, _, _ = retrieve(reply, [], stream=False, expect=expect)
    streamed, _, _ = retrieve(reply, reads, stream=True, expect=expect)
    assert streamed == whole
    return streamed


# The awkward shapes of issue 17: lines starting with ".", bare LF, no final newline (which a
# server sends with a CRLF), a 200,000-character line, a body that is only ".".
STREAM_AWKWARD = [
    pytest.param(b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\n...y\r\n", id="dots"),
    pytest.param(b"Subject: x\n\nbare\nLF\nlines\n", id="bare-lf"),
    pytest.param(b"Subject: x\r\n\r\nno final newline\r\n", id="no-final-newline"),
    pytest.param(b"Subject: x\r\n\r\n" + b"A" * 200_000 + b"\r\nend\r\n", id="long-line"),
    pytest.param(b".\r\n", id="only-a-dot"),
    pytest.param(b"a\rlone CR\r\n\r\n\r\r\n", id="lone-cr"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("body", STREAM_AWKWARD)
@pytest.mark.parametrize("reads", [[], [1] * 40, [7, 3, 100_000, 1, 2], [STREAM_CHUNK + 1]])
def test_a_streamed_message_is_the_message_the_whole_path_gives(
    body: bytes, reads: list[int]
) -> None:
    raw = both(b"+OK\r\n" + stuff(body) + b".\r\n", reads)
    assert raw == body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_a_streamed_message_comes_in_chunks_and_the_buffer_stays_small() -> None:
    body = b"".join(b"line %07d .\r\n" % i for i in range(200_000)) + b"x" * 3_000_000 + b"\r\n"
    reply = b"+OK\r\n" + stuff(body) + b".\r\n"
    raw, events, most = retrieve(reply, [256 * 1024] * 100, stream=True)
    assert raw == body
    chunks = [ev for ev in events if isinstance(ev, MessageChunk)]
    assert len(chunks) > 20
    assert max(len(ev.data) for ev in chunks) <= STREAM_CHUNK + 256 * 1024
    assert most <= STREAM_CHUNK + 2 * 256 * 1024  # never the message


def test_a_line_longer_than_a_chunk_is_cut_inside_and_a_cr_before_the_cut_is_kept() -> None:
    # The cut must not separate a CR from its LF, nor take ".\r" for the end.
    body = b"x" * (STREAM_CHUNK - 1) + b"\r\n.\r\n" + b"y" * (3 * STREAM_CHUNK) + b"\r\r\n"
    for first in range(STREAM_CHUNK - 3, STREAM_CHUNK + 4):
        assert both(b"+OK\r\n" + stuff(body) + b".\r\n", [first, 1, 1, 1, STREAM_CHUNK]) == body


@pytest.mark.parametrize(
    ("wire", "announced", "message"),
    [
        # Dovecot 2.3 does not stuff a first line: "..x" with a count that fits it is "..x"
        # (the prefix the end brings), and "." is content when octets were announced.
        (b"..x\r\n", 5, b"..x\r\n"),
        (b"..x\r\n", 4, b".x\r\n"),
        (b".\r\n", 3, b".\r\n"),
    ],
)
def test_the_first_line_quirk_is_decided_at_the_end(
    wire: bytes, announced: int, message: bytes
) -> None:
    reply = b"+OK %d octets\r\n" % announced + wire + b".\r\n"
    assert retrieve(reply, [1] * 20, stream=True)[0] == message
    raw, events, _ = retrieve(reply, [], stream=True)
    assert raw == message == retrieve(reply, [], stream=False)[0]
    end = events[-1]
    assert isinstance(end, MessageEnd)
    assert end.prefix == (b"." if message.startswith(b"..") else b"")


def test_a_dot_first_line_that_does_not_add_up_is_refused_as_on_the_whole_path() -> None:
    reply = b"+OK 9 octets\r\n.\r\n.\r\n"
    with pytest.raises(Pop3ProtocolError):
        retrieve(reply, [], stream=False)
    with pytest.raises(Pop3ProtocolError):
        retrieve(reply, [], stream=True)


def test_a_streamed_retr_longer_than_list_said_is_refused_before_it_is_all_read() -> None:
    listed = 1_000_000
    body = b"z" * 100 + b"\r\n"
    reply = b"+OK\r\n" + body * (2 * retr_cap(listed) // len(body)) + b".\r\n"
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)), expect=listed, stream=True)
    conn.receive_data(b"+OK\r\n")
    handed_out = [0]

    def feed() -> None:
        for i in range(5, len(reply), 64 * 1024):
            conn.receive_data(reply[i : i + 64 * 1024])
            while isinstance(ev := conn.next_event(), MessageChunk):
                handed_out[0] += len(ev.data)

    with pytest.raises(Pop3ProtocolError, match="LIST announced"):
        feed()
    assert handed_out[0] <= retr_cap(listed)


def test_only_retr_streams() -> None:
    conn = transaction()
    with pytest.raises(ValueError, match="only RETR"):
        conn.send(Command(Verb.TOP, (1, 0)), stream=True)


def test_replies_after_a_streamed_one_are_read_as_usual() -> None:
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)), stream=True)
    conn.send(Command(Verb.RETR, (2,)))
    conn.send(Command(Verb.NOOP))
    conn.receive_data(b"+OK\r\nfirst\r\n.\r\n+OK\r\nsecond\r\n.\r\n+OK\r\n")
    events = []
    while not isinstance(ev := conn.next_event(), NeedData):
        events.append(ev)
    assert [type(ev).__name__ for ev in events] == ["MessageChunk", "MessageEnd", "Message", "Ok"]
    assert events[0] == MessageChunk(b"first\r\n")
    assert events[2] == Message(b"second\r\n")


lines_st = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b"\r", b".\r", b"x\r", b"From x"]),
        st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
        st.integers(1, 3).map(lambda n: b"L" * (n * STREAM_CHUNK // 2)),
    ),
    max_size=25,
)


@settings(PROFILE)
@given(
    lines=lines_st,
    bare_lf=st.booleans(),
    reads=st.lists(st.sampled_from([1, 2, 3, 5, 64, 4096, STREAM_CHUNK, 300_000]), max_size=30),
)
def test_any_body_in_any_reads_streams_to_the_whole_paths_message(
    lines: list[bytes], bare_lf: bool, reads: list[int]
) -> None:
    eol = b"\n" if bare_lf else b"\r\n"
    body = b"".join(line + eol for line in lines)
    raw = both(b"+OK\r\n" + stuff(body) + b".\r\n", reads)
    assert raw == body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
