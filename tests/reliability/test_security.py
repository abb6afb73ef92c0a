"""Security defaults: verified TLS, no downgrade, no secrets in output, private files.

Each test injects one attack or mistake: a certificate for another host, a certificate from an
unknown CA, a server that does not offer STLS/STARTTLS, a debug run watched for passwords, a
permissive umask, a config file others can read.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from connector.config import MetricsSettings, load_settings
from connector.errors import DeliveryError, Disposition, Pop3TlsError, SmtpStage, classify
from connector.loopback import LoopbackPop3Server
from connector.pop3 import Pop3Client, Pop3Endpoint, Pop3Timeouts
from connector.smtp import Envelope, SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode, make_ssl_context
from tests.integration.conftest import Setup
from tests.reliability.rig import mail
from tests.servers import USER_PASSWORD, DovecotServer, SmtpSink

TIMEOUTS = Pop3Timeouts(2.0, 2.0, 2.0)
SMTP_PASSWORD = "smtp-Secret-77"


# -- TLS verification ----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("tls", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
async def test_pop3_certificate_for_wrong_host_refused(
    dovecot: DovecotServer, tls: TlsMode
) -> None:
    port = dovecot.ports["pop3s" if tls is TlsMode.IMPLICIT else "pop3"]
    endpoint = Pop3Endpoint("127.0.0.1", port, tls, dovecot.client_context(), "mail.wrong.example")
    with pytest.raises(Pop3TlsError) as info:
        await Pop3Client.connect(endpoint, TIMEOUTS)
    assert "certificate" in str(info.value)
    assert classify(info.value) is Disposition.PARK_ACCOUNT


@pytest.mark.integration
@pytest.mark.parametrize("tls", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
async def test_pop3_certificate_from_unknown_ca_refused_by_default(
    dovecot: DovecotServer, tls: TlsMode
) -> None:
    """No ssl_context: the system's trust store, which does not know the test CA."""
    port = dovecot.ports["pop3s" if tls is TlsMode.IMPLICIT else "pop3"]
    with pytest.raises(Pop3TlsError) as info:
        await Pop3Client.connect(Pop3Endpoint("localhost", port, tls), TIMEOUTS)
    assert classify(info.value) is Disposition.PARK_ACCOUNT


def test_config_default_context_verifies() -> None:
    ctx = make_ssl_context(True, None, "smtp")
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname


def _smtp_server_ctx(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


async def _deliver(sink: SmtpSink, tls: TlsMode, client_ctx: ssl.SSLContext | None) -> None:
    settings = SmtpSettings("127.0.0.1", sink.port, tls, client_ctx, "c.test", timeout=5)
    async with SmtpDeliverer(settings) as d:
        await d.deliver(mail(0), Envelope("a@customer.example", ("b@firma.test",), False))


@pytest.mark.parametrize(
    ("case", "names", "trusted"),
    [("wrong_host", ("mail.wrong.example",), True), ("unknown_ca", ("127.0.0.1",), False)],
)
async def test_smtp_starttls_certificate_refused(
    case: str, names: tuple[str, ...], trusted: bool
) -> None:
    ca = trustme.CA()
    sink = SmtpSink(tls_context=_smtp_server_ctx(ca, *names)).start()
    client = ssl.create_default_context()
    if trusted:
        ca.configure_trust(client)
    try:
        with pytest.raises(DeliveryError) as info:
            await _deliver(sink, TlsMode.STARTTLS, client if trusted else None)
    finally:
        sink.stop()
    assert info.value.stage is SmtpStage.TLS
    assert info.value.security, case
    assert classify(info.value) is Disposition.PARK_ACCOUNT
    assert sink.received == []


# -- no downgrade --------------------------------------------------------------------------


async def test_pop3_stls_required_but_not_offered() -> None:
    async with LoopbackPop3Server({"u": "p"}) as server:  # no ssl_context: no STLS in CAPA
        endpoint = Pop3Endpoint("127.0.0.1", server.port, TlsMode.STARTTLS)
        with pytest.raises(Pop3TlsError, match="does not offer STLS"):
            await Pop3Client.connect(endpoint, TIMEOUTS)
        assert "USER" not in server.commands  # nothing was sent in clear
        assert "PASS" not in server.commands


async def test_smtp_starttls_required_but_not_offered() -> None:
    sink = SmtpSink().start()  # plain: no STARTTLS in EHLO
    try:
        with pytest.raises(DeliveryError) as info:
            await _deliver(sink, TlsMode.STARTTLS, None)
    finally:
        sink.stop()
    assert (info.value.stage, info.value.security) == (SmtpStage.TLS, True)
    assert classify(info.value) is Disposition.PARK_ACCOUNT
    assert sink.received == []
    assert sink.handler.transactions == 0


# -- secrets and files ---------------------------------------------------------------------


def _forms(user: str, secret: str) -> list[str]:
    """The password and its encodings on the wire (SASL PLAIN, AUTH LOGIN)."""
    plain = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
    return [secret, plain, base64.b64encode(secret.encode()).decode()]


def _cli(config: Path, *args: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POP3_CONNECTOR_SERVICE__LOG_LEVEL": "debug"}
    return subprocess.run(
        [sys.executable, "-m", "connector", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        preexec_fn=None if umask is None else (lambda: os.umask(umask) and None),
    )


@pytest.mark.integration
def test_credentials_absent_from_debug_logs_errors_and_output(
    setup_factory: Callable[..., Setup],
) -> None:
    sink = SmtpSink(auth={"connector": SMTP_PASSWORD}).start()
    try:
        s = setup_factory(
            sink=sink, smtp_extra=f'username = "connector"\npassword = "{SMTP_PASSWORD}"'
        )
        s.dovecot.deliver_many(s.user, [mail(0)])
        ok = _cli(s.config, "once")
        assert ok.returncode == 0, ok.stderr
        assert "C: AUTH PLAIN ****" in ok.stderr or "C: PASS ****" in ok.stderr  # transcript on
        checked = _cli(s.config, "check")
        wrong = s.config.read_text().replace(SMTP_PASSWORD, "wrong-" + SMTP_PASSWORD)
        s.config.write_text(wrong)
        s.dovecot.deliver_many(s.user, [mail(1)])
        failed = _cli(s.config, "once")
        assert failed.returncode == 1
    finally:
        sink.stop()
    output = "".join(p.stdout + p.stderr for p in (ok, checked, failed))
    for form in [*_forms(s.user, USER_PASSWORD), *_forms("connector", SMTP_PASSWORD)]:
        assert form not in output, form


@pytest.mark.integration
def test_state_files_owner_only_even_with_umask_0(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory()
    s.dovecot.deliver_many(s.user, [mail(0, sender="spam@bad.example")])
    s.sink.handler.rule = lambda stage, env, data: "554 5.7.1 no" if stage == "data" else None
    proc = _cli(s.config, "once", umask=0)
    assert proc.returncode == 0, proc.stderr
    modes = {
        p.relative_to(s.state_dir).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in [s.state_dir, *s.state_dir.rglob("*")]
    }
    assert len([p for p in modes if p.startswith("dead-letters/new/")]) == 1
    loose = {p: oct(m) for p, m in modes.items() if m & 0o077}
    assert loose == {}, loose


@pytest.mark.integration
def test_check_warns_about_config_with_password_readable_by_others(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory()
    s.config.chmod(0o644)
    proc = _cli(s.config, "check")
    assert proc.returncode == 0
    assert 'accounts[0] (name "info").password: ' in proc.stderr
    assert "accessible to group or others (mode 0644)" in proc.stderr
    s.config.chmod(0o600)
    assert "accessible to group or others" not in _cli(s.config, "check").stderr


def test_metrics_listen_on_loopback_by_default(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[smtp]\nhost = "x.example"\nhelo_name = "c.test"\n[[accounts]]\nname = "a"\n'
        'host = "p.example"\nusername = "u"\npassword = "p"\ndeliver_to = ["a@b.example"]\n'
    )
    address = load_settings(config).metrics.address
    assert address is not None
    assert ipaddress.ip_address(address[0]).is_loopback
    assert MetricsSettings().address == address
