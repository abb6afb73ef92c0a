import poplib
import smtplib
import ssl

import trustme

from tests.servers import DovecotServer, SmtpSink


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
