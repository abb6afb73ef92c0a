"""The IMAP core (connector/imap/protocol.py): byte tables, caps, parsers, properties; no loop."""

from __future__ import annotations

import ast
import base64
import contextlib
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import connector.imap.protocol as protocol
from connector.errors import Pop3ConnectionError, Pop3Error, Pop3ProtocolError
from connector.imap.protocol import (
    NEED_DATA,
    Continuation,
    Event,
    Fetched,
    LiteralArg,
    LiteralChunk,
    NeedData,
    Response,
    ResponseReader,
    Status,
    astring,
    command,
    encode_mutf7,
    folder_levels,
    literal_cap,
    parse_fetch,
    parse_list,
    parse_number,
    parse_status,
    parse_words,
    quote_astring,
    server_mailbox_name,
    uid_set,
    uid_sets,
)

FORBIDDEN = ("asyncio", "socket", "ssl", "selectors")


def test_fresh_interpreter_imports_no_io_modules() -> None:
    code = (
        "import sys\n"
        "import connector.imap.protocol\n"
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
    assert local == {"connector.errors"}
    assert all(
        name.split(".")[0] in sys.stdlib_module_names or name == "__future__"
        for name in imported - local
    )


def drain(reader: ResponseReader) -> list[Event]:
    out: list[Event] = []
    while not isinstance(ev := reader.next_event(), NeedData):
        out.append(ev)
    return out


def events(data: bytes, *, chunk: int | None = None, max_literal: int | None = None) -> list[Event]:
    reader = ResponseReader()
    if max_literal is not None:
        reader.max_literal = max_literal
    out: list[Event] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        reader.receive_data(piece)
        while not isinstance(ev := reader.next_event(), NeedData):
            out.append(ev)
    return out


TRANSCRIPT = (
    b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n"
    b"+ idling\r\n"
    b"* 3 EXISTS\r\n"
    b"* 1 FETCH (UID 7 RFC822.SIZE 5 FLAGS (\\Seen $X) BODY[] {5}\r\nab\r\nc)\r\n"
    b"C4 OK [READ-WRITE] done\n"  # a bare LF, tolerated
)
EXPECTED: list[Event] = [
    Response("*", (b"OK [CAPABILITY IMAP4rev1 IDLE] ready",)),
    Continuation(b"idling"),
    Response("*", (b"3 EXISTS",)),
    Response("*", (b"1 FETCH (UID 7 RFC822.SIZE 5 FLAGS (\\Seen $X) BODY[] ", b")"), (b"ab\r\nc",)),
    Response("C4", (b"OK [READ-WRITE] done",)),
]


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 64])
def test_any_chunking_gives_the_same_events(chunk: int | None) -> None:
    assert events(TRANSCRIPT, chunk=chunk) == EXPECTED


def test_an_incomplete_response_waits_for_more() -> None:
    reader = ResponseReader()
    reader.receive_data(b"* 1 FETCH (BODY[] {10}\r\n12345")
    assert reader.next_event() is NEED_DATA
    assert reader.in_response
    reader.receive_data(b"67890)\r\n* 2 EXISTS")
    assert isinstance(reader.next_event(), Response)
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == len(b"* 2 EXISTS")  # kept for the next response


def test_eof_inside_a_response_is_a_connection_error() -> None:
    reader = ResponseReader()
    reader.receive_data(b"* 1 FETCH (BODY[] {10}\r\n123")
    reader.receive_data(b"")
    with pytest.raises(Pop3ConnectionError, match="mid-response"):
        reader.next_event()


def test_a_literal_over_its_cap_is_refused_before_it_is_read() -> None:
    with pytest.raises(Pop3ProtocolError, match="literal of 99999999999"):
        events(b"* 1 FETCH (BODY[] {99999999999}\r\n", max_literal=1000)


def test_a_line_over_its_cap_is_refused_without_a_line_end() -> None:
    reader = ResponseReader()
    reader.max_line = 100
    reader.receive_data(b"* " + b"x" * 200)
    with pytest.raises(Pop3ProtocolError, match="line over 100"):
        reader.next_event()


def test_many_literals_cannot_exceed_the_response_cap() -> None:
    reader = ResponseReader()
    reader.max_line = 64
    reader.max_literal = 16
    reader.receive_data(b"* 1 FETCH (" + b"X {16}\r\n" + b"a" * 16 + b" " * 10)
    many = b"".join(b"X {16}\r\n" + b"a" * 16 for _ in range(20))
    reader.receive_data(many)
    with pytest.raises(Pop3ProtocolError, match="response over"):
        drain(reader)


