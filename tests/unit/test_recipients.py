"""connector.recipients: who a shared (catch-all) mailbox's message is for, read from its headers.

Table tests of :func:`route` (envelope headers, To/Cc, rules, rewrite, fallback), the header
reader under odd input (folding, bare LF, 8-bit bytes, a huge header block), ``message_id``,
and a hypothesis property: ``route`` never raises and always names someone sendable.

Profiles: ``dev`` (the default, fast) and ``ci`` (thorough); choose with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.recipients import (
    DEFAULT_ENVELOPE_HEADERS,
    Routing,
    Rule,
    SharedMailbox,
    message_id,
    route,
)
from connector.smtp import address_problem

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

FALLBACK = ("undeliverable@firma.local",)
OURS = SharedMailbox(domains=frozenset({"firma.example", "firma.de"}))
RULED = SharedMailbox(
    domains=frozenset({"firma.example"}),
    rules=(
        Rule("info@firma.example", ("info@firma.local", "chef@firma.local")),
        Rule("sales-*@firma.example", ("sales@firma.local",)),
        Rule("?@firma.example", ("short@firma.local",)),
        Rule("dev-list@lists.example.org", ("developers@firma.local",)),
        # Never reached for sales-x@: the rule above matches first.
        Rule("sales-x@firma.example", ("never@firma.local",)),
    ),
    rewrite_domain="firma.local",
)


def msg(*lines: str, body: str = "body", eol: str = "\r\n") -> bytes:
    """A message from header lines (already folded if wanted) and a body."""
    return (eol.join(lines) + eol + eol + body + eol).encode("ascii")


def rt(raw: bytes, shared: SharedMailbox = OURS, fallback: Sequence[str] = FALLBACK) -> Routing:
    return route(raw, shared, fallback)


# --------------------------------------------------------------------------------------------
# Where the recipients are read from
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "recipients", "source"),
    [
        pytest.param(
            # A Bcc'd copy: To names somebody else, the envelope header names our reader.
            msg(
                "Delivered-To: bob@firma.example",
                "To: someone@elsewhere.example",
                "Cc: alice@firma.example",
            ),
            ("bob@firma.example",),
            "Delivered-To",
            id="delivered-to-wins-over-to-cc",
        ),
        pytest.param(
            # Alias expansion: the MTA that delivered the copy prepended the topmost field
            # (RFC 5321 §4.4); the lower one names the alias before expansion.
            msg(
                "Delivered-To: bob@firma.example",
                "Received: by mx.provider.example",
                "Delivered-To: team@firma.example",
                "To: team@firma.example",
            ),
            ("bob@firma.example",),
            "Delivered-To",
            id="topmost-delivered-to",
        ),
        pytest.param(
            # The provider's own mailbox is not ours: skip it, try the next envelope header.
            msg(
                "Delivered-To: catchall-4711@pop.provider.example",
                "X-Original-To: bob@firma.example",
                "To: alice@firma.example",
            ),
            ("bob@firma.example",),
            "X-Original-To",
            id="delivered-to-not-ours-skipped",
        ),
        pytest.param(
            # The configured order decides, not the order in the message.
            msg(
                "X-Envelope-To: carol@firma.example",
                "X-Original-To: bob@firma.example",
            ),
            ("bob@firma.example",),
            "X-Original-To",
            id="header-order-from-config-not-message",
        ),
        pytest.param(
            msg("X-Envelope-To: bob@firma.example, <alice@firma.de>", "To: x@firma.example"),
            ("bob@firma.example", "alice@firma.de"),
            "X-Envelope-To",
            id="x-envelope-to-two-addresses",
        ),
        pytest.param(
            msg(
                "To: Bob <bob@firma.example>, stranger@elsewhere.example, alice@firma.de",
                "Cc: BOB@firma.example, carol@firma.example, Alice@FIRMA.DE",
                "Cc: dave@firma.example",
            ),
            ("bob@firma.example", "alice@firma.de", "carol@firma.example", "dave@firma.example"),
            "To/Cc",
            id="to-cc-several-ours-deduplicated-in-order",
        ),
        pytest.param(
            msg('To: "Doe, John" <john@firma.example>, bob@firma.example (Bob, the builder)'),
            ("john@firma.example", "bob@firma.example"),
            "To/Cc",
            id="display-names-and-comments",
        ),
        pytest.param(
            msg("To: Team: a@firma.example, b@firma.example;, undisclosed-recipients:;"),
            ("a@firma.example", "b@firma.example"),
            "To/Cc",
            id="groups",
        ),
        pytest.param(
            msg("To: =?utf-8?q?M=C3=BCller=2C_Hans?= <hans@firma.example>"),
            ("hans@firma.example",),
            "To/Cc",
            id="rfc2047-encoded-name",
        ),
        pytest.param(
            msg("To: Bob <bob@firma.example>,", " Alice", "\t<alice@firma.example>"),
            ("bob@firma.example", "alice@firma.example"),
            "To/Cc",
            id="folded-crlf",
        ),
        pytest.param(
            msg("Delivered-To:", " bob@firma.example", "To: x@firma.example", eol="\n"),
            ("bob@firma.example",),
            "Delivered-To",
            id="folded-bare-lf",
        ),
        pytest.param(
            msg("Subject: hi", "To: bob@firma.example", eol="\n"),
            ("bob@firma.example",),
            "To/Cc",
            id="bare-lf-message",
        ),
        pytest.param(
            msg("TO : bob@firma.example", "cc:alice@firma.example"),
            ("bob@firma.example", "alice@firma.example"),
            "To/Cc",
            id="field-names-any-case-space-before-colon",
        ),
        pytest.param(
            # A trailing dot on the domain (a fully qualified name) is still ours.
            msg("To: bob@Firma.Example."),
            ("bob@firma.example",),
            "To/Cc",
            id="domain-lower-cased-trailing-dot",
        ),
        pytest.param(
            msg("To: bob@sub.firma.example, bob@firma.example.evil.test"),
            FALLBACK,
            "fallback",
            id="subdomains-and-lookalikes-are-not-ours",
        ),
        pytest.param(
            # "To:" in the body is not a header.
            msg("Subject: hi", body="To: bob@firma.example"),
            FALLBACK,
            "fallback",
            id="body-is-not-header",
        ),
        pytest.param(
            b"\r\nTo: bob@firma.example\r\n\r\n",
            FALLBACK,
            "fallback",
            id="no-header-block-crlf",
        ),
        pytest.param(
            b"\nTo: bob@firma.example\n",
            FALLBACK,
            "fallback",
            id="no-header-block-lf",
        ),
        pytest.param(b"", FALLBACK, "fallback", id="empty-message"),
        pytest.param(
            b"To: bob@firma.example",
            ("bob@firma.example",),
            "To/Cc",
            id="header-only-no-line-end",
        ),
        pytest.param(
            msg("Delivered-To: stranger@elsewhere.example", "To: list@lists.example.org"),
            FALLBACK,
            "fallback",
            id="nobody-of-ours",
        ),
    ],
)
def test_route_reads_the_right_header(raw: bytes, recipients: tuple[str, ...], source: str) -> None:
    routing = rt(raw)
    assert (routing.recipients, routing.source) == (recipients, source)
    if source == "fallback":
        assert routing.found == ()
    else:
        assert routing.found == recipients  # no rules, no rewrite: found is where it goes
        assert routing.configured == frozenset()  # all of it read from the message


@pytest.mark.parametrize(
    "to",
    [
        "bob smith@firma.example",
        "b\xe9b@firma.example",  # 8-bit in a header: read as surrogate escapes, no address
        "bob@firma..example",
        "@firma.example",
        "bob@",
        "bob",
        "bob@firma_example",
    ],
)
def test_addresses_that_cannot_go_on_an_envelope_are_ignored(to: str) -> None:
    raw = b"To: " + to.encode("latin-1") + b", alice@firma.example\r\n\r\n"
    routing = rt(raw)
    assert routing.recipients == ("alice@firma.example",)
    assert all(address_problem(r) is None for r in routing.recipients)


def test_a_quoted_local_part_is_a_recipient_like_any_other() -> None:
    # RFC 5321 §4.1.2: it goes on the envelope quoted, and Exchange decides.
    raw = b'To: "bob smith"@firma.example, "(nested (comment))"@firma.example\r\n\r\n'
    assert rt(raw).recipients == ('"bob smith"@firma.example', '"(nested (comment))"@firma.example')


@pytest.mark.parametrize(
    "raw",
    [
        b"To: \xc3\xa9@firma.example, alice@firma.example\r\n\r\n",
        b"To: =?utf-8?q?x?= <alice@firma.example>\r\nSubject: caf\xe9 \xff\xfe\r\n\r\n\xff",
        b"X\xffY: a\r\nTo: alice@firma.example\r\n\r\n",
        b"To: \xff <alice@firma.example>\r\n\r\n",
        b"Delivered-To: \x80\x81@firma.example\r\nTo: alice@firma.example\r\n\r\n",
    ],
)
def test_eight_bit_bytes_in_headers_never_raise(raw: bytes) -> None:
    assert rt(raw).recipients == ("alice@firma.example",)


def test_header_recipients_false_ignores_to_and_cc() -> None:
    shared = SharedMailbox(domains=frozenset({"firma.example"}), header_recipients=False)
    raw = msg("To: bob@firma.example", "Cc: alice@firma.example")
    routing = rt(raw, shared)
    assert (routing.recipients, routing.source) == (FALLBACK, "fallback")
    with_envelope = msg("X-Original-To: carol@firma.example", "To: bob@firma.example")
    assert rt(with_envelope, shared).recipients == ("carol@firma.example",)


def test_custom_envelope_headers_in_their_order() -> None:
    shared = SharedMailbox(
        domains=frozenset({"firma.example"}), envelope_headers=("X-Rcpt-To", "Envelope-To")
    )
    raw = msg(
        "Delivered-To: ignored@firma.example",  # not configured any more
        "Envelope-To: second@firma.example",
        "x-rcpt-to: first@firma.example",
    )
    routing = rt(raw, shared)
    assert (routing.recipients, routing.source) == (("first@firma.example",), "X-Rcpt-To")
    no_custom = msg("Delivered-To: ignored@firma.example", "To: to@firma.example")
    assert rt(no_custom, shared).recipients == ("to@firma.example",)


def test_default_envelope_headers() -> None:
    assert DEFAULT_ENVELOPE_HEADERS == ("Delivered-To", "X-Original-To", "X-Envelope-To")
    assert SharedMailbox(domains=frozenset()).envelope_headers == DEFAULT_ENVELOPE_HEADERS


# --------------------------------------------------------------------------------------------
# Rules, rewrite, fallback, and what counts as "configured"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "recipients", "configured"),
    [
        pytest.param(
            "info@firma.example",
            ("info@firma.local", "chef@firma.local"),
            {"info@firma.local", "chef@firma.local"},
            id="exact-rule",
        ),
        pytest.param(
            "INFO@Firma.Example",
            ("info@firma.local", "chef@firma.local"),
            {"info@firma.local", "chef@firma.local"},
            id="rule-case-insensitive",
        ),
        pytest.param(
            "sales-x@firma.example",
            ("sales@firma.local",),
            {"sales@firma.local"},
            id="first-match-wins-star",
        ),
        pytest.param(
            "sales-@firma.example",
            ("sales@firma.local",),
            {"sales@firma.local"},
            id="star-matches-empty",
        ),
        pytest.param(
            "q@firma.example",
            ("short@firma.local",),
            {"short@firma.local"},
            id="question-mark-one-char",
        ),
        pytest.param("qq@firma.example", ("qq@firma.local",), set(), id="question-not-two"),
        pytest.param(
            "dev-list@lists.example.org",
            ("developers@firma.local",),
            {"developers@firma.local"},
            id="mailing-list-rule-outside-our-domains",
        ),
        pytest.param(
            "Bob <Bob@firma.example>", ("Bob@firma.local",), set(), id="rewrite-unruled-ours"
        ),
        pytest.param(
            "other@lists.example.org", FALLBACK, set(FALLBACK), id="list-without-rule-fallback"
        ),
    ],
)
def test_rules_rewrite_and_configured(
    to: str, recipients: tuple[str, ...], configured: set[str]
) -> None:
    routing = rt(msg(f"To: {to}"), RULED)
    assert routing.recipients == recipients
    assert routing.configured == frozenset(configured)


def test_rewrite_applies_only_to_unruled_addresses_of_our_domains() -> None:
    raw = msg(
        "To: info@firma.example, bob@firma.example, dev-list@lists.example.org",
        "Cc: stranger@elsewhere.example, bob@firma.local",
    )
    routing = rt(raw, RULED)
    assert routing.recipients == (
        "info@firma.local",
        "chef@firma.local",
        "bob@firma.local",
        "developers@firma.local",
    )
    # Only the rule targets are the config's; bob@ came from the message.
    assert routing.configured == frozenset(
        {"info@firma.local", "chef@firma.local", "developers@firma.local"}
    )
    assert routing.found == (
        "info@firma.example",
        "bob@firma.example",
        "dev-list@lists.example.org",
    )


def test_rule_targets_and_message_addresses_deduplicated_together() -> None:
    # A rule's target that equals a rewritten address from the message is delivered once.
    shared = SharedMailbox(
        domains=frozenset({"firma.example"}),
        rules=(Rule("boss@firma.example", ("Bob@firma.local",)),),
        rewrite_domain="firma.local",
    )
    routing = rt(msg("To: bob@firma.example, boss@firma.example"), shared)
    assert routing.recipients == ("bob@firma.local",)


def test_fallback_when_nothing_matches() -> None:
    fallback = ("Undeliverable@firma.local", "undeliverable@FIRMA.local", "admin@firma.local")
    routing = rt(msg("To: stranger@elsewhere.example", "Subject: x"), OURS, fallback)
    assert routing == Routing(
        ("Undeliverable@firma.local", "admin@firma.local"),
        "fallback",
        (),
        frozenset({"undeliverable@firma.local", "admin@firma.local"}),
    )


def test_configured_never_contains_message_derived_addresses() -> None:
    routing = rt(msg("Delivered-To: bob@firma.example"), OURS)
    assert routing.recipients == ("bob@firma.example",)
    assert routing.configured == frozenset()


def test_rewritten_address_is_still_sendable() -> None:
    """Every recipient route() returns passes address_problem, rewritten ones too.

    A 64-octet local part (RFC 5321 §4.5.3.1.1) of a short domain, rewritten to a long (valid)
    domain, makes a path longer than RFC 5321 §4.5.3.1.3 allows; the deliverer would then refuse
    the whole envelope locally (553, per message), dead-lettering the copies of the others too.
    """
    long_domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "local"])  # 197 octets, valid
    shared = SharedMailbox(domains=frozenset({"f.de"}), rewrite_domain=long_domain)
    local = "x" * 64
    assert address_problem(f"{local}@f.de") is None
    routing = rt(msg(f"To: {local}@f.de, bob@f.de"), shared)
    assert all(address_problem(r) is None for r in routing.recipients), routing.recipients
    assert f"bob@{long_domain}" in routing.recipients


# --------------------------------------------------------------------------------------------
# The header reader: size limit, folding, 8-bit
# --------------------------------------------------------------------------------------------


def test_header_block_bigger_than_the_scanning_limit() -> None:
    filler = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 60) for i in range(5000))  # ~400 KB
    early = b"To: early@firma.example\r\n" + filler + b"Subject: x\r\n\r\nbody\r\n"
    late = filler + b"To: late@firma.example\r\n\r\nbody\r\n"
    assert rt(early).recipients == ("early@firma.example",)
    # A To past 256 KiB of header is not looked at: the message goes to the fallback.
    assert rt(late).recipients == FALLBACK


def test_one_huge_header_line_is_cut_not_scanned_whole() -> None:
    raw = b"To: bob@firma.example\r\nX-Junk: " + b"a" * 20_000_000 + b"\r\n\r\n"
    assert rt(raw).recipients == ("bob@firma.example",)


# --------------------------------------------------------------------------------------------
# message_id
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"Message-ID: <abc@x.test>\r\n\r\n", "<abc@x.test>"),
        (b"message-id:<abc@x.test>\r\nMessage-ID: <second@x.test>\r\n\r\n", "<abc@x.test>"),
        (b"Message-ID:\r\n <folded@x.test>\r\n\r\n", "<folded@x.test>"),
        (b"Message-ID: <a b @ x.test >\r\n\r\n", "<ab@x.test>"),
        (b"Message-ID: <lf@x.test>\nSubject: y\n\n", "<lf@x.test>"),
        (b"Subject: none\r\n\r\nMessage-ID: <body@x.test>\r\n", None),
        (b"Message-ID: \r\n\r\n", None),
        (b"Message-ID: <caf\xe9@x.test>\r\n\r\n", None),
        (b"X-Message-ID: <no@x.test>\r\n\r\n", None),
        (b"\r\nMessage-ID: <no@x.test>\r\n", None),
        (b"", None),
    ],
)
def test_message_id(raw: bytes, expected: str | None) -> None:
    assert message_id(raw) == expected


# --------------------------------------------------------------------------------------------
# Property: never raises, never nobody, never unsendable
# --------------------------------------------------------------------------------------------

_NAMES = st.sampled_from(
    [b"To", b"Cc", b"Delivered-To", b"X-Original-To", b"X-Envelope-To", b"Subject", b"tO", b"X"]
)
_ADDRESSES = st.sampled_from(
    [
        b"bob@firma.example",
        b"INFO@firma.example",
        b"dev-list@lists.example.org",
        b"x" * 64 + b"@firma.example",
        b'"q p"@firma.example',
        b"\xc3\xa9@firma.example",
        b"<a@firma.example>",
        b"Team: a@firma.example;",
        b"=?utf-8?b?w6k=?= <c@firma.example>",
        b"a@",
        b"@",
        b",",
        b"(",
        b"<",
        b'"',
        b"\\",
    ]
)
_VALUES = st.lists(st.one_of(_ADDRESSES, st.binary(max_size=20)), max_size=4).map(b", ".join)
_EOL = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n "])
_HEADERS = st.lists(st.tuples(_NAMES, _VALUES, _EOL), max_size=8).map(
    lambda fields: b"".join(n + b": " + v + e for n, v, e in fields)
)
_MESSAGES = st.one_of(
    st.binary(max_size=500),
    st.tuples(_HEADERS, st.binary(max_size=40)).map(lambda hb: hb[0] + b"\r\n" + hb[1]),
)


@settings(PROFILE)
@given(raw=_MESSAGES, header_recipients=st.booleans())
def test_route_never_raises_and_always_names_someone_sendable(
    raw: bytes, header_recipients: bool
) -> None:
    shared = SharedMailbox(
        domains=RULED.domains,
        rules=RULED.rules,
        rewrite_domain=RULED.rewrite_domain,
        header_recipients=header_recipients,
    )
    routing = route(raw, shared, FALLBACK)
    assert routing.recipients
    assert all(address_problem(r) is None for r in routing.recipients)
    lowered = [r.lower() for r in routing.recipients]
    assert len(set(lowered)) == len(lowered)
    assert routing.configured <= set(lowered)
    if routing.source == "fallback":
        assert routing.recipients == FALLBACK
        assert routing.found == ()
    message_id(raw)  # never raises either


def test_the_catch_all_s_own_address_is_never_a_recipient() -> None:
    """Postfix writes the final mailbox into Delivered-To above X-Original-To: with the
    catch-all's own address ignored, the real recipient decides."""
    raw = msg(
        "Delivered-To: catchall@firma.example",
        "X-Original-To: bob@firma.example",
        "To: undisclosed-recipients:;",
    )
    assert rt(raw).recipients == ("catchall@firma.example",)  # the trap, without ignore
    shared = SharedMailbox(
        domains=frozenset({"firma.example"}), ignore=frozenset({"catchall@firma.example"})
    )
    routed = rt(raw, shared)
    assert (routed.recipients, routed.source) == (("bob@firma.example",), "X-Original-To")
    # Mail to the catch-all's own address only: the fallback.
    assert rt(msg("To: CatchAll@Firma.Example"), shared).source == "fallback"


def test_service_ignores_the_account_username_when_it_is_an_address() -> None:
    from connector.config import SharedConfig
    from connector.runtime import shared_mailbox

    config = SharedConfig(domains=["firma.example"], ignore_addresses=["Old@Firma.example"])
    assert shared_mailbox(config, "CatchAll@firma.example").ignore == {
        "catchall@firma.example",
        "old@firma.example",
    }
    assert shared_mailbox(config, "catchall-login").ignore == {"old@firma.example"}
