"""``pop3-connector import-fetchmailrc FILE``: turn a ``.fetchmailrc`` into our TOML.

The TOML is the config file of docs/design.md §4.1, every key as in ``config.example.toml``.

Theory of operation.  A fetchmail run control file is a stream of words: ``set`` statements,
``defaults`` blocks, and ``poll``/``skip`` blocks naming a server, each followed by server
options and then one or more ``user`` descriptions with their own options.  Words such as
``and``, ``with``, ``has``, ``wants``, ``options`` and the characters ``: ; ,`` are noise
(fetchmail(1), "The run control file").  We work in three steps:

1. :func:`_tokenize` splits the text into words, honouring ``#`` comments and single- or
   double-quoted strings with fetchmail's backslash escapes, and keeps each word's line number.
2. :func:`_parse` groups the words into blocks of :class:`_Option` (keyword, negation,
   arguments, line).  It knows how many arguments each keyword takes, so a value is never
   mistaken for a keyword.
3. :func:`_interpret` replays, for every user of every ``poll`` block, the options of the last
   ``defaults`` block, then the block's server options, then the user's, last one winning (as
   fetchmail applies ``defaults``), and renders one ``[[accounts]]`` table per user.

SMTP servers: the first ``smtphost`` named becomes ``[smtp]``; every other one (an IT provider's
rc file delivers each customer's mailboxes to that customer's server) becomes an SMTP target,
``[smtp_targets.NAME]`` named after its host, and the accounts that name it get
``smtp = "NAME"`` (docs/design.md §14.1).  An account without ``smtphost`` (fetchmail's
localhost) goes to ``[smtp]``, with a note.  Each server's ``esmtpname``/``esmtppassword`` come
from the first user that delivers there with them.

Everything that has no equivalent here becomes a note for the administrator, with its line.
Notes never quote a password or any quoted string (it might be one); the TOML on standard output
does carry the passwords that were in the rc file, exactly as the rc file did.

A multidrop user (more than one local name, or ``*``, in ``is ... here``; fetchmail(1),
"Multidrop mode") becomes a shared mailbox, ``[accounts.shared]``: ``localdomains`` gives
``domains``, ``envelope HEADER`` ``envelope_headers``, each local name (or ``"remote" = "local"``
mapping) one rule per domain, ``*`` a ``rewrite_domain`` to the Exchange domain, and without ``*``
a last ``*@domain`` rule per domain to the fallback (fetchmail's postmaster), as fetchmail
delivered only to the names listed.  ``limit N`` becomes ``max_message_size`` with
``oversize = "leave"`` (fetchmail leaves larger mail on the server).

Choices that keep mail safe: an account fetchmail ran with ``keep`` is written with
``leave_on_server = true`` and ``enabled = false``, because the mailbox still holds mail
fetchmail already delivered, which our ledger has never seen (enabling it as is would deliver
all of that again).  An account
whose user or local recipient the rc file leaves to "whoever runs fetchmail" gets a
``change-me`` placeholder and ``enabled = false`` as well, and so does a multidrop user
without ``localdomains`` (``domains = ["change-me.invalid"]``).
"""

from __future__ import annotations

import enum
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, assert_never

from connector.addresses import is_address_pattern, is_domain, is_field_name, is_plain_address
from connector.config import config_text_problems, format_duration, mask_secrets
from connector.tls import is_loopback

__all__ = ["DEFAULT_PASSWORD_DIR", "convert", "main"]

DEFAULT_PASSWORD_DIR: Final = Path("/etc/pop3-connector")

# --------------------------------------------------------------------------------------------
# Step 1: words
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    quoted: bool
    line: int


class _RcSyntaxError(Exception):
    """An unterminated quoted string: the rest of the file cannot be read reliably."""

    def __init__(self, line: int) -> None:
        super().__init__(f"line {line}: unterminated quoted string; the rest was not read")
        self.line = line


_SIMPLE_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "\\": "\\", '"': '"'}
_SIMPLE_ESCAPES_SQ: Final = {**_SIMPLE_ESCAPES, "'": "'"}
# fetchmail's lexer (rcfile_l.l) ends an unquoted word at white space and at these characters.
_SEPARATORS: Final = frozenset(" \t\r\n;:,")


def _unescape(body: str) -> str:
    r"""fetchmail's escapes in quoted strings: ``\n \t \r \b \\ \" \'``, ``\xHH``, ``\NNN``."""
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\" or i + 1 == len(body):
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        hex_digits = re.match(r"[0-9A-Fa-f]{1,2}", body[i + 2 : i + 4]) if nxt in "xX" else None
        oct_digits = re.match(r"[0-7]{1,3}", body[i + 1 : i + 4])
        if nxt in _SIMPLE_ESCAPES_SQ:
            out.append(_SIMPLE_ESCAPES_SQ[nxt])
            i += 2
        elif hex_digits is not None:
            out.append(chr(int(hex_digits.group(), 16)))
            i += 2 + len(hex_digits.group())
        elif oct_digits is not None:
            out.append(chr(int(oct_digits.group(), 8)))
            i += 1 + len(oct_digits.group())
        else:  # an unknown escape stands for the character itself
            out.append(nxt)
            i += 2
    return "".join(out)


def _tokenize(text: str) -> list[_Token]:
    """The words of an rc file; raises :class:`_RcSyntaxError` (with the tokens so far lost)."""
    tokens: list[_Token] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
        elif ch in _SEPARATORS:
            i += 1
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif ch == "=":
            # The "map" operator of multidrop name mappings: "remote" = "local".
            tokens.append(_Token("=", False, line))
            i += 1
        elif ch in "\"'":
            start_line = line
            j = i + 1
            while j < n and text[j] != ch:
                if text[j] == "\\":
                    j += 1
                if j < n and text[j] == "\n":
                    line += 1
                j += 1
            if j >= n:
                raise _RcSyntaxError(start_line)
            tokens.append(_Token(_unescape(text[i + 1 : j]), True, start_line))
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in _SEPARATORS and text[j] not in "#=\"'":
                j += 1
            tokens.append(_Token(text[i:j], False, line))
            i = j
    return tokens


# --------------------------------------------------------------------------------------------
# Step 2: options
# --------------------------------------------------------------------------------------------


class _Arity(enum.Enum):
    FLAG = "flag"  # no argument; may be negated with "no"
    ONE = "one"  # exactly one argument
    LIST = "list"  # one or more arguments, up to the next keyword


_NOISE: Final = frozenset({"and", "with", "has", "wants", "options"})
_STATEMENTS: Final = frozenset({"poll", "skip", "server", "defaults", "set"})

