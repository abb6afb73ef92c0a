"""Admin notices: the text, the headers, the rate limit and the failing/recovered pairing."""

from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest

from connector.deadletter import DeadLetterInfo
from connector.errors import DeliveryError, SmtpStage
from connector.notices import (
    DeadLetterNote,
    NoticeSettings,
    Notifier,
    RecordingStore,
    dead_letter_digest,
    failing_notice,
    note_for,
)
from connector.smtp import Envelope, SmtpSettings
from connector.spool import Spooled
from connector.tls import TlsMode
from tests.component.test_cycle_lifecycle import mail
from tests.fakes import InMemoryDeadLetterStore

SMTP = SmtpSettings(
    host="127.0.0.1",
    port=25,
    tls=TlsMode.NONE,
    ssl_context=None,
    helo_name="connector.test",
    username="relay",
    password="s3cret-relay",
    dsn=False,
    timeout=5.0,
)
NOTICES = NoticeSettings(postmaster="postmaster@firma.test", min_interval=3600.0)
RAW = (
    b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jm@customer.example>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=\r\n"
    b"\r\n"
    b"body\r\n"
)
INFO = DeadLetterInfo(
    account="info",
    uidl="u1",
    stage="data",
    response="554 5.1.0 Sender denied",
    failed_at=dt.datetime(2026, 11, 27, tzinfo=dt.UTC),
)


def parse(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=default)
    assert isinstance(msg, EmailMessage)
    return msg


