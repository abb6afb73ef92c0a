"""The test world itself: each real server starts, and behaves as the tests rely on."""

import poplib
import smtplib
import ssl

import pytest
import trustme

from tests.mailservers import (
    BODY_REFUSED,
    DENIED_SENDER_DOMAIN,
    GREYLISTED_SENDER,
    SMALL_SIZE_LIMIT,
    CourierServer,
    MailutilsServer,
    Popa3dServer,
    PostfixServer,
    served_messages,
)
from tests.servers import DovecotServer, SmtpSink


@pytest.mark.integration
def test_dovecot_fresh_user_can_pop(dovecot: DovecotServer) -> None:
    user, pw = dovecot.add_user()
    dovecot.deliver_many(user, [b"Subject: a\r\n\r\nx\r\n", b"Subject: b\r\n\r\ny\r\n"])
    p = poplib.POP3("127.0.0.1", dovecot.ports["pop3"], timeout=5)
    p.user(user)
    p.pass_(pw)
    assert p.stat()[0] == 2
    assert p.retr(1)[1] == [b"Subject: a", b"", b"x"]
    p.quit()


def test_smtp_sink_implicit_tls(smtp_ca: trustme.CA, smtp_server_context: ssl.SSLContext) -> None:
    sink = SmtpSink(tls_context=smtp_server_context, implicit=True, auth={"u": "p"}).start()
    try:
        ctx = ssl.create_default_context()
        smtp_ca.configure_trust(ctx)
        with smtplib.SMTP_SSL("127.0.0.1", sink.port, context=ctx, timeout=5) as s:
            s.login("u", "p")
            s.sendmail("a@x", ["b@y"], b"Subject: t\r\n\r\nhi\r\n")
        assert sink.received[0].data == b"Subject: t\r\n\r\nhi\r\n"
    finally:
        sink.stop()


@pytest.mark.integration
def test_postfix_refuses_at_the_stage_its_delay_setting_says(postfix: PostfixServer) -> None:
    """``smtpd_delay_reject = yes`` (the default) answers a sender rule at RCPT, ``no`` at
    MAIL; body_checks after DATA; every port offers STARTTLS, then AUTH through Dovecot."""
    box = postfix.mailbox()
    refusals: dict[str, list[tuple[str, int]]] = {}
    for name in ("delay", "nodelay", "small"):
        with smtplib.SMTP("127.0.0.1", postfix.ports[name], timeout=10) as smtp:
            smtp.starttls(context=postfix.tls.client_context())
            smtp.login(postfix.sasl_user, postfix.sasl_password)
            assert smtp.has_extn("smtputf8")
            sizes = {"small": SMALL_SIZE_LIMIT}
            assert int(smtp.esmtp_features["size"]) == sizes.get(name, 8 * 1024 * 1024)
            smtp.sendmail("a@b.test", [box], b"Subject: ok\r\n\r\nbody\r\n")
            for sender, body in (
                (f"x@{DENIED_SENDER_DOMAIN}", b"S: x\r\n\r\nb\r\n"),
                (GREYLISTED_SENDER, b"S: x\r\n\r\nb\r\n"),
                ("a@b.test", b"S: x\r\n\r\n" + BODY_REFUSED + b"\r\n"),
            ):
                try:
                    smtp.sendmail(sender, [box], body)
                except smtplib.SMTPSenderRefused as exc:
                    refusals.setdefault(name, []).append(("mail", exc.smtp_code))
                except smtplib.SMTPRecipientsRefused as exc:
                    [(code, _)] = exc.recipients.values()
                    refusals.setdefault(name, []).append(("rcpt", code))
                except smtplib.SMTPDataError as exc:
                    refusals.setdefault(name, []).append(("data", exc.smtp_code))
    assert refusals["delay"] == [("rcpt", 554), ("rcpt", 451), ("data", 550)]
    assert refusals["nodelay"] == [("mail", 554), ("mail", 451), ("data", 550)]
    delivered = postfix.wait_delivered(box, 3)
    assert b"(Authenticated sender: relay@exchange.test)" in delivered[0]
    assert delivered[0].endswith(b"Subject: ok\n\nbody\n")  # stored with LF line ends


@pytest.mark.integration
def test_courier_substitutes_utf8_headers_unless_utf8_is_sent(courier: CourierServer) -> None:
    user, password = courier.add_user()
    courier.deliver_many(user, ["Subject: Grüße\nMessage-ID: <1@x>\n\nhi\n".encode()])
    endpoint = courier.endpoint(user, password)
    [asked] = served_messages(endpoint).values()
    [ascii_client] = served_messages(endpoint, utf8=False).values()
    assert asked == "Subject: Grüße\r\nMessage-ID: <1@x>\r\n\r\nhi\r\n".encode()
    assert b"Subject: Cannot display Unicode content" in ascii_client


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_mailutils_adds_x_uidl(mailutils: MailutilsServer, kind: str) -> None:
    user, password = mailutils.add_user(kind)
    mailutils.deliver_many(user, [b"Subject: a\nMessage-ID: <1@x>\n\n>From me\n"])
    [(uidl, served)] = served_messages(mailutils.endpoint(user, password)).items()
    # An mbox holds ">>From me" (mboxrd); mailutils serves the line as it was.
    assert served == b"Subject: a\r\nMessage-ID: <1@x>\r\nX-UIDL: %s\r\n\r\n>From me\r\n" % (
        uidl.encode()
    )


@pytest.mark.integration
def test_popa3d_has_no_capa_and_serves_over_tls(popa3d: Popa3dServer) -> None:
    user, password = popa3d.add_user()
    popa3d.deliver_many(user, [b"Subject: a\nMessage-ID: <1@x>\n\n.dot\nFrom me\n"])
    [served] = served_messages(popa3d.endpoint(user, password)).values()
    # The mbox holds ">From me" (mboxrd) and popa3d serves it so.
    assert served == b"Subject: a\r\nMessage-ID: <1@x>\r\n\r\n.dot\r\n>From me\r\n"
    plain = popa3d.endpoint(user, password, tls=False)
    p = poplib.POP3(plain.host, plain.port, timeout=10)
    with pytest.raises(poplib.error_proto):
        p.capa()
    p.quit()