# Keywords of poll/defaults blocks and the arguments they take (fetchmail(1), "Keyword/Option
# Summary"), under the name we interpret them by.  Aliases map to the same name.
_ARITY: Final[dict[str, _Arity]] = {
    # server options
    "via": _Arity.ONE,
    "proto": _Arity.ONE,
    "port": _Arity.ONE,
    "auth": _Arity.ONE,
    "timeout": _Arity.ONE,
    "envelope": _Arity.ONE,  # an optional count is folded in by _parse
    "qvirtual": _Arity.ONE,
    "aka": _Arity.LIST,
    "localdomains": _Arity.LIST,
    "interface": _Arity.ONE,
    "monitor": _Arity.ONE,
    "plugin": _Arity.ONE,
    "plugout": _Arity.ONE,
    "dns": _Arity.FLAG,
    "checkalias": _Arity.FLAG,
    "uidl": _Arity.FLAG,
    "interval": _Arity.ONE,
    "principal": _Arity.ONE,
    "tracepolls": _Arity.FLAG,
    "esmtpname": _Arity.ONE,
    "esmtppassword": _Arity.ONE,
    "bad-header": _Arity.ONE,
    "retrieve-error": _Arity.ONE,
    # user options
    "password": _Arity.ONE,
    "smtphost": _Arity.LIST,
    "fetchdomains": _Arity.LIST,
    "smtpaddress": _Arity.ONE,
    "smtpname": _Arity.ONE,
    "antispam": _Arity.LIST,
    "mda": _Arity.ONE,
    "bsmtp": _Arity.ONE,
    "lmtp": _Arity.FLAG,
    "preconnect": _Arity.ONE,
    "postconnect": _Arity.ONE,
    "keep": _Arity.FLAG,
    "flush": _Arity.FLAG,
    "limitflush": _Arity.FLAG,
    "fetchall": _Arity.FLAG,
    "rewrite": _Arity.FLAG,
    "forcecr": _Arity.FLAG,
    "stripcr": _Arity.FLAG,
    "pass8bits": _Arity.FLAG,
    "dropstatus": _Arity.FLAG,
    "dropdelivered": _Arity.FLAG,
    "mimedecode": _Arity.FLAG,
    "idle": _Arity.FLAG,
    "ssl": _Arity.FLAG,
    "sslkey": _Arity.ONE,
    "sslcert": _Arity.ONE,
    "sslproto": _Arity.ONE,
    "sslcertck": _Arity.FLAG,
    "sslcertfile": _Arity.ONE,
    "sslcertpath": _Arity.ONE,
    "sslcommonname": _Arity.ONE,
    "sslfingerprint": _Arity.ONE,
    "limit": _Arity.ONE,
    "warnings": _Arity.ONE,
    "folder": _Arity.LIST,
    "fetchlimit": _Arity.ONE,
    "fetchsizelimit": _Arity.ONE,
    "fastuidl": _Arity.ONE,
    "batchlimit": _Arity.ONE,
    "expunge": _Arity.ONE,
    "properties": _Arity.ONE,
    "showdots": _Arity.FLAG,
}
_ALIASES: Final = {
    "protocol": "proto",
    "service": "port",
    "authenticate": "auth",
    "local": "localdomains",
    "pass": "password",
    "passwd": "password",
    "smtp": "smtphost",
    "pre": "preconnect",
    "post": "postconnect",
    "username": "user",
}
# Keywords handled by hand in _parse (not in _ARITY).
_SPECIAL: Final = frozenset({"user", "is", "to", "here", "there", "no"})
_KEYWORDS: Final = frozenset(_ARITY) | frozenset(_ALIASES) | _SPECIAL | _NOISE | _STATEMENTS


@dataclass(frozen=True, slots=True)
class _Option:
    """One option as written: ``name`` is canonical; ``args`` are its values, in order."""

    name: str
    line: int
    args: tuple[str, ...] = ()
    negated: bool = False


@dataclass(slots=True)
class _Block:
    """A ``poll``/``skip``/``defaults`` block, filled word by word while parsing."""

    kind: str  # "poll", "skip" or "defaults"
    host: str
    line: int
    server: list[_Option] = field(default_factory=list)
    users: list[list[_Option]] = field(default_factory=list)

    def add(self, option: _Option) -> None:
        (self.users[-1] if self.users else self.server).append(option)


@dataclass(slots=True)
class _Parsed:
    blocks: list[_Block] = field(default_factory=list)
    settings: list[_Option] = field(default_factory=list)  # `set` statements
    notes: list[str] = field(default_factory=list)


def _is_keyword(token: _Token) -> bool:
    return not token.quoted and _canonical(token.text) in _KEYWORDS


def _canonical(word: str) -> str:
    lower = word.lower()
    return _ALIASES.get(lower, lower)


def _negated_flag(word: str) -> str | None:
    """``nokeep`` -> ``keep``: fetchmail also accepts negations written as one word."""
    lower = word.lower()
    if lower.startswith("no") and _ARITY.get(_canonical(lower[2:])) is _Arity.FLAG:
        return _canonical(lower[2:])
    return None