def body(raw: bytes) -> str:
    part = parse(raw).get_body(("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Outbox:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Envelope]] = []
        self.fail = False

    async def __call__(self, smtp: SmtpSettings, raw: bytes, envelope: Envelope) -> None:
        if self.fail:
            raise DeliveryError(SmtpStage.CONNECT, "connection refused")
        self.sent.append((raw, envelope))

    def subjects(self) -> list[str]:
        return [str(parse(raw)["Subject"]) for raw, _ in self.sent]


def test_note_decodes_sender_and_subject() -> None:
    note = note_for("dl-1", RAW, INFO)
    assert note == DeadLetterNote(
        "dl-1",
        "info",
        "Jürgen Müller <jm@customer.example>",
        "Grüße aus Köln",
        "data",
        "554 5.1.0 Sender denied",
    )


def test_note_without_headers_and_with_control_characters() -> None:
    note = note_for("dl-2", b"Subject: a\r\n b\x07c\r\n\r\n", INFO)
    assert note.sender == "(none)"
    assert "\x07" not in note.subject
    assert "\n" not in note.subject


async def test_recording_store_remembers_what_was_stored() -> None:
    class Store:
        async def put(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str:
            return "id-7"

        async def remove(self, id: str) -> None:
            raise KeyError(id)

    recorded = RecordingStore(Store())
    assert await recorded.put(RAW, INFO) == "id-7"
    assert [n.id for n in recorded.notes] == ["id-7"]


def test_digest_names_each_dead_letter_and_is_encoded_for_smtp() -> None:
    notes = [note_for("dl-1", RAW, INFO), note_for("dl-2", b"From: a@b.example\r\n\r\n", INFO)]
    raw = dead_letter_digest(NOTICES, "info", notes, 0, 1_800_000_000.0)
    assert raw.isascii()  # quoted-printable and RFC 2047: any relay takes it
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["To"] == "postmaster@firma.test"
    assert msg["Subject"] == "[pop3-connector] info: 2 messages dead-lettered"
    text = body(raw)
    for needle in (
        "Account: info",
        "From:    Jürgen Müller <jm@customer.example>",
        "Subject: Grüße aus Köln",
        "Stage:   data",
        "Reason:  554 5.1.0 Sender denied",
        "pop3-connector dead-letters show dl-1",
        "pop3-connector dead-letters requeue dl-1",
        "pop3-connector dead-letters show dl-2",
    ):
        assert needle in text
    assert "Rate limit" not in text


def test_non_ascii_error_text_is_encoded() -> None:
    raw = failing_notice(NOTICES, "info", "Köln refused", 0, 0.0)
    assert raw.isascii()
    assert "Köln refused" in body(raw)


async def test_digest_rate_limited_and_suppressed_counted(tmp_path: Path) -> None:
    clock, outbox = Clock(), Outbox()
    notifier = Notifier(tmp_path / "notices.json", clock=clock, send=outbox)
    note = note_for("dl-1", RAW, INFO)

    async def cycle(*notes: DeadLetterNote) -> None:
        await notifier.after_cycle(
            NOTICES, SMTP, "info", ok=True, failing=False, error=None, dead_letters=notes
        )

    await cycle(note, note)
    assert len(outbox.sent) == 1
    envelope = outbox.sent[0][1]
    assert envelope == Envelope("", ("postmaster@firma.test",), sender_fixed=True)
    await cycle()  # nothing dead-lettered: nothing to say
    clock.now += 3599
    await cycle(note, note, note)  # within min_interval: suppressed, counted
    assert len(outbox.sent) == 1
    clock.now += 1
    await cycle(note)
    assert len(outbox.sent) == 2
    assert "Rate limit: 3 further dead letters" in body(outbox.sent[1][0])
    # Another account has its own limit.
    await notifier.after_cycle(
        NOTICES, SMTP, "sales", ok=True, failing=False, error=None, dead_letters=[note]
    )
    assert len(outbox.sent) == 3

    # The limit survives a restart (``once`` from cron): a new notifier reads the file.
    again = Notifier(tmp_path / "notices.json", clock=clock, send=outbox)
    await again.after_cycle(
        NOTICES, SMTP, "info", ok=True, failing=False, error=None, dead_letters=[note]
    )
    assert len(outbox.sent) == 3


async def test_failing_then_recovered_once_each(tmp_path: Path) -> None:
    clock, outbox = Clock(), Outbox()
    notifier = Notifier(tmp_path / "notices.json", clock=clock, send=outbox)

    async def cycle(*, ok: bool, failing: bool) -> None:
        await notifier.after_cycle(
            NOTICES,
            SMTP,
            "info",
            ok=ok,
            failing=failing,
            error=None if ok else "-ERR [AUTH] Authentication failed.",
            dead_letters=(),
        )

    await cycle(ok=False, failing=False)  # a transient failure: no notice
    assert outbox.sent == []
    await cycle(ok=True, failing=False)  # nothing was announced: no "recovered"
    assert outbox.sent == []
    await cycle(ok=False, failing=True)
    await cycle(ok=False, failing=True)
    assert outbox.subjects() == ["[pop3-connector] info: account failing"]
    assert "[AUTH] Authentication failed" in body(outbox.sent[0][0])
    await cycle(ok=True, failing=False)
    await cycle(ok=True, failing=False)
    assert outbox.subjects()[1:] == ["[pop3-connector] info: account recovered"]
    # Flapping within min_interval: the second "failing" is suppressed, then counted.
    await cycle(ok=False, failing=True)
    assert len(outbox.sent) == 2
    clock.now += 3600
    await cycle(ok=False, failing=True)
    assert len(outbox.sent) == 3
    assert "Rate limit: 1 failing notices" in body(outbox.sent[2][0])
    for raw, _ in outbox.sent:
        assert b"s3cret-relay" not in raw


async def test_send_failure_is_logged_and_retried_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, outbox = Clock(), Outbox()
    notifier = Notifier(tmp_path / "notices.json", clock=clock, send=outbox)
    outbox.fail = True
    await notifier.after_cycle(
        NOTICES, SMTP, "info", ok=False, failing=True, error="x", dead_letters=()
    )
    assert "cannot send the failing notice" in caplog.text
    outbox.fail = False
    await notifier.after_cycle(
        NOTICES, SMTP, "info", ok=False, failing=True, error="x", dead_letters=()
    )
    assert outbox.subjects() == ["[pop3-connector] info: account failing"]


async def test_off_and_switches(tmp_path: Path) -> None:
    clock, outbox = Clock(), Outbox()
    notifier = Notifier(tmp_path / "notices.json", clock=clock, send=outbox)
    note = note_for("dl-1", RAW, INFO)
    await notifier.after_cycle(
        None, SMTP, "info", ok=False, failing=True, error="x", dead_letters=[note]
    )
    quiet = NoticeSettings("postmaster@firma.test", on_dead_letter=False, on_account_failing=False)
    await notifier.after_cycle(
        quiet, SMTP, "info", ok=False, failing=True, error="x", dead_letters=[note]
    )
    assert outbox.sent == []
    assert not (tmp_path / "notices.json").exists()


async def test_unreadable_state_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "notices.json"
    path.write_text("{not json")
    outbox = Outbox()
    notifier = Notifier(path, clock=Clock(), send=outbox)
    await notifier.after_cycle(
        NOTICES, SMTP, "info", ok=False, failing=True, error="x", dead_letters=()
    )
    assert len(outbox.sent) == 1


def test_config_section_becomes_runtime_settings(tmp_path: Path) -> None:
    from connector.config import Settings
    from connector.runtime import build_runtime

    base: dict[str, object] = {
        "service": {"state_dir": str(tmp_path)},
        "smtp": {"host": "127.0.0.1", "tls": "none", "helo_name": "connector.test"},
        "accounts": [
            {
                "name": "info",
                "host": "127.0.0.1",
                "tls": "none",
                "username": "u",
                "password": "pw",
                "deliver_to": ["info@firma.test"],
            }
        ],
    }
    assert build_runtime(Settings.model_validate(base)).notices is None
    on = Settings.model_validate(
        {**base, "notices": {"postmaster": "pm@firma.test", "min_interval": "2h"}}
    )
    assert build_runtime(on).notices == NoticeSettings("pm@firma.test", 7200.0, True, True)


async def test_oversize_notice_once_per_message_remembered_across_restarts(
    tmp_path: Path,
) -> None:
    clock, outbox = Clock(), Outbox()
    state = tmp_path / "notices.json"

    async def cycle(notifier: Notifier, left: list[tuple[str, int]], *, ok: bool = True) -> None:
        await notifier.after_cycle(
            NOTICES,
            SMTP,
            "info",
            ok=ok,
            failing=False,
            error=None,
            dead_letters=(),
            oversize=left,
        )

    first = Notifier(state, clock=clock, send=outbox)
    await cycle(first, [("big-1", 300_000_000)])
    await cycle(first, [("big-1", 300_000_000)])  # listed again: no second notice
    assert outbox.subjects() == ["[pop3-connector] info: 1 message too large"]
    assert "UIDL big-1: 300000000 octets" in body(outbox.sent[0][0])
    # A new one, after a restart (the memory is on disk), within min_interval: named alone.
    again = Notifier(state, clock=clock, send=outbox)
    await cycle(again, [("big-1", 300_000_000), ("big-2", 400_000_000)])
    assert len(outbox.sent) == 2
    assert "big-2" in body(outbox.sent[1][0])
    assert "big-1" not in body(outbox.sent[1][0])
    # A failed cycle's partial listing forgets nothing; a gone message is forgotten, so if it
    # ever comes back it is named again.
    await cycle(again, [], ok=False)
    await cycle(again, [("big-2", 400_000_000)])
    await cycle(again, [("big-1", 300_000_000), ("big-2", 400_000_000)])
    assert len(outbox.sent) == 3
    assert "big-1" in body(outbox.sent[2][0])


async def test_oversize_notice_not_sent_is_tried_again_next_cycle(tmp_path: Path) -> None:
    clock, outbox = Clock(), Outbox()
    notifier = Notifier(tmp_path / "notices.json", clock=clock, send=outbox)
    outbox.fail = True
    for _ in range(2):
        await notifier.after_cycle(
            NOTICES,
            SMTP,
            "info",
            ok=True,
            failing=False,
            error=None,
            dead_letters=(),
            oversize=[("big-1", 10)],
        )
        outbox.fail = False
    assert outbox.subjects() == ["[pop3-connector] info: 1 message too large"]


# -- RecordingStore ----------------------------------------------------------------------------


def _info(uidl: str, recipients: tuple[str, ...] = (), account: str = "info") -> DeadLetterInfo:
    return DeadLetterInfo(
        account, uidl, "data", "554 5.1.0 Sender denied", datetime(2026, 1, 2, tzinfo=UTC),
        recipients,
    )  # fmt: skip


async def test_the_admin_digest_forgets_a_dead_letter_that_was_removed() -> None:
    inner = InMemoryDeadLetterStore()
    recorded = RecordingStore(inner)
    kept = await recorded.put(mail(1), _info("u1"))
    gone = await recorded.put(mail(2), _info("u2"))
    await recorded.remove(gone)
    assert [n.id for n in recorded.notes] == [kept]
    assert list(inner.messages) == [kept]
