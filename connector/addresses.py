"""Mail addresses read from hostile text, in time linear in its length: pure functions, no I/O.

Two grammars, two scanners, each one pass over a string whose length the caller has capped:

* :func:`mailbox` reads an RFC 5321 §4.1.2 ``Mailbox`` (what goes between the brackets of
  ``MAIL FROM:<...>`` and ``RCPT TO:<...>``), with the RFC 6531 §3.3 extensions (UTF-8 in the
  local part and in the domain), and gives it back with the least quoting the grammar allows
  (RFC 5321 §4.1.2: "the form that uses the minimum quoting possible").  :func:`reverse_path`
  reads a ``Return-Path`` value (RFC 5321 §4.4: the Reverse-path as the final MTA wrote it):
  ``<>``, ``<mailbox>``, a source route to ignore (RFC 5321 §4.1.1.3, Appendix C), a comment
  after it, or a bare mailbox without brackets as some MTAs write it.
* :func:`address_list` reads the addr-specs of an RFC 5322 §3.4 address-list (``To``, ``Cc``,
  ``Delivered-To``): display names, angle brackets, groups, quoted strings, comments.

And the plain forms an administrator writes in the config (:func:`is_plain_address`,
:func:`is_domain`, :func:`is_field_name`, :func:`is_address_pattern`): ``connector.config``
validates with them, and ``import-fetchmailrc`` checks with them what it writes, so the two
cannot drift apart.

Why our own and not ``email.utils``: ``getaddresses`` and ``parseaddr`` read comments by
recursion, so a few hundred ``(`` in one header raised ``RecursionError`` and a message could
stop the service; and regular expressions over such text are where cubic backtracking hides
(a ``Return-Path`` of ``<`` and spaces took seconds).  Here comments are skipped with a depth
counter, every loop moves forward, and the only regular expressions have no nested or
overlapping quantifiers.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = [
    "MAX_ADDRESS",
    "MAX_LIST_TEXT",
    "MAX_LOCAL_PART",
    "MAX_PATH_TEXT",
    "address_list",
    "address_needs_smtputf8",
    "is_address_pattern",
    "is_domain",
    "is_field_name",
    "is_plain_address",
    "mailbox",
    "mailbox_problem",
    "read_address_list",
    "reverse_path",
]

MAX_ADDRESS: Final = 254
"""RFC 5321 §4.5.3.1.3: a path is at most 256 octets, the brackets included."""
MAX_LOCAL_PART: Final = 64
"""RFC 5321 §4.5.3.1.1."""
MAX_LIST_TEXT: Final = 16 * 1024
"""The most characters of one address-list read (connector.headers.MAX_VALUE): some 400
addresses; what lies past this is not looked at."""
MAX_PATH_TEXT: Final = 1024
"""The longest Return-Path value read at all: a path of 256 octets leaves room for white space
and a comment; anything longer is not a path we could send."""

# RFC 5322 §3.2.3 atext (RFC 5321 §4.1.2 Atom uses it), ASCII part.
_LET_DIG: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ATEXT: Final = _LET_DIG | frozenset("!#$%&'*+-/=?^_`{|}~")
# RFC 5321 §4.1.3 address-literal content as we accept it: IPv4, "IPv6:..." and general
# literals ("tag:content") are all made of these.
_LITERAL: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:-")


def address_needs_smtputf8(address: str) -> bool:
    """Whether ``address`` can go on the envelope only with SMTPUTF8 (RFC 6531 §3.3): it holds
    a character outside ASCII.  For an address :func:`mailbox_problem` accepted."""
    return not address.isascii()


def _utf8_ok(ch: str) -> bool:
    """A non-ASCII character RFC 6531 §3.3 lets into atext, qtext or a U-label: not a
    surrogate (text that was not UTF-8), not a control, format, separator or unassigned one."""
    return unicodedata.category(ch)[0] not in "CZ"


def _ldh_or_utf8(ch: str) -> bool:
    """A letter, digit, hyphen, or a character RFC 6531 lets into a U-label."""
    return ch in _LET_DIG or ch == "-" or (ord(ch) > 0x7F and _utf8_ok(ch))


def _dot_string(text: str, *, strict: bool = True) -> bool:
    """RFC 5321 §4.1.2 Dot-string: Atom *("." Atom), Atom = 1*atext (RFC 6531: UTF-8 too).

    Not ``strict``: dots anywhere, as in real addresses that break the rule (``a..b@``, a
    final dot) and that MTAs take (Postfix unless ``strict_rfc821_envelopes``).
    """
    if not text:
        return False
    if strict and (text[0] == "." or text[-1] == "." or ".." in text):
        return False
    return all(ch in _ATEXT or ch == "." or (ord(ch) > 0x7F and _utf8_ok(ch)) for ch in text)


def _quoted_content(text: str, start: int) -> tuple[str, int] | None:
    """The content of the Quoted-string opening at ``text[start]`` (a ``"``), unescaped, and
    the index after its closing quote; None when it is not one (RFC 5321 §4.1.2: qtextSMTP is
    %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP is "\\" then %d32-126; RFC 6531 adds UTF-8)."""
    out: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= n or not 32 <= ord(text[i + 1]) <= 126:
                return None
            out.append(text[i + 1])
            i += 2
            continue
        code = ord(ch)
        if not (32 <= code <= 126 or (code > 0x7F and _utf8_ok(ch))):
            return None
        out.append(ch)
        i += 1
    return None


def _domain_problem(domain: str) -> str | None:
    """RFC 5321 §4.1.2 Domain (sub-domains of letters, digits and inner hyphens; RFC 6531
    U-labels) or §4.1.3 address-literal.  A final dot (a fully qualified name) is tolerated."""
    if domain.startswith("["):
        inner = domain[1:-1]
        if not domain.endswith("]") or not inner or not set(inner) <= _LITERAL:
            return "invalid address literal"
        return None
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    for label in labels:
        if not label or len(label) > 63:
            return "invalid domain"
        if label.isascii():
            if label[0] not in _LET_DIG or label[-1] not in _LET_DIG:
                return "invalid domain"
            if not all(ch in _LET_DIG or ch == "-" for ch in label):
                return "invalid characters"
        elif not all(_ldh_or_utf8(ch) for ch in label):
            return "invalid characters"
    return None


def _scan_mailbox(text: str) -> tuple[str | None, str | None]:
    """(the mailbox with minimal quoting, None) or (None, why it is not a Mailbox)."""
    if len(text) > MAX_ADDRESS or len(text.encode("utf-8", "surrogatepass")) > MAX_ADDRESS:
        return None, "too long"
    if text.startswith('"'):
        quoted = _quoted_content(text, 0)
        if quoted is None:
            return None, "invalid quoted local part"
        content, end = quoted
        if text[end : end + 1] != "@":
            return None, "not of the form local@domain"
        # RFC 5321 §4.1.2: quote only when the local part is not a Dot-string; then only the
        # two characters that need it are escaped.
        local = (
            content
            if _dot_string(content)
            else '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
        )
        domain = text[end + 1 :]
    else:
        local, at, domain = text.partition("@")
        if not at or not local:
            return None, "not of the form local@domain"
        if not _dot_string(local, strict=False):
            return None, "invalid characters"
    if not domain:
        return None, "not of the form local@domain"
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART:
        return None, "local part too long"
    problem = _domain_problem(domain)
    if problem is not None:
        return None, problem
    return f"{local}@{domain}", None


def mailbox(text: str) -> str | None:
    """``text`` as an RFC 5321 Mailbox with minimal quoting, or None when it is not one."""
    return _scan_mailbox(text)[0]


def mailbox_problem(text: str) -> str | None:
    """Why ``text`` is not an RFC 5321 (RFC 6531) Mailbox that can go on the envelope as it is,
    or None.  Any Mailbox is accepted, also one quoted more than it needs."""
    return _scan_mailbox(text)[1]


def _skip_comment(text: str, i: int) -> int | None:
    """The index after the comment opening at ``text[i]`` (RFC 5322 §3.2.2: nested, with
    quoted-pairs), or None when it never closes.  A counter, not recursion."""
    depth, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _only_cfws(text: str) -> bool:
    """Whether ``text`` is nothing but white space and comments (RFC 5322 §3.2.2 CFWS)."""
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
        elif text[i] == "(":
            after = _skip_comment(text, i)
            if after is None:
                return False
            i = after
        else:
            return False
    return True


def _path_end(text: str, i: int, stops: str) -> int:
    """The index of the first character of ``stops`` at or after ``i`` that is not inside a
    quoted string (len(text) if none)."""
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            quoted = _quoted_content(text, i)
            if quoted is None:
                return n
            i = quoted[1]
            continue
        if ch in stops:
            return i
        i += 1
    return n


def _route_end(text: str) -> int | None:
    """The index of the colon that ends the source route (RFC 5321 §4.1.2 A-d-l: "@" domain
    *("," "@" domain)) at the start of ``text``, or None when it is not one."""
    i, n = 0, len(text)
    while i < n and text[i] == "@":
        i += 1
        if text[i : i + 1] == "[":
            i = text.find("]", i) + 1
            if i == 0:
                return None
        else:
            while i < n and text[i] not in ",:":
                i += 1
        if i >= n:
            return None
        if text[i] == ":":
            return i
        if text[i] != ",":
            return None
        i += 1
    return None


def reverse_path(value: str) -> str | None:
    """The mailbox of a ``Return-Path`` value (RFC 5321 §4.1.2 Reverse-path, §4.4), with
    minimal quoting; ``""`` for the null path ``<>``; None when it cannot be read.

    Accepted: ``<mailbox>``, ``<>``, a source route ``<@a,@b:mailbox>`` (ignored, RFC 5321
    §4.1.1.3), white space inside the brackets, a comment after them, and a bare mailbox
    without brackets.  Anything else after the path (a second address) makes it unreadable.
    """
    if len(value) > MAX_PATH_TEXT:
        return None
    text = value.strip(" \t\r\n")
    if text.startswith("<"):
        close = _path_end(text, 1, "<>")
        if close >= len(text) or text[close] != ">":
            return None
        inner, rest = text[1:close].strip(" \t"), text[close + 1 :]
    else:
        end = _path_end(text, 0, " \t\r\n(<>")
        inner, rest = text[:end], text[end:]
    if not _only_cfws(rest):
        return None
    if not inner:
        return ""
    if inner.startswith("@"):
        colon = _route_end(inner)
        if colon is None:
            return None
        inner = inner[colon + 1 :]
    return mailbox(inner)


# RFC 5322 §3.4 address-list tokens.  Every alternative starts with its own character class,
# so at each position at most one applies and nothing is tried twice.
_TOKEN: Final = re.compile(r'\\.|[()<>,;:@."\[\]]|\s+|[^\\()<>,;:@."\[\]\s]+', re.S)


def address_list(value: str) -> list[str]:
    """The addr-specs of :func:`read_address_list`."""
    return read_address_list(value)[0]


def read_address_list(value: str) -> tuple[list[str], bool]:
    """The addr-specs named in an RFC 5322 §3.4 address-list, in order, as written (quoted
    local parts keep their quotes; check each with :func:`mailbox_problem`), and whether the
    value was read whole: False when it was cut at :data:`MAX_LIST_TEXT` or ends inside a
    comment, a quoted string, a domain literal or angle brackets.

    Display names, comments (nested), groups (``name: a, b;``) and source routes inside angle
    brackets are dropped; a mailbox in angle brackets is taken from them.  Malformed parts give
    malformed candidates, never an exception.  One pass over the tokens of the first
    :data:`MAX_LIST_TEXT` characters of ``value``.
    """
    out: list[str] = []
    outer: list[str] = []  # tokens of the current mailbox outside angle brackets
    inner: list[str] | None = None  # tokens inside its angle brackets, once seen
    in_angle = False
    depth = 0  # inside a comment
    quote: list[str] | None = None  # a quoted string being read
    literal: list[str] | None = None  # a domain literal being read

    def add(piece: str) -> None:
        target = inner if in_angle and inner is not None else outer
        if piece == " ":
            # RFC 5322 §3.4.1 (obs-local-part, obs-domain): white space around "@" and "." is
            # not part of the address.
            if target and target[-1] not in ("@", ".", " "):
                target.append(piece)
            return
        if piece in ("@", ".") and target and target[-1] == " ":
            target.pop()
        target.append(piece)

    def flush() -> None:
        nonlocal outer, inner
        parts = inner if inner is not None else outer
        candidate = "".join(parts).strip()
        if candidate:
            out.append(candidate)
        outer, inner = [], None

    for m in _TOKEN.finditer(value, 0, MAX_LIST_TEXT):
        piece = m.group()
        if depth:
            if piece == "(":
                depth += 1
            elif piece == ")":
                depth -= 1
            continue
        if quote is not None:
            quote.append(piece)
            if piece == '"':
                add("".join(quote))
                quote = None
            continue
        if literal is not None:
            literal.append(piece)
            if piece == "]":
                add("".join(literal))
                literal = None
            continue
        if piece[0].isspace():
            add(" ")
            continue
        match piece:
            case "(":
                depth = 1
            case '"':
                quote = ['"']
            case "[":
                literal = ["["]
            case "<":
                in_angle, inner = True, []
            case ">":
                in_angle = False
            case ",":
                if not in_angle:  # inside the brackets: a source route's separator
                    flush()
            case ";":
                in_angle = False
                flush()
            case ":":
                if in_angle and inner is not None:
                    inner = []  # the end of a source route: the mailbox follows
                elif not in_angle:
                    outer = []  # a group's display name
            case _:
                add(piece)
    whole = not (depth or in_angle) and quote is None and literal is None
    whole = whole and len(value) <= MAX_LIST_TEXT
    if quote is not None:
        add("".join(quote))
    flush()
    return out, whole


# --------------------------------------------------------------------------------------------
# The plain forms of the config
# --------------------------------------------------------------------------------------------

# RFC 5322 §3.2.3 dot-atom local part (no quoted strings) and an RFC 5321 §4.1.2 domain.  ASCII
# only: a non-ASCII address needs SMTPUTF8, which an Exchange relay may not offer.  Each
# repetition starts with its own literal ("." or "@"), so no two alternatives overlap.
_ATEXT_RE: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL_RE: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_ADDRESS: Final = re.compile(rf"{_ATEXT_RE}(?:\.{_ATEXT_RE})*@{_LABEL_RE}(?:\.{_LABEL_RE})*")
_DOMAIN_NAME: Final = re.compile(rf"{_LABEL_RE}(?:\.{_LABEL_RE})*")
# RFC 5322 §3.6.8 field names (ftext: printable ASCII except the colon).
_FIELD_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
# A routing rule's pattern: an address where * and ? are wildcards ("*@sales.firma.example").
_ADDRESS_PATTERN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\[\]-]+@[A-Za-z0-9.*?\[\]-]+")


def is_plain_address(value: str) -> bool:
    """``user@domain`` as the config takes it: a dot-atom local part, a domain of LDH labels,
    ASCII, at most :data:`MAX_ADDRESS` characters, no brackets or quotes."""
    return len(value) <= MAX_ADDRESS and _PLAIN_ADDRESS.fullmatch(value) is not None


def is_domain(value: str) -> bool:
    """An ASCII domain name of LDH labels, at most 253 characters (give it lower case and
    without a final dot, as the config stores it)."""
    return len(value) <= 253 and _DOMAIN_NAME.fullmatch(value) is not None


def is_field_name(value: str) -> bool:
    """A header field name (RFC 5322 §3.6.8), at most 76 characters: ``Delivered-To``."""
    return _FIELD_NAME.fullmatch(value) is not None


def is_address_pattern(value: str) -> bool:
    """A routing rule's ``match``: an address in which ``*`` and ``?`` are wildcards."""
    return _ADDRESS_PATTERN.fullmatch(value) is not None