class _Reader:
    """A cursor over the tokens."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def values(self) -> list[_Token]:
        """Every following token up to the next keyword."""
        out: list[_Token] = []
        while (t := self.peek()) is not None and not _is_keyword(t):
            out.append(self.take())
        return out

    def value(self) -> _Token | None:
        t = self.peek()
        if t is None or _is_keyword(t):
            return None
        return self.take()


_SET_WITH_ARG: Final = frozenset({"daemon", "logfile", "idfile", "pidfile", "postmaster"})
_SET_WITH_ARG_ALSO: Final = frozenset({"properties", "interface"})


def _parse(tokens: list[_Token]) -> _Parsed:
    """Group the words into ``set`` settings and blocks of options (see the module docstring)."""
    parsed = _Parsed()
    reader = _Reader(tokens)
    block: _Block | None = None
    while (token := reader.peek()) is not None:
        reader.take()
        word = _canonical(token.text) if not token.quoted else ""
        if word in _NOISE:
            continue
        if word == "set":
            block = None
            _parse_set(reader, token.line, parsed)
            continue
        if word in {"poll", "skip", "server"}:
            host = reader.value()
            if host is None:
                parsed.notes.append(f"line {token.line}: '{word}' without a server name; ignored")
                block = None
                continue
            kind = "skip" if word == "skip" else "poll"
            block = _Block(kind, host.text, token.line)
            parsed.blocks.append(block)
            continue
        if word == "defaults":
            block = _Block("defaults", "", token.line)
            parsed.blocks.append(block)
            continue
        if block is None:
            what = "a quoted string" if token.quoted else f"'{token.text}'"
            parsed.notes.append(f"line {token.line}: {what} outside a poll block; ignored")
            continue
        _parse_option(reader, token, word, block, parsed)
    return parsed


def _parse_set(reader: _Reader, line: int, parsed: _Parsed) -> None:
    negated = False
    # `set no bouncemail`: "no" is a keyword, so read it by hand.
    nxt = reader.peek()
    if nxt is not None and not nxt.quoted and nxt.text.lower() == "no":
        reader.take()
        negated = True
    name_token = reader.peek()
    if name_token is None or name_token.quoted:
        parsed.notes.append(f"line {line}: 'set' without a setting; ignored")
        return
    reader.take()
    name = name_token.text.lower()
    args: tuple[str, ...] = ()
    if name in _SET_WITH_ARG | _SET_WITH_ARG_ALSO:
        arg = reader.peek()
        if arg is not None and (arg.quoted or not _is_keyword(arg)):
            args = (reader.take().text,)
    parsed.settings.append(_Option(name, line, args, negated))


def _parse_option(
    reader: _Reader, token: _Token, word: str, block: _Block, parsed: _Parsed
) -> None:
    line = token.line
    if word == "user":
        names = reader.values()
        block.users.append([])
        after = reader.peek()
        if after is not None and not after.quoted and after.text.lower() == "here":
            # `user LOCAL... here is REMOTE there`: the names are local ones.
            reader.take()
            block.add(_Option("is", line, tuple(t.text for t in names)))
        elif names:
            block.add(_Option("remote", line, (names[0].text,)))
            if len(names) > 1:
                parsed.notes.append(f"line {line}: extra words after the user name; ignored")
            if after is not None and not after.quoted and after.text.lower() == "there":
                reader.take()
        else:
            parsed.notes.append(f"line {line}: 'user' without a name")
        return
    if word in {"is", "to"}:
        names = reader.values()
        after = reader.peek()
        if after is not None and not after.quoted and after.text.lower() == "there":
            reader.take()  # `is REMOTE there`
            if names:
                block.add(_Option("remote", line, (names[0].text,)))
            return
        if after is not None and not after.quoted and after.text.lower() == "here":
            reader.take()
        block.add(_Option("is", line, tuple(t.text for t in names)))
        return
    if word in {"here", "there"}:
        return  # stray markers, as fetchmail's grammar tolerates them
    negated = False
    if word == "no":
        nxt = reader.peek()
        if nxt is None or nxt.quoted:
            parsed.notes.append(f"line {line}: 'no' without an option; ignored")
            return
        reader.take()
        word = _canonical(nxt.text)
        negated = True
    elif (flag := _negated_flag(word)) is not None:
        word, negated = flag, True
    arity = _ARITY.get(word)
    if arity is None:
        # Never echo what follows: a misspelt `password` keyword is followed by the password.
        skipped = len(reader.values())
        what = "a quoted string" if token.quoted else f"unknown word '{token.text}'"
        tail = f" (and the {skipped} value(s) after it)" if skipped else ""
        parsed.notes.append(f"line {line}: {what}{tail}; ignored")
        return
    match arity:
        case _Arity.FLAG:
            block.add(_Option(word, line, (), negated))
        case _Arity.ONE:
            args: tuple[str, ...]
            if word == "envelope":
                # `envelope [COUNT] HEADER`: the optional count is a bare number.
                # args are (HEADER,) or (HEADER, COUNT).
                first = reader.value()
                nxt = reader.peek()
                if first is not None and first.text.isdigit() and nxt and not _is_keyword(nxt):
                    args = (reader.take().text, first.text)
                else:
                    args = (first.text,) if first is not None else ()
            elif not negated and reader.peek() is not None:
                # fetchmail's grammar requires the value, and some values are keywords
                # themselves (`auth password`), so take the next word whatever it is.
                args = (reader.take().text,)
            else:
                args = ()
            if not args and not negated:
                parsed.notes.append(f"line {line}: '{word}' without a value; ignored")
                return
            block.add(_Option(word, line, args, negated))
        case _Arity.LIST:
            values = tuple(t.text for t in reader.values())
            if not values and not negated:
                parsed.notes.append(f"line {line}: '{word}' without a value; ignored")
                return
            block.add(_Option(word, line, values, negated))
        case _:
            assert_never(arity)


# --------------------------------------------------------------------------------------------
# Step 3: accounts
# --------------------------------------------------------------------------------------------


class _Tls(enum.Enum):
    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class _SmtpHost:
    host: str
    port: int | None
    line: int


@dataclass(frozen=True, slots=True)
class _Rule:
    """One ``[[accounts.shared.rules]]``."""

    match: str
    deliver_to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Shared:
    """``[accounts.shared]`` for a fetchmail multidrop mailbox."""

    domains: tuple[str, ...]
    envelope_headers: tuple[str, ...] | None  # None: our default list
    rewrite_domain: str | None
    rules: tuple[_Rule, ...]


@dataclass(frozen=True, slots=True)
class _Account:
    """One ``[[accounts]]`` table to write."""

    name: str
    line: int
    host: str
    port: int | None
    tls: _Tls
    verify_certificate: bool
    ca_file: str | None
    username: str
    password: str | None
    auth: str
    deliver_to: tuple[str, ...]
    poll_interval: float | None
    enabled: bool
    comments: tuple[str, ...]
    max_message_size: int | None = None
    oversize: str | None = None
    shared: _Shared | None = None
    leave_on_server: bool = False
    smtp: str | None = None  # the name of its [smtp_targets.NAME]; None: [smtp]


@dataclass(slots=True)
class _Draft:
    """What the options of one user say, gathered option by option (last one wins)."""

    host: str
    line: int
    enabled: bool
    remote: str | None = None
    password: str | None = None
    local_names: tuple[str, ...] = ()
    local_line: int = 0
    proto: str = "pop3"
    auth: str = "auto"
    port: int | None = None
    ssl: bool = False
    sslproto: str | None = None
    verify: bool = True
    ca_file: str | None = None
    keep: bool = False
    keep_line: int = 0
    smtphosts: tuple[_SmtpHost, ...] = ()
    smtpaddress: str | None = None
    esmtpname: str | None = None
    esmtppassword: str | None = None
    interval: int | None = None
    interval_line: int = 0
    localdomains: tuple[str, ...] = ()
    localdomains_line: int = 0
    # None: fetchmail's default (the Received: "for" clause); "": `no envelope`.
    envelope: str | None = None
    envelope_count: str | None = None
    envelope_line: int = 0
    limit: int | None = None
    limit_line: int = 0
    limitflush: bool = False
    notes: list[str] = field(default_factory=list)

    def note(self, line: int, text: str) -> None:
        self.notes.append(f"line {line}: {text}")


_PORT_NAMES: Final = {"pop3": 110, "pop-3": 110, "pop3s": 995}
_AUTH_MAP: Final = {"any": "auto", "password": "user"}
# Options whose behaviour ours already has, so translating them needs no note.
_SILENT: Final = frozenset({"uidl", "fetchall", "showdots", "tracepolls", "properties"})
_IGNORED: Final[dict[str, str]] = {
    "flush": "'flush' has no equivalent: mail is deleted upstream once delivered anyway",
    "rewrite": "'rewrite' ignored: headers are passed on unchanged (only a Received: line added)",
    "forcecr": "'forcecr' ignored: messages are passed on unchanged",
    "stripcr": "'stripcr' ignored: messages are passed on unchanged",
    "pass8bits": "'pass8bits' ignored: messages are passed on unchanged",
    "dropstatus": "'dropstatus' ignored: Status: headers are kept",
    "dropdelivered": "'dropdelivered' ignored: Delivered-To: headers are kept",
    "mimedecode": "'mimedecode' ignored: messages are passed on unchanged",
    "idle": "'idle' is IMAP only; ignored",
    "warnings": (
        "'warnings' (repeat the oversized-mail warning every N seconds) is not supported: with "
        'oversize = "leave" a notice is sent once per oversized message'
    ),
    "fetchlimit": "'fetchlimit' is not supported: every new message is fetched each cycle",
    "fetchsizelimit": "'fetchsizelimit' is not supported",
    "fastuidl": "'fastuidl' is not needed: the ledger knows every UIDL",
    "batchlimit": "'batchlimit' is not supported: one SMTP connection carries the whole cycle",
    "expunge": "'expunge' is not supported: deletions happen at QUIT (RFC 1939 §6)",
    "folder": "'folder' is IMAP only; ignored",
    "timeout": "'timeout' has no per-account equivalent; [smtp] timeout covers SMTP",
    "qvirtual": (
        "'qvirtual PREFIX' is not supported: the prefix is not stripped from addresses; a rule "
        'can match such addresses ([[accounts.shared.rules]] match = "PREFIX*@your.domain")'
    ),
    "aka": (
        "'aka' is not supported: addresses at the mail server's other names are not taken as "
        "ours; add those names to [accounts.shared] domains if mail is addressed to them"
    ),
    "dns": (
        "'dns' is not supported: no DNS lookup decides whether an address is ours, only "
        "[accounts.shared] domains and the rules do"
    ),
    "checkalias": (
        "'checkalias' is not supported: addresses are compared by domain (domains) and by "
        "pattern (rules), never by DNS"
    ),
    "fetchdomains": "'fetchdomains' (ETRN/ODMR) is not supported",
    "smtpname": "'smtpname' is not supported: the envelope sender comes from Return-Path",
    "antispam": (
        "'antispam' is not needed: a permanent SMTP refusal moves the message to the "
        "dead-letter store"
    ),
    "mda": "'mda' is not supported: mail is delivered over SMTP to [smtp] host",
    "bsmtp": "'bsmtp' is not supported: mail is delivered over SMTP to [smtp] host",
    "lmtp": "'lmtp' is not supported: mail is delivered over SMTP to [smtp] host",
    "preconnect": "'preconnect' is not supported: run the command before the service starts",
    "postconnect": "'postconnect' is not supported",
    "plugin": "'plugin' (a tunnel command) is not supported: connections are direct TCP",
    "plugout": "'plugout' (a tunnel command) is not supported: connections are direct TCP",
    "interface": "'interface' is not supported",
    "monitor": "'monitor' is not supported",
    "principal": "'principal' (Kerberos) is not supported",
    "sslkey": "'sslkey'/'sslcert' (TLS client certificates) are not supported",
    "sslcert": "'sslkey'/'sslcert' (TLS client certificates) are not supported",
    "sslcertpath": (
        "'sslcertpath' is not supported: put the CA certificates into one PEM file and set ca_file"
    ),
    "sslcommonname": "'sslcommonname' is not supported: the name checked is host",
    "sslfingerprint": (
        "'sslfingerprint' is not supported: the certificate chain is verified instead "
        "(ca_file for a private CA)"
    ),
    "bad-header": "'bad-header' is not supported: headers are passed on unchanged",
    "retrieve-error": "'retrieve-error' is not supported",
}


def _apply(draft: _Draft, opt: _Option) -> None:
    """Fold one option into the draft, or note why it cannot be."""
    arg = opt.args[0] if opt.args else ""
    match opt.name:
        case "remote":
            draft.remote = arg
        case "password":
            draft.password = None if opt.negated else arg
        case "is":
            draft.local_names, draft.local_line = opt.args, opt.line
        case "via":
            draft.host = arg
        case "proto":
            draft.proto = arg.lower()
        case "auth":
            lower = arg.lower()
            if lower in _AUTH_MAP:
                draft.auth = _AUTH_MAP[lower]
            else:
                draft.note(opt.line, f"'auth {arg}' is not supported; auth = \"auto\" is used")
                draft.auth = "auto"
        case "port":
            if arg.isdigit() and 0 < int(arg) < 65536:
                draft.port = int(arg)
            elif arg.lower() in _PORT_NAMES:
                draft.port = _PORT_NAMES[arg.lower()]
            else:
                draft.note(opt.line, f"port '{arg}' not understood; the default port is used")
        case "ssl":
            draft.ssl = not opt.negated
        case "sslproto":
            draft.sslproto = arg.lower()
        case "sslcertck":
            draft.verify = not opt.negated
        case "sslcertfile":
            draft.ca_file = arg
        case "keep":
            draft.keep, draft.keep_line = not opt.negated, opt.line
        case "smtphost":
            draft.smtphosts = tuple(h for v in opt.args if (h := _smtp_host(v, opt.line, draft)))
        case "smtpaddress":
            draft.smtpaddress = arg
        case "esmtpname":
            draft.esmtpname = arg
        case "esmtppassword":
            draft.esmtppassword = arg
        case "localdomains":
            draft.localdomains = () if opt.negated else opt.args
            draft.localdomains_line = opt.line
        case "envelope":
            # `no envelope`: fetchmail reads the recipient headers only.
            draft.envelope = "" if opt.negated else arg
            draft.envelope_count = opt.args[1] if len(opt.args) > 1 else None
            draft.envelope_line = opt.line
        case "limit":
            # fetchmail's `limit 0` (and `no limit`) means no limit.
            if opt.negated or arg == "0":
                draft.limit = None
            elif arg.isdigit():
                draft.limit, draft.limit_line = int(arg), opt.line
            else:
                draft.note(opt.line, "'limit' needs a number of octets; ignored")
        case "limitflush":
            draft.limitflush = not opt.negated
        case "interval":
            if arg.isdigit() and int(arg) > 0:
                draft.interval, draft.interval_line = int(arg), opt.line
            else:
                draft.note(opt.line, "'interval' needs a positive number; ignored")
        case name if name in _SILENT:
            pass
        case name if opt.negated and name in _IGNORED:
            pass  # turning off something we do not do anyway
        case name if name in _IGNORED:
            draft.note(opt.line, _IGNORED[name])
        case name:
            draft.note(opt.line, f"'{name}' is not supported; ignored")


def _smtp_host(value: str, line: int, draft: _Draft) -> _SmtpHost | None:
    if value.startswith("/"):
        draft.note(line, "smtphost names a socket (LMTP); only SMTP over TCP is supported")
        return None
    host, sep, port = value.rpartition("/") if "/" in value else (value, "", "")
    if sep and not (port.isdigit() and 0 < int(port) < 65536):
        draft.note(line, f"smtphost port '{port}' not understood; ignored")
        return _SmtpHost(host, None, line)
    return _SmtpHost(host, int(port) if sep else None, line)


_NAME_BAD_CHARS: Final = re.compile(r"[^A-Za-z0-9._@-]+")


def _account_name(remote: str, host: str, taken: set[str]) -> str:
    # Our names allow letters, digits, . _ - @ (they become metric labels and file names).
    base = _NAME_BAD_CHARS.sub("-", remote).strip("-.")[:60] or host[:60] or "account"
    name, n = base, 2
    while name.lower() in taken or name in {".", ".."}:
        name, n = f"{base}-{n}", n + 1
    taken.add(name.lower())
    return name


@dataclass(frozen=True, slots=True)
class _Smtp:
    """``[smtp]`` (``name`` None) or one ``[smtp_targets.NAME]``."""

    host: str
    port: int | None
    tls: _Tls
    username: str | None
    password: str | None
    name: str | None = None
    password_file: str | None = None


@dataclass(frozen=True, slots=True)
class _Result:
    service_interval: float | None
    smtp: _Smtp
    accounts: tuple[_Account, ...]
    notes: tuple[str, ...]
    targets: tuple[_Smtp, ...] = ()


def _target_name(host: str, port: int | None, taken: set[str]) -> str:
    """A name for the SMTP target of ``host`` (and ``port``): the host, in the characters a
    name allows (config: letters, digits, . _ - @), made unique; never "default"."""
    base = _NAME_BAD_CHARS.sub("-", host).strip("-.")[:56] or "smtp"
    if base.lower() in taken and port is not None:
        base = f"{base}-{port}"
    name, n = base, 2
    while name.lower() in taken or name.lower() == "default":
        name, n = f"{base}-{n}", n + 1
    taken.add(name.lower())
    return name


def _smtp_server(
    key: tuple[str, int | None], name: str | None, drafts: list[_Draft], password_dir: Path
) -> tuple[_Smtp, list[str]]:
    """One SMTP server of the rc file, for the drafts that deliver there, and its notes."""
    host, port = key
    notes: list[str] = []
    table = "[smtp]" if name is None else f"[smtp_targets.{name}]"
    tls = _Tls.NONE if is_loopback(host) else _Tls.STARTTLS
    if tls is _Tls.STARTTLS:
        notes.append(
            f'{table} tls = "starttls": fetchmail spoke plain SMTP to {host}; we require '
            "STARTTLS with a trusted certificate (set ca_file for a company CA, or "
            'tls = "none" on a trusted network)'
        )
    esmtp = next((d for d in drafts if d.esmtpname), None)
    password = esmtp.esmtppassword if esmtp else None
    password_file = None
    if esmtp is not None and password is None:
        file = "smtp.password" if name is None else f"smtp-{name}.password"
        password_file = str(password_dir / file)
        notes.append(
            f"{table} password_file: esmtpname without esmtppassword; write the password into "
            f"{password_file} (mode 0600)"
        )
    username = esmtp.esmtpname if esmtp else None
    return _Smtp(host, port, tls, username, password, name, password_file), notes


def _interpret(parsed: _Parsed, password_dir: Path) -> _Result:
    notes = list(parsed.notes)
    daemon: float | None = None
    postmaster: str | None = None
    for s in parsed.settings:
        notes.extend(_set_note(s))
        if s.name == "postmaster" and not s.negated and s.args:
            postmaster = s.args[0]
        if s.name == "daemon" and not s.negated and s.args and s.args[0].isdigit():
            daemon = float(s.args[0]) if int(s.args[0]) > 0 else None
    drafts: list[_Draft] = []
    defaults: list[_Option] = []
    for block in parsed.blocks:
        if block.kind == "defaults":
            defaults = [*block.server, *(o for u in block.users for o in u)]
            continue
        users = block.users or [[]]
        for user in users:
            line = user[0].line if user else block.line
            draft = _Draft(block.host, line, enabled=block.kind == "poll")
            for opt in [*defaults, *block.server, *user]:
                _apply(draft, opt)
            if block.kind == "skip":
                draft.note(block.line, "'skip': written with enabled = false")
            drafts.append(draft)
    # The first smtphost named is [smtp] (fetchmail's default is localhost, port 25); each
    # other one an SMTP target of its own, for the users that name it.
    smtp_hosts = [h for d in drafts for h in d.smtphosts[:1]]
    first = smtp_hosts[0] if smtp_hosts else None
    default = (first.host, first.port) if first else ("localhost", None)
    if first is None:
        notes.append(
            "[smtp] host: the rc file names no smtphost; fetchmail then delivers to "
            "localhost:25. Set host to your Exchange server"
        )
    by_server: dict[tuple[str, int | None], list[_Draft]] = {default: []}
    for d in drafts:
        key = (d.smtphosts[0].host, d.smtphosts[0].port) if d.smtphosts else default
        by_server.setdefault(key, []).append(d)
        if first is not None and not d.smtphosts:
            notes.append(
                f"line {d.line}: poll {d.host}: no smtphost (fetchmail used localhost); "
                f"[smtp] ({default[0]}) is used for it"
            )
        if len(d.smtphosts) > 1:
            notes.append(
                f"line {d.smtphosts[1].line}: smtphost fallback list; only the first host is used"
            )
    smtp, smtp_notes = _smtp_server(default, None, by_server[default], password_dir)
    notes += smtp_notes
    names: dict[tuple[str, int | None], str] = {}
    targets: list[_Smtp] = []
    taken: set[str] = set()
    for key, delivering in by_server.items():
        if key == default:
            continue
        name = names[key] = _target_name(key[0], key[1], taken)
        target, target_notes = _smtp_server(key, name, delivering, password_dir)
        targets.append(target)
        host = key[0] if key[1] is None else f"{key[0]}/{key[1]}"
        line = next(h.line for d in delivering for h in d.smtphosts[:1])
        notes.append(
            f"line {line}: smtphost {host} written as [smtp_targets.{name}], for the accounts "
            f'that name it (smtp = "{name}")'
        )
        notes += target_notes
    domain = next((d.smtpaddress for d in drafts if d.smtpaddress), None) or default[0]
    accounts: list[_Account] = []
    taken = set()
    for d in drafts:
        account = _finish(d, domain, daemon, password_dir, taken, postmaster)
        notes.extend(d.notes)
        if account is not None:
            key = (d.smtphosts[0].host, d.smtphosts[0].port) if d.smtphosts else default
            accounts.append(replace(account, smtp=names.get(key)))
    if daemon is None and accounts:
        notes.append(
            "[service] poll_interval: no 'set daemon' (fetchmail ran from cron or with -d?); "
            "the default, 15m, is used"
        )
    return _Result(daemon, smtp, tuple(accounts), tuple(dict.fromkeys(notes)), tuple(targets))


def _set_note(s: _Option) -> list[str]:
    line = f"line {s.line}: "
    match s.name:
        case "daemon":
            return []
        case "logfile" | "syslog":
            return [line + f"'set {s.name}': logs go to standard error (journald, containers)"]
        case "idfile":
            return [line + "'set idfile': the ledger in [service] state_dir tracks UIDLs"]
        case "pidfile":
            return [line + "'set pidfile': not needed; a lock in state_dir keeps one instance"]
        case "postmaster" | "bouncemail" | "spambounce" | "softbounce":
            no = "no " if s.negated else ""
            return [
                line + f"'set {no}{s.name}': mail refused permanently goes to the dead-letter "
                "store ([dead_letter]) instead of a bounce"
            ]
        case "invisible":
            return [line + "'set invisible' is not supported: a Received: line is always added"]
        case "showdots" | "properties" | "no":
            return []
        case name:
            return [line + f"'set {name}' is not supported; ignored"]


def _finish(
    d: _Draft,
    domain: str,
    daemon: float | None,
    password_dir: Path,
    taken: set[str],
    postmaster: str | None,
) -> _Account | None:
    where = f"poll {d.host}"
    proto = d.proto
    auth = d.auth
    if proto == "apop":
        auth = "apop"
    elif proto == "auto":
        d.note(d.line, f"{where}: 'proto auto' converted as POP3")
    elif proto != "pop3":
        d.note(d.line, f"{where}: protocol {proto.upper()} is not supported (POP3 only); skipped")
        return None
    enabled = d.enabled
    comments: list[str] = []
    remote = d.remote
    if remote is None:
        remote = "change-me"
        enabled = False
        d.note(d.line, f"{where}: no 'user'; fetchmail uses the login name. Set username")
    name = _account_name(remote if d.remote else d.host, d.host, taken)
    password = d.password
    if password is None:
        password_file = password_dir / f"{name}.password"
        d.note(
            d.line,
            f"account {name}: no password in the rc file (fetchmail asks or reads ~/.netrc); "
            f"write it into {password_file} (first line, mode 0600)",
        )
    pairs, wildcard = _local_entries(d.local_names)
    shared: _Shared | None = None
    # fetchmail(1), "Multidrop mode": a user with more than one local name, or with `*`, is a
    # multidrop mailbox; with one local name every message goes to it (single-drop), and
    # localdomains/envelope are not consulted.
    if wildcard or len(pairs) > 1:
        shared, deliver_to, placeholder = _shared(d, pairs, wildcard, domain, name, postmaster)
        if placeholder:
            enabled = False
    else:
        for line, what in ((d.localdomains_line, "localdomains"), (d.envelope_line, "envelope")):
            if line:
                d.note(
                    line,
                    f"account {name}: '{what}' only matters for a multidrop mailbox (several "
                    "local names or '*'); fetchmail ignores it with one local name, so do we",
                )
        deliver_to = _recipients(d, [local for _, local in pairs], domain, name)
    if not deliver_to:
        deliver_to = (f"change-me@{domain}",)
        enabled = False
        d.note(
            d.line,
            f"account {name}: no local recipient ('is ... here'); fetchmail delivers to the "
            "user running it. Set deliver_to",
        )
    if d.keep:
        enabled = False
        comments.append("keep: leave_on_server = true; see the notes before enabling it")
        d.note(
            d.keep_line,
            f"account {name}: 'keep' is written as leave_on_server = true (mail stays upstream, "
            'never delivered twice; delete_after = "30d" would expire it). The mailbox still '
            "holds mail fetchmail already delivered, which our ledger has never seen, so the "
            "account is written with enabled = false; empty the mailbox (or accept those "
            "duplicates) before enabling it",
        )
    if d.ssl:
        tls = _Tls.IMPLICIT
    elif d.sslproto == "":
        tls = _Tls.NONE
        d.note(d.line, f"account {name}: sslproto '' turns TLS off: the password goes in clear")
    else:
        tls = _Tls.STARTTLS
        if d.sslproto is None:
            d.note(
                d.line,
                f'account {name}: tls = "starttls": fetchmail used STLS only when offered; we '
                'require it (tls = "none" if the server has no TLS)',
            )
    if not d.verify:
        d.note(d.line, f"account {name}: 'no sslcertck' written as verify_certificate = false")
    interval: float | None = None
    if d.interval is not None:
        if daemon is None:
            d.note(d.interval_line, "'interval' without 'set daemon'; ignored")
        else:
            interval = daemon * d.interval
    max_size, oversize = _size_limit(d, name, comments)
    if not enabled and d.enabled and not d.keep:
        comments.append("placeholders: see the notes")
    return _Account(
        name=name,
        line=d.line,
        host=d.host,
        port=d.port,
        tls=tls,
        verify_certificate=d.verify,
        ca_file=d.ca_file,
        username=remote,
        password=password,
        auth=auth,
        deliver_to=deliver_to,
        poll_interval=interval,
        enabled=enabled,
        comments=tuple(comments),
        max_message_size=max_size,
        oversize=oversize,
        leave_on_server=d.keep,
        shared=shared,
    )


def _recipients(d: _Draft, names: list[str], domain: str, name: str) -> tuple[str, ...]:
    out: list[str] = []
    for local in names:
        address = _local_address(d, local, domain, name)
        if address is not None and address not in out:
            out.append(address)
    return tuple(out)


def _local_address(
    d: _Draft, local: str, domain: str, name: str, *, quiet: bool = False
) -> str | None:
    """A fetchmail local name as an Exchange address (``@domain`` added), or None with a note.

    ``quiet`` leaves out the note on the added domain (the caller writes one for all names).
    """
    address = local if "@" in local else f"{local}@{domain}"
    if not is_plain_address(address):  # what [[accounts]] deliver_to takes
        d.note(d.local_line, f"account {name}: a local name is not a mail address; dropped")
        return None
    if "@" not in local and not quiet:
        d.note(
            d.local_line,
            f"account {name}: local name {local} written as {address} (fetchmail adds "
            "smtpaddress or the smtphost); check Exchange accepts it",
        )
    return address


def _local_entries(args: tuple[str, ...]) -> tuple[list[tuple[str, str]], bool]:
    """``is`` names as (remote, local) pairs, and whether ``*`` was among them.

    A plain name stands for itself; ``"remote" = "local"`` maps a server-side name to a local
    one (fetchmail(1), "The run control file": the ``=`` map operator).
    """
    pairs: list[tuple[str, str]] = []
    wildcard = False
    i = 0
    while i < len(args):
        word = args[i]
        if word == "*":
            wildcard = True
            i += 1
        elif word == "=":
            i += 1  # a stray "=" with no name before it
        elif args[i + 1 : i + 2] == ("=",):
            local = args[i + 2] if i + 2 < len(args) else "="
            if local in {"=", "*"}:  # "remote" = with nothing after it: the name itself
                pairs.append((word, word))
                i += 2
            else:
                pairs.append((word, local))
                i += 3
        else:
            pairs.append((word, word))
            i += 1
    return pairs, wildcard


def _shared(
    d: _Draft,
    pairs: list[tuple[str, str]],
    wildcard: bool,
    domain: str,
    name: str,
    postmaster: str | None,
) -> tuple[_Shared, tuple[str, ...], bool]:
    """A fetchmail multidrop mailbox as ``[accounts.shared]``.

    Returns the table, the account's fallback ``deliver_to`` and whether a placeholder was
    written (the account must then stay disabled).
    """
    where = f"account {name}"
    placeholder = False
    domains = tuple(dict.fromkeys(v.lower().rstrip(".") for v in d.localdomains if _is_domain(v)))
    if len(domains) < len(d.localdomains):
        d.note(d.localdomains_line, f"{where}: a 'localdomains' value is not a domain; dropped")
    if not domains:
        domains, placeholder = ("change-me.invalid",), True
        d.note(
            d.local_line,
            f"{where}: multidrop without 'localdomains' (fetchmail took the mail server's own "
            "name, 'aka' names or DNS to tell which addresses are local): [accounts.shared] "
            'domains is written as ["change-me.invalid"] and the account with enabled = false; '
            "put your mail domains there",
        )
    headers: tuple[str, ...] | None
    if d.envelope is None:
        headers = None
        d.note(
            d.local_line,
            f"{where}: no 'envelope': fetchmail read the 'for' clause of Received: lines; we "
            "read the envelope_headers default (Delivered-To, X-Original-To, X-Envelope-To), "
            "then To and Cc",
        )
    elif d.envelope == "":
        # `no envelope`: recipients from To/Cc only; an empty list is allowed.
        headers = ()
    elif is_field_name(d.envelope):
        headers = (d.envelope,)
    else:
        headers = None
        d.note(d.envelope_line, f"{where}: 'envelope' names no header field; default used")
    if d.envelope_count is not None:
        d.note(
            d.envelope_line,
            f"{where}: 'envelope {d.envelope_count} HEADER': the skip count is not supported; "
            "instead the catch-all's own address is never taken as a recipient (username when "
            "it is an address, and [accounts.shared] ignore_addresses: add it there if not)",
        )
    rules: list[_Rule] = []
    if any("@" not in local for _, local in pairs) or wildcard:
        d.note(
            d.local_line,
            f"{where}: local names without a domain are written with @{domain} (fetchmail "
            "adds smtpaddress or the smtphost); check Exchange accepts them",
        )
    for remote, local in pairs:
        address = _local_address(d, local, domain, name, quiet=True)
        if address is None:
            continue
        # A server-side name without a domain is a local part at each of our domains.
        matches = [remote] if "@" in remote else [f"{remote}@{dom}" for dom in domains]
        for match in matches:
            if is_address_pattern(match):
                rules.append(_Rule(match.lower(), (address,)))
            else:
                d.note(d.local_line, f"{where}: a server-side name is not an address; dropped")
    fallback = _postmaster(d, postmaster, domain, name)
    rewrite: str | None = None
    if wildcard:
        # `*`: deliver to the same local name, here at the Exchange domain.
        if domains != (domain,):
            rewrite = domain
    else:
        # Without `*` fetchmail delivers only to the names listed, and a message naming none
        # of them to the postmaster; a last rule per domain does the same here, instead of
        # offering Exchange addresses it may not have.
        rules += [_Rule(f"*@{dom}", fallback) for dom in domains]
        d.note(
            d.local_line,
            f"{where}: multidrop without '*': addresses of {', '.join(domains)} that no local "
            f"name maps go to {', '.join(fallback)} (the last rules)",
        )
    shared = _Shared(domains, headers, rewrite, tuple(rules))
    return shared, fallback, placeholder


def _postmaster(d: _Draft, postmaster: str | None, domain: str, name: str) -> tuple[str, ...]:
    """The fallback deliver_to: fetchmail gives mail naming no local user to its postmaster."""
    if postmaster is not None:
        address = _local_address(d, postmaster, domain, name, quiet=True)
        if address is not None:
            d.note(
                d.local_line,
                f"account {name}: deliver_to = [{address}] ('set postmaster') gets the mail "
                "naming nobody of ours",
            )
            return (address,)
    address = f"postmaster@{domain}"
    d.note(
        d.local_line,
        f"account {name}: deliver_to = [{address}] gets the mail naming nobody of ours "
        "(fetchmail's postmaster, the user running it, unless 'set postmaster'); RFC 5321 "
        "§4.5.1 requires that address to exist; change it to the mailbox that should get it",
    )
    return (address,)


def _size_limit(d: _Draft, name: str, comments: list[str]) -> tuple[int | None, str | None]:
    """fetchmail's ``limit``: larger mail is left on the server, and warned about."""
    if d.limit is None:
        if d.limitflush:
            d.note(d.line, f"account {name}: 'limitflush' without 'limit'; ignored")
        return None, None
    if d.limitflush:
        d.note(
            d.limit_line,
            f"account {name}: 'limitflush' deleted oversized mail unread; it is dead-lettered "
            'instead (oversize = "dead-letter"): kept in the dead-letter store, never sent',
        )
        comments.append(f"limit {d.limit} limitflush: larger mail goes to the dead-letter store")
        return d.limit, "dead-letter"
    comments.append(f"limit {d.limit}: larger mail stays on the server, with one notice each")
    return d.limit, "leave"