# --------------------------------------------------------------------------------------------
# Streamed literals (docs/design.md §5.3, §15.1)
# --------------------------------------------------------------------------------------------

BIG = b".dot first\r\n" + b"L" * 5000 + b"\r\n..\r\nno final newline"
STREAMED = (
    b"* 1 FETCH (UID 7 BODY[] {%d}\r\n%s FLAGS (\\Seen))\r\n" % (len(BIG), BIG)
    + b"* 2 FETCH (UID 8 BODY[] {3}\r\nabc)\r\n"
    + b"C9 OK done\r\n"
)


def streamed(data: bytes, cuts: list[int], *, above: int = 100) -> list[Event]:
    reader = ResponseReader()
    reader.max_literal = 10_000
    reader.stream_above = above
    out: list[Event] = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    for a, b in itertools.pairwise(bounds):
        reader.receive_data(data[a:b])
        while not isinstance(ev := reader.next_event(), NeedData):
            out.append(ev)
    return out


@given(st.lists(st.integers(min_value=1, max_value=len(STREAMED) - 1), max_size=30))
def test_a_literal_above_stream_above_comes_in_chunks_byte_for_byte(cuts: list[int]) -> None:
    """However the bytes are cut, the long literal comes out as chunks (the last one marked)
    that add up to it exactly, its place in the response is empty and listed as streamed,
    and a short literal stays in the response."""
    got = streamed(STREAMED, cuts)
    chunks = [ev for ev in got if isinstance(ev, LiteralChunk)]
    assert b"".join(c.data for c in chunks) == BIG
    assert [c.end for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.data for c in chunks)
    responses = [ev for ev in got if isinstance(ev, Response)]
    assert responses == [
        Response("*", (b"1 FETCH (UID 7 BODY[] ", b" FLAGS (\\Seen))"), (b"",), (0,)),
        Response("*", (b"2 FETCH (UID 8 BODY[] ", b")"), (b"abc",)),
        Response("C9", (b"OK done",)),
    ]
    assert got.index(responses[0]) == len(chunks)  # the chunks come before their response
    first = parse_fetch(responses[0])
    assert first is not None
    assert (first.uid, first.bodies, first.streamed) == (7, {"BODY[]": b""}, {"BODY[]": 0})
    second = parse_fetch(responses[1])
    assert second is not None
    assert (second.bodies, second.streamed) == ({"BODY[]": b"abc"}, {})


def test_a_streamed_literal_holds_no_more_than_a_read() -> None:
    reader = ResponseReader()
    reader.max_literal = 10_000_000
    reader.stream_above = 1000
    reader.receive_data(b"* 1 FETCH (UID 7 BODY[] {5000000}\r\n")
    assert reader.next_event() is NEED_DATA
    ends = []
    for _ in range(50):
        reader.receive_data(b"x" * 100_000)
        chunk = reader.next_event()
        assert isinstance(chunk, LiteralChunk)
        assert len(chunk.data) == 100_000
        assert reader.buffered == 0
        assert reader.next_event() is NEED_DATA
        ends.append(chunk.end)
    assert ends == [False] * 49 + [True]
    reader.receive_data(b")\r\n")
    assert isinstance(reader.next_event(), Response)


def test_a_streamed_literal_is_capped_before_a_chunk_and_cut_by_eof() -> None:
    reader = ResponseReader()
    reader.max_literal = 1000
    reader.stream_above = 10
    reader.receive_data(b"* 1 FETCH (BODY[] {1001}\r\nxxxx")
    with pytest.raises(Pop3ProtocolError, match="literal of 1001"):
        reader.next_event()
    reader = ResponseReader()
    reader.stream_above = 10
    reader.receive_data(b"* 1 FETCH (BODY[] {100}\r\n" + b"x" * 40)
    assert reader.next_event() == LiteralChunk(b"x" * 40, end=False)
    assert reader.in_response
    reader.receive_data(b"")
    with pytest.raises(Pop3ConnectionError, match="mid-response"):
        reader.next_event()


def test_a_response_without_a_tag_is_refused() -> None:
    with pytest.raises(Pop3ProtocolError, match="without a tag"):
        events(b"hello\r\n")


