"""import-fetchmailrc: each poll entry's ``smtphost`` becomes its account's SMTP target
(docs/design.md §14.1)."""

from __future__ import annotations

from pathlib import Path

from connector.config import DEFAULT_TARGET, Settings, load_settings
from connector.fetchmailrc import convert
from connector.runtime import build_runtime

# An IT provider's rc file: three customers, each with their own Exchange; one without
# smtphost (fetchmail's localhost), two that share a server on different ports.
PROVIDER_RC = """
set daemon 300
poll pop.provider.example proto pop3 port 110 sslproto tls1
    user "info@kunde-a.example" there with password "a-pw" is info@kunde-a.local here
        smtphost exchange.kunde-a.local esmtpname relay@kunde-a.local esmtppassword "a-smtp"
    user "info@kunde-b.example" there with password "b-pw" is info@kunde-b.local here
        smtphost mail.kunde-b.local/587 esmtpname relay@kunde-b.local
    user "chef@kunde-b.example" there with password "c-pw" is chef@kunde-b.local here
        smtphost mail.kunde-b.local/587
    user "old@kunde-b.example" there with password "d-pw" is old@kunde-b.local here
        smtphost mail.kunde-b.local/25
    user "home@provider.example" there with password "e-pw" is home@provider.local here
"""


def _load(toml: str, tmp_path: Path) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(toml, encoding="utf-8")
    return load_settings(path)


def test_each_smtphost_becomes_a_target_of_the_accounts_that_name_it(tmp_path: Path) -> None:
    (tmp_path / "smtp-mail.kunde-b.local.password").write_text("b-smtp\n", encoding="utf-8")
    toml, notes = convert(PROVIDER_RC, password_dir=tmp_path)
    settings = _load(toml, tmp_path)

    assert (settings.smtp.host, settings.smtp.username) == (
        "exchange.kunde-a.local",
        "relay@kunde-a.local",
    )
    assert settings.smtp.secret() == "a-smtp"
    assert list(settings.smtp_targets) == ["mail.kunde-b.local", "mail.kunde-b.local-25"]
    b = settings.smtp_targets["mail.kunde-b.local"]
    assert (b.host, b.port, b.tls, b.username) == (
        "mail.kunde-b.local",
        587,
        "starttls",
        "relay@kunde-b.local",
    )
    assert b.password_file == tmp_path / "smtp-mail.kunde-b.local.password"
    assert b.secret() == "b-smtp"
    old = settings.smtp_targets["mail.kunde-b.local-25"]
    assert (old.port, old.username) == (25, None)
    targets = {name: t.name for name, t in build_runtime(settings).account_targets().items()}
    assert targets == {
        "info@kunde-a.example": DEFAULT_TARGET,
        "info@kunde-b.example": "mail.kunde-b.local",
        "chef@kunde-b.example": "mail.kunde-b.local",
        "old@kunde-b.example": "mail.kunde-b.local-25",
        "home@provider.example": DEFAULT_TARGET,
    }
    assert '[smtp_targets."mail.kunde-b.local"]' in toml
    assert any(
        "smtphost mail.kunde-b.local/587 written as [smtp_targets.mail.kunde-b.local], for the "
        'accounts that name it (smtp = "mail.kunde-b.local")' in n
        for n in notes
    )
    assert any("poll pop.provider.example: no smtphost" in n for n in notes)
    assert any("[smtp_targets.mail.kunde-b.local] password_file" in n for n in notes)
    assert not any("only one SMTP server" in n for n in notes)
    assert all("a-smtp" not in n and "b-pw" not in n for n in notes)


def test_one_smtphost_for_everyone_makes_no_target(tmp_path: Path) -> None:
    rc = PROVIDER_RC.replace("mail.kunde-b.local/587", "exchange.kunde-a.local").replace(
        "mail.kunde-b.local/25", "exchange.kunde-a.local"
    )
    toml, _ = convert(rc, password_dir=tmp_path)
    settings = _load(toml, tmp_path)
    assert settings.smtp_targets == {}
    assert "smtp_targets" not in toml
    assert all(a.smtp is None for a in settings.accounts)
