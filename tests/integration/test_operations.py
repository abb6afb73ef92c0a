"""The operators' view, end to end: ``run`` against the real Dovecot and aiosmtpd, scraped over
HTTP (/metrics, /healthz, /status, POST /poll), plus ``status``, SIGHUP and the debug transcript.
"""

from __future__ import annotations

import base64
import json
import poplib
import re
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope
from prometheus_client.parser import text_string_to_metric_families

from connector import __version__
from tests.integration.conftest import Setup, strip_trace
from tests.integration.test_cycle import message
from tests.integration.test_service import StderrWatcher, running, wait_until
from tests.servers import USER_PASSWORD, SmtpSink

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def with_metrics_endpoint(config: Path) -> None:
    """Serve HTTP on a port the OS picks (the log line says which): every test config does."""
    assert 'listen = "127.0.0.1:0"' in config.read_text()


def endpoint_url(log: StderrWatcher) -> str:
    assert log.wait_for("serving /metrics"), log.text()
    m = re.search(r"serving /metrics, /healthz, /status and POST /poll on (http://\S+)", log.text())
    assert m is not None, log.text()
    return m.group(1)


def http(url: str, method: str = "GET") -> tuple[int, bytes]:
    assert url.startswith("http://127.0.0.1:")
    data = b"" if method == "POST" else None
    # POST /poll needs a type no browser sends cross-site without a preflight
    # (docs/design.md §11.2).
    headers = {"Content-Type": "application/json"} if method == "POST" else {}
    request = urllib.request.Request(url, method=method, data=data, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(base: str) -> Samples:
    status, body = http(base + "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(("pop3_connector_" + name, frozenset(labels.items())))


def status_doc(base: str) -> dict[str, Any]:
    code, body = http(base + "/status")
    assert code == 200
    doc: dict[str, Any] = json.loads(body)
    return doc


def account_status(base: str, name: str) -> dict[str, Any] | None:
    return next((a for a in status_doc(base)["accounts"] if a["name"] == name), None)


def cycles_ok(base: str, account: str = "info") -> float:
    return value(scrape(base), "cycles_total", account=account, result="ok") or 0.0


def test_metrics_during_and_after_real_cycles(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup_factory(service_extra='poll_interval = "1h"')
    with_metrics_endpoint(s.config)
    spam = "spam@bad.example"
    raws = [
        message(0),
        message(1, sender=spam),
        message(2),  # held in DATA while the test scrapes
        message(3),  # greylisted once
        message(4, sender=spam),
        message(5),
    ]
    s.dovecot.deliver_many(s.user, raws)
    pop = poplib.POP3("127.0.0.1", s.dovecot.ports["pop3"], timeout=10)
    pop.user(s.user)
    pop.pass_(s.password)
    upstream_count, upstream_octets = pop.stat()
    pop.quit()

    in_flight, release = threading.Event(), threading.Event()
    greylisted: list[bytes] = []

    def exchange(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        if stage != "data" or data is None:
            return None
        if envelope.mail_from == spam:
            return "554 5.1.0 Sender denied"
        if b"Subject: message 3\r\n" in data and not greylisted:
            greylisted.append(data)
            return "451 4.7.1 Greylisted"
        if b"Subject: message 2\r\n" in data and not in_flight.is_set():
            in_flight.set()
            release.wait(30)
        return None

    s.sink.handler.rule = exchange
    with running(s.config) as (proc, log):
        try:
            base = endpoint_url(log)
            assert in_flight.wait(30), log.text()
            during = scrape(base)
        finally:
            release.set()
        # Mid-cycle: message 0 delivered, message 1 dead-lettered, no cycle finished yet.
        assert value(during, "messages_total", account="info", outcome="delivered") == 1
        assert value(during, "messages_total", account="info", outcome="dead_lettered") == 1
        assert value(during, "messages_total", account="info", outcome="deferred") == 0
        assert value(during, "cycles_total", account="info", result="ok") == 0
        assert value(during, "cycle_duration_seconds_count", account="info") == 0
        assert value(during, "build_info", version=__version__) == 1
        assert http(base + "/healthz") == (200, b"ok\n")

        wait_until(lambda: cycles_ok(base) == 1, "the first cycle")
        after = scrape(base)
        expected = {"delivered": 3, "dead_lettered": 2, "deferred": 1, "skipped": 0}
        for outcome, count in expected.items():
            assert value(after, "messages_total", account="info", outcome=outcome) == count
        assert value(after, "smtp_responses_total", account="info", code="250") == 3
        assert value(after, "smtp_responses_total", account="info", code="554") == 2
        assert value(after, "smtp_responses_total", account="info", code="451") == 1
        assert value(after, "mailbox_messages", account="info") == upstream_count == 6
        assert value(after, "mailbox_bytes", account="info") == upstream_octets
        assert value(after, "deferred_messages", account="info") == 1
        assert value(after, "dead_letters", account="info") == 2
        assert value(after, "account_failing", account="info") == 0
        assert value(after, "cycles_total", account="info", result="failed") == 0
        assert value(after, "cycle_duration_seconds_count", account="info") == 1
        assert value(after, "cycle_duration_seconds_bucket", account="info", le="1800.0") == 1
        assert value(after, "cycle_duration_seconds_bucket", account="info", le="+Inf") == 1
        received = s.received()
        assert [strip_trace(m.data) for m in received] == [raws[0], raws[2], raws[5]]
        delivered_bytes = sum(len(m.data) for m in received)  # with our Received: line
        assert value(after, "delivered_bytes_total", account="info") == delivered_bytes
        last_success = value(after, "last_success_timestamp_seconds", account="info")
        assert last_success is not None
        assert last_success > 0
        # Labels stay bounded: no UIDL, address or subject anywhere in the exposition.
        labels = {label for (_, pairs) in after for label, _ in pairs}
        bounded = {"account", "outcome", "result", "code", "version", "le", "smtp_target"}
        assert labels <= bounded

        info = account_status(base, "info")
        assert info is not None
        assert info["result"] == "ok"
        assert info["failing"] is False
        # What the cycle left upstream (the greylisted one), not STAT's 6 at its start; the
        # mailbox_messages gauge above keeps STAT's (docs/design.md §11.1).
        assert info["mailbox_messages"] == 1
        assert info["deferred"] == 1
        assert info["dead_letters"] == 2
        assert info["last_error"] is None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info["next_poll"])

        # `status` reads the ledger while `run` holds the state directory.
        capsys.readouterr()
        assert s.run("status") == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:3] == ["ACCOUNT", "LAST", "CYCLE"]
        row = table[1].split()
        assert row[0] == "info"
        assert row[3:7] == ["ok", "1", "1", "2"]  # result, upstream, deferred, dead letters
        assert s.run("status", "--json") == 0
        (from_cli,) = json.loads(capsys.readouterr().out)["accounts"]
        assert {k: from_cli[k] for k in ("result", "deferred", "dead_letters")} == {
            "result": "ok",
            "deferred": 1,
            "dead_letters": 2,
        }

        # POST /poll: the greylisted message goes through now.
        assert http(base + "/poll?account=nobody", "POST")[0] == 404
        code, body = http(base + "/poll", "POST")
        assert (code, json.loads(body)) == (202, {"polling": ["info"], "held_back": []})
        wait_until(lambda: cycles_ok(base) == 2, "the cycle started by POST /poll")
        second = scrape(base)
        assert value(second, "messages_total", account="info", outcome="delivered") == 4
        assert value(second, "deferred_messages", account="info") == 0
        assert value(second, "mailbox_messages", account="info") == 1  # STAT saw message 3
        assert value(second, "cycle_duration_seconds_count", account="info") == 2
        assert value(second, "smtp_responses_total", account="info", code="250") == 4

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.text()


def _secrets(user: str, password: str) -> list[str]:
    """The password as it could leak: plain, and inside base64 SASL PLAIN/LOGIN data."""
    b64 = [
        base64.b64encode(raw.encode()).decode()
        for raw in (password, f"\0{user}\0{password}", f"{user}\0{user}\0{password}")
    ]
    return [password, *b64]


def test_debug_transcript_status_and_check_show_no_credentials(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    smtp_password = "smtp-Pa55word-xyz"
    sink = SmtpSink(auth={"relay-user": smtp_password}).start()
    try:
        s = setup_factory(
            sink=sink,
            smtp_extra=f'username = "relay-user"\npassword = "{smtp_password}"',
            service_extra='poll_interval = "1h"',
        )
        s.config.write_text(
            s.config.read_text().replace('log_level = "info"', 'log_level = "debug"')
        )
        with_metrics_endpoint(s.config)
        s.dovecot.deliver_many(s.user, [message(1)])
        secrets = _secrets(s.user, USER_PASSWORD) + _secrets("relay-user", smtp_password)

        with running(s.config) as (proc, log):
            base = endpoint_url(log)
            wait_until(lambda: cycles_ok(base) == 1, "a cycle")
            served = http(base + "/status")[1] + http(base + "/metrics")[1]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert proc.returncode == 0, log.text()
        assert len(sink.received) == 1
        text = log.text()
        # The transcript is there (so the test can fail), with the credentials masked.
        assert "C: RETR 1" in text, text
        assert re.search(r"C: (PASS|AUTH PLAIN) \*\*\*\*", text), text
        assert re.search(r"C: AUTH (PLAIN|LOGIN)", text), text
        assert "outcome=delivered" in text

        capsys.readouterr()
        assert s.run("check", "--connect") == 0
        checked = capsys.readouterr()
        assert "TARGET" in checked.out
        assert "smtp" in checked.out
        assert "FAILED" not in checked.out
        for secret in secrets:
            assert secret not in text, secret
            assert secret.encode() not in served, secret
            assert secret not in checked.out + checked.err, secret
    finally:
        sink.stop()


def test_check_connect_reports_each_target_in_a_table(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    sink = SmtpSink(auth={"relay-user": "right"}).start()
    try:
        s = setup_factory(sink=sink, smtp_extra='username = "relay-user"\npassword = "wrong-pw1"')
        capsys.readouterr()
        assert s.run("check", "--connect") == 1
        out = capsys.readouterr()
        lines = out.out.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("TARGET"))
        pop3_row = next(line for line in lines[header + 1 :] if line.startswith("pop3 info"))
        assert " ok " in pop3_row
        assert "0 message(s)" in pop3_row
        smtp_row = next(line for line in lines[header + 1 :] if line.startswith("smtp"))
        assert "FAILED" in smtp_row
        assert "535" in smtp_row
        assert "wrong-pw1" not in out.out + out.err
    finally:
        sink.stop()


def _second_account(user: str, password: str, port: int) -> str:
    return f"""
[[accounts]]
name = "second"
host = "localhost"
port = {port}
tls = "none"
username = "{user}"
password = "{password}"
deliver_to = ["second@firma.test"]
"""


def test_sighup_adds_an_account_and_a_broken_config_keeps_the_old(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory(service_extra='poll_interval = "1h"')
    with_metrics_endpoint(s.config)
    original = s.config.read_text()
    user2, password2 = s.dovecot.add_user()
    s.dovecot.deliver_many(user2, [message(21)])

    def delivered_to_second() -> list[bytes]:
        return [strip_trace(m.data) for m in s.received() if m.rcpt_tos == ("second@firma.test",)]

    with running(s.config) as (proc, log):
        base = endpoint_url(log)
        wait_until(lambda: cycles_ok(base) == 1, "the first cycle of info")
        assert account_status(base, "second") is None

        s.config.write_text(original + _second_account(user2, password2, s.dovecot.ports["pop3"]))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: delivered_to_second() == [message(21)], "the new account's cycle")
        # The sink sees the message before the cycle ends and is recorded: wait for that too.
        wait_until(
            lambda: (account_status(base, "second") or {}).get("result") == "ok",
            "the new account's cycle to be recorded",
        )
        assert "reload: account=second added" in log.text()

        # A broken file: every problem logged, the service goes on with what it had.
        s.config.write_text(
            original.replace('name = "info"', 'name = "info"\ncolour = "blue"').replace(
                "deliver_to = [", "deliver_to = [] # ["
            )
            + _second_account(user2, password2, 99999)
        )
        proc.send_signal(signal.SIGHUP)
        assert log.wait_for("keeping the old configuration"), log.text()
        assert log.wait_for('accounts[1] (name "second").port'), log.text()
        text = log.text()
        assert 'accounts[0] (name "info").colour' in text
        assert 'accounts[0] (name "info").deliver_to' in text
        assert password2 not in text
        assert http(base + "/healthz") == (200, b"ok\n")

        s.dovecot.deliver_many(user2, [message(22)])
        assert http(base + "/poll?account=second", "POST")[0] == 202
        wait_until(
            lambda: delivered_to_second() == [message(21), message(22)],
            "a cycle of the account the broken file would have broken",
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.text()


def test_mail_flows_while_someone_else_holds_the_metrics_port(
    setup_factory: Callable[..., Setup],
) -> None:
    squatter = socket.socket()  # a local user who took the port first
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    s = setup_factory(service_extra='poll_interval = "1h"')
    text = s.config.read_text()
    s.config.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    s.dovecot.deliver_many(s.user, [message(0), message(1)])
    try:
        with running(s.config) as (proc, log):
            assert log.wait_for(f"cannot listen on 127.0.0.1:{port}"), log.text()
            wait_until(lambda: len(s.received()) == 2, "the mail, while the port is taken")
            assert proc.poll() is None
            squatter.close()
            base = endpoint_url(log)  # bound on a later attempt
            assert base == f"http://127.0.0.1:{port}"
            assert http(base + "/healthz") == (200, b"ok\n")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert proc.returncode == 0, log.text()
    finally:
        squatter.close()
