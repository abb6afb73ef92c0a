"""``[dead_letter] store = "imap"`` end to end: refused mail lands in a Dovecot IMAP folder."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.conftest import Setup
from tests.integration.test_cycle import deny_spammer, message

pytestmark = pytest.mark.integration


def test_refused_mail_is_appended_to_the_imap_folder_then_deleted_upstream(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    probe = setup_factory()
    # The dead letters go to a second Dovecot mailbox over IMAPS (as to an Exchange mailbox).
    archive_user, archive_password = probe.dovecot.add_user()
    s = setup_factory(
        dead_letter=f"""
[dead_letter]
store = "imap"
host = "localhost"
port = {probe.dovecot.ports["imaps"]}
tls = "implicit"
ca_file = "{probe.dovecot.ca_file}"
username = "{archive_user}"
password = "{archive_password}"
folder = "POP3 Connector/Dead Letters"
"""
    )
    raws = [message(1), message(2, sender="spam@bad.example"), message(3)]
    s.dovecot.deliver_many(s.user, raws)
    s.sink.handler.rule = deny_spammer

    assert s.run("once") == 0

    assert len(s.received()) == 2
    assert s.upstream() == []
    (stored,) = s.dovecot.maildir_files(archive_user, "POP3 Connector.Dead Letters")
    data = stored.read_bytes()  # Dovecot keeps Maildir files with LF line ends
    assert b"X-POP3-Connector-Response: 554 5.1.0 Sender denied\n" in data
    assert data.endswith(raws[1].replace(b"\r\n", b"\n"))
    assert not (s.state_dir / "dead-letters").exists()  # nothing went to the Maildir store

    capsys.readouterr()
    assert s.run("dead-letters", "list") == 0
    listing = capsys.readouterr().out
    assert "554 5.1.0 Sender denied" in listing
    assert archive_password not in listing