def _is_domain(value: str) -> bool:
    return is_domain(value.lower().rstrip("."))  # as [accounts.shared] domains stores it


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _toml_str(text: str) -> str:
    """A TOML basic string (TOML 1.0 §String): escape quote, backslash and control characters."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    """A TOML key (TOML 1.0 §Keys): bare when it can be, else quoted ("mail.firma.de")."""
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _duration(seconds: float) -> str:
    value = format_duration(seconds)
    return _toml_str(value) if isinstance(value, str) else repr(value)


def _tls_value(tls: _Tls) -> str:
    match tls:
        case _Tls.IMPLICIT:
            return '"implicit"'
        case _Tls.STARTTLS:
            return '"starttls"'
        case _Tls.NONE:
            return '"none"'
        case _:
            assert_never(tls)


def _render(result: _Result, source: str, password_dir: Path) -> str:
    lines = [
        f"# pop3-connector configuration converted from {source}",
        "# by pop3-connector import-fetchmailrc. Read the notes it printed, then run",
        "# pop3-connector check. Keep this file mode 0600 if it holds a password.",
    ]
    if result.service_interval is not None:
        lines += ["", "[service]", f"poll_interval = {_duration(result.service_interval)}"]
    for smtp in (result.smtp, *result.targets):
        table = "[smtp]" if smtp.name is None else f"[smtp_targets.{_toml_key(smtp.name)}]"
        lines += ["", table, f"host = {_toml_str(smtp.host)}"]
        if smtp.port is not None:
            lines.append(f"port = {smtp.port}")
        lines.append(f"tls = {_tls_value(smtp.tls)}")
        if smtp.username is not None:
            lines.append(f"username = {_toml_str(smtp.username)}")
            if smtp.password is not None:
                lines.append(f"password = {_toml_str(smtp.password)}")
            elif smtp.password_file is not None:
                lines.append(f"password_file = {_toml_str(smtp.password_file)}")
    for a in result.accounts:
        lines += ["", f"# from line {a.line}", *(f"# {c}" for c in a.comments), "[[accounts]]"]
        lines += [f"name = {_toml_str(a.name)}", f"host = {_toml_str(a.host)}"]
        if a.port is not None:
            lines.append(f"port = {a.port}")
        lines.append(f"tls = {_tls_value(a.tls)}")
        if not a.verify_certificate:
            lines.append("verify_certificate = false")
        if a.ca_file is not None:
            lines.append(f"ca_file = {_toml_str(a.ca_file)}")
        lines.append(f"username = {_toml_str(a.username)}")
        if a.password is not None:
            lines.append(f"password = {_toml_str(a.password)}")
        else:
            lines.append(f"password_file = {_toml_str(str(password_dir / f'{a.name}.password'))}")
        if a.auth != "auto":
            lines.append(f"auth = {_toml_str(a.auth)}")
        lines.append("deliver_to = [" + ", ".join(_toml_str(r) for r in a.deliver_to) + "]")
        if a.smtp is not None:
            lines.append(f"smtp = {_toml_str(a.smtp)}")
        if a.poll_interval is not None:
            lines.append(f"poll_interval = {_duration(a.poll_interval)}")
        if a.max_message_size is not None:
            lines.append(f"max_message_size = {a.max_message_size}")
        if a.oversize is not None:
            lines.append(f"oversize = {_toml_str(a.oversize)}")
        if a.leave_on_server:
            lines.append("leave_on_server = true")
        if not a.enabled:
            lines.append("enabled = false")
        if a.shared is not None:
            lines += _render_shared(a.shared)
    return "\n".join(lines) + "\n"


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


def _render_shared(shared: _Shared) -> list[str]:
    """``[accounts.shared]`` and its rules; they follow every plain key of the account."""
    lines = ["", "[accounts.shared]", f"domains = {_toml_list(shared.domains)}"]
    if shared.envelope_headers is not None:
        lines.append(f"envelope_headers = {_toml_list(shared.envelope_headers)}")
    if shared.rewrite_domain is not None:
        lines.append(f"rewrite_domain = {_toml_str(shared.rewrite_domain)}")
    for rule in shared.rules:
        lines += [
            "",
            "[[accounts.shared.rules]]",
            f"match = {_toml_str(rule.match)}",
            f"deliver_to = {_toml_list(rule.deliver_to)}",
        ]
    return lines


def convert(
    text: str, *, source: str = "<fetchmailrc>", password_dir: Path = DEFAULT_PASSWORD_DIR
) -> tuple[str, list[str]]:
    """Turn the text of a ``.fetchmailrc`` into our TOML.

    Returns ``(toml, notes)``: the configuration (one ``[[accounts]]`` per fetchmail user of a
    POP3 server) and one line per thing that could not be translated exactly, each starting
    with the rc file's line number.  A missing password becomes ``password_file`` under
    ``password_dir``.  Notes never contain a password.
    """
    notes: list[str] = []
    try:
        tokens = _tokenize(text)
    except _RcSyntaxError as exc:
        notes.append(str(exc))
        # Keep what came before the broken string: cut the text at its line.
        head = "\n".join(text.splitlines()[: exc.line - 1])
        tokens = _tokenize(head)
    parsed = _parse(tokens)
    result = _interpret(parsed, password_dir)
    notes.extend(result.notes)
    if not result.accounts:
        notes.append(f"{source}: no POP3 account could be converted")
    # A note quotes hosts, names and addresses from the rc file, and any of them may be a
    # password written in the wrong place (`poll Pw-Sec-9` beside `password Pw-Sec-9`).
    secrets = _passwords(parsed)
    return _render(result, source, password_dir), [mask_secrets(n, secrets) for n in notes]


def _passwords(parsed: _Parsed) -> set[str]:
    """Every ``password`` and ``esmtppassword`` value of the rc file."""
    options = [*parsed.settings]
    for block in parsed.blocks:
        options += block.server
        for user in block.users:
            options += user
    return {
        arg
        for opt in options
        if opt.name in ("password", "esmtppassword")
        for arg in opt.args
        if arg
    }


def main(path: Path) -> int:
    """Print the TOML converted from the rc file at ``path`` and the notes on standard error.

    The TOML is validated by the config's own models first (:func:`config_text_problems`,
    secrets unread): one that would not load is not printed; its problems are, each with its
    key.  Returns 0, or 1 when the file cannot be read, no account could be converted, or the
    result would not load.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        print(f"pop3-connector: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 1
    toml, notes = convert(text, source=str(path))
    nothing = any(n.endswith("no POP3 account could be converted") for n in notes)
    problems = [] if nothing else config_text_problems(toml)
    if not nothing and not problems:
        sys.stdout.write(toml)
        inline = sum(line.startswith("password = ") for line in toml.splitlines())
        if inline:
            # By design (the rc file held them in clear too); but whoever redirects the output
            # into a file decides who can read it.
            notes.append(
                f"standard output holds {inline} password(s) from {path} in clear text "
                "(password = ...): write it to a file only you can read (umask 077; chmod 600), "
                "or move each into a password_file"
            )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(
            f"pop3-connector: the configuration converted from {path} would not load, so it "
            "is not printed; change the values named above in the rc file and convert again",
            file=sys.stderr,
        )
    return 1 if nothing or problems else 0