def test_literal_cap_tolerates_a_little_more_than_announced() -> None:
    assert literal_cap(0) == 4096
    assert literal_cap(16_000) == 16_000 + 1000 + 4096


def test_parse_fetch_reads_our_items_and_skips_the_rest() -> None:
    (ev,) = events(
        b'* 12 FETCH (FLAGS (\\Deleted) ENVELOPE ("a" ("b" NIL)) UID 34 '
        b"RFC822.SIZE 5678 BODY[HEADER] {3}\r\nx\r\n BODY[]<0> NIL X-GM-LABELS (\\Inbox))\r\n"
    )
    assert isinstance(ev, Response)
    assert parse_fetch(ev) == Fetched(
        12, 34, 5678, ("\\Deleted",), {"BODY[HEADER]": b"x\r\n", "BODY[]": None}
    )
    assert parse_fetch(Response("*", (b"3 EXISTS",))) is None


@pytest.mark.parametrize(
    "data",
    [
        b"* 1 FETCH UID 3\r\n",
        b"* 1 FETCH (UID)\r\n",
        b"* 1 FETCH (UID x)\r\n",
        b"* 1 FETCH (UID 0)\r\n",
        b"* 1 FETCH (UID 12345678901)\r\n",
        b"* 1 FETCH (BODY[] 17)\r\n",
        b"* 1 FETCH (FLAGS (a b)",
        b"* 1 FETCH (X " + b"(" * 40 + b")" * 40 + b")\r\n",
        b'* 1 FETCH (X "unterminated)\r\n',
        b"* 1 FETCH (BODY[HEADER x)\r\n",
    ],
)
def test_malformed_fetch_responses_are_protocol_errors(data: bytes) -> None:
    (ev,) = events(data + (b"" if data.endswith(b"\n") else b"\r\n"))
    assert isinstance(ev, Response)
    with pytest.raises(Pop3ProtocolError):
        parse_fetch(ev)


def test_quoted_strings_unescape() -> None:
    (ev,) = events(b'* LIST (\\Noselect) "\\\\" ""\r\n')
    assert isinstance(ev, Response)
    listed = parse_list(ev)
    assert listed is not None
    assert listed.separator == "\\"
    (flat,) = events(b"* LIST () NIL INBOX\r\n")
    assert isinstance(flat, Response)
    flat_list = parse_list(flat)
    assert flat_list is not None
    assert flat_list.separator is None


def test_status_responses_and_their_codes() -> None:
    s = parse_status(Response("C1", (b"NO [AUTHENTICATIONFAILED] Authentication failed.",)))
    assert s is not None
    assert (s.status, s.code, s.args, s.text) == (
        Status.NO,
        "AUTHENTICATIONFAILED",
        "",
        "Authentication failed.",
    )
    s = parse_status(Response("*", (b"OK [UIDVALIDITY 1796] UIDs valid",)))
    assert s is not None
    assert (s.code, s.args) == ("UIDVALIDITY", "1796")
    s = parse_status(Response("*", (b"BYE \x1b[2J going",)))
    assert s is not None
    assert s.text == "\\x1b[2J going"  # a server's text is escaped where it is read
    assert parse_status(Response("*", (b"3 EXISTS",))) is None
    assert parse_number(Response("*", (b"3 EXISTS",))) == (3, "EXISTS")
    assert parse_words(Response("*", (b"SEARCH 4 9",)), "SEARCH") == ["4", "9"]
    assert parse_words(Response("*", (b"SEARCH",)), "SEARCH") == []


def test_commands_quote_strings_and_send_8bit_ones_as_literals() -> None:
    assert command("C1", "LOGIN", astring("al ice"), astring('p"w\\')) == [
        b'C1 LOGIN "al ice" "p\\"w\\\\"\r\n'
    ]
    assert command("C2", "LOGIN", astring("bob"), astring("pässwort")) == [
        b'C2 LOGIN "bob" ',
        LiteralArg("pässwort".encode()),
        b"\r\n",
    ]
    assert command("C3", "LOGIN", astring("jörg"), astring("pw")) == [
        b"C3 LOGIN ",
        LiteralArg("jörg".encode()),
        b' "pw"\r\n',
    ]


@pytest.mark.parametrize("bad", ["a\r\nC2 DELETE INBOX", "a\nb", "a\0b"])
def test_no_argument_can_inject_a_command(bad: str) -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        astring(bad)
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        command("C1", "SELECT", bad)


def test_uid_sets_compress_ranges_and_stay_short() -> None:
    assert uid_set([5, 1, 2, 3, 9, 10, 7]) == "1:3,5,7,9:10"
    assert uid_set([]) == ""
    sets = uid_sets(list(range(1, 20_000, 2)), limit=100)
    assert all(len(s) <= 100 for s in sets)
    assert ",".join(sets) == uid_set(list(range(1, 20_000, 2)))


def test_mutf7() -> None:
    assert encode_mutf7("Unzustellbar/Größe") == "Unzustellbar/Gr&APYA3w-e"
    assert encode_mutf7("A&B") == "A&-B"


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(TRANSCRIPT)), max_size=20))
def test_any_split_of_a_transcript_gives_the_same_events(cuts: list[int]) -> None:
    reader = ResponseReader()
    out: list[Event] = []
    last = 0
    for cut in sorted({*cuts, len(TRANSCRIPT)}):
        reader.receive_data(TRANSCRIPT[last:cut])  # never empty: b"" would mean EOF
        last = cut
        while not isinstance(ev := reader.next_event(), NeedData):
            out.append(ev)
    assert out == EXPECTED


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    reader = ResponseReader()
    reader.max_literal = 64
    reader.receive_data(data)
    reader.receive_data(b"")
    try:
        while not isinstance(ev := reader.next_event(), NeedData):
            if isinstance(ev, Response):
                parse_fetch(ev)
                parse_status(ev)
                parse_list(ev)
    except Pop3Error:
        pass


def test_a_hostile_fetch_is_parsed_in_linear_time() -> None:
    """A megabyte of nesting, quotes and brackets costs milliseconds, never a blow-up."""
    for body in (b"(" * 15 + b"a " * 400_000 + b")" * 15, b'"\\' * 300_000 + b'"', b"[" * 500_000):
        reader = ResponseReader()
        reader.receive_data(b"* 1 FETCH (X " + body + b")\r\n")
        ev = reader.next_event()
        assert isinstance(ev, Response)
        started = time.perf_counter()
        with contextlib.suppress(Pop3ProtocolError):
            parse_fetch(ev)
        assert time.perf_counter() - started < 2.0


# Mailbox names (used by IMAP accounts and the IMAP dead-letter store alike)


def _decode_mutf7(text: str) -> str:
    """A reference decoder for RFC 3501 §5.1.3, used only to check the encoder."""

    def shift(m: re.Match[str]) -> str:
        if not m.group(1):
            return "&"
        b64 = m.group(1).replace(",", "/")
        return base64.b64decode(b64 + "=" * (-len(b64) % 4)).decode("utf-16-be")

    return re.sub(r"&([A-Za-z0-9+,]*)-", shift, text)


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("Dead Letters", "Dead Letters"),
        ("Größe", "Gr&APYA3w-e"),
        ("Unzustellbar/Größe", "Unzustellbar/Gr&APYA3w-e"),
        # RFC 3501 §5.1.3's own example.
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("&", "&-"),
        ("", ""),
        ("é", "&AOk-"),
        ("\U0001f4e8", "&2D3c6A-"),  # outside the BMP: a UTF-16 surrogate pair
        ("a\tb", "a&AAk-b"),  # controls are not printable ASCII: encoded too
    ],
)
def test_mutf7_known_values(name: str, encoded: str) -> None:
    assert encode_mutf7(name) == encoded


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_mutf7_is_printable_ascii_and_decodes_back(name: str) -> None:
    encoded = encode_mutf7(name)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert _decode_mutf7(encoded) == name


def test_quote_astring_escapes_quotes_and_backslashes() -> None:
    assert quote_astring("Dead Letters") == '"Dead Letters"'
    assert quote_astring('a"b\\c') == '"a\\"b\\\\c"'


def test_server_names_use_the_servers_separator() -> None:
    levels = folder_levels("POP3 Connector/Größe")
    assert server_mailbox_name(levels, ".") == '"POP3 Connector.Gr&APYA3w-e"'
    assert server_mailbox_name(levels, "/") == '"POP3 Connector/Gr&APYA3w-e"'
    assert server_mailbox_name(folder_levels("Dead Letters"), None) == '"Dead Letters"'
    with pytest.raises(ValueError, match="no folder hierarchy"):
        server_mailbox_name(levels, None)
    with pytest.raises(ValueError, match="separator"):
        server_mailbox_name(folder_levels("v1.2/x"), ".")
