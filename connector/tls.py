"""TLS for every protocol we speak: the mode, the client context, what a failure means.

POP3 (``pop3.client``), SMTP (``smtp``) and the IMAP dead-letter store (``deadletter.imap``) all
secure their connection the same way, so the decisions live here once:

* :class:`TlsMode`: the ``tls`` key of ``[smtp]``, ``[[accounts]]`` and ``[dead_letter]``
  (docs/design.md §4.1).  ``starttls`` means STARTTLS (STLS for POP3) or nothing: a server that
  does not offer it is an error, never a silent downgrade (docs/design.md §12).
* :func:`make_ssl_context`: the client context the composition root builds from a
  ``verify_certificate`` and a ``ca_file``; verification is on unless turned off by name.
* :func:`tls_reason_hint`: what an OpenSSL handshake failure most likely means, for the error
  text an administrator reads.
* :func:`is_loopback`: whether a host is this machine, where clear text never leaves us
  (``check`` warns about a password sent in clear anywhere else; ``import-fetchmailrc`` picks
  no TLS only for such a host).
"""

from __future__ import annotations

import enum
import ipaddress
import ssl
from pathlib import Path

from connector.errors import ConfigError

__all__ = ["TlsMode", "is_loopback", "make_ssl_context", "tls_reason_hint"]


class TlsMode(enum.StrEnum):
    """How a connection is secured (the ``tls`` key, docs/design.md §4.1)."""

    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    NONE = "none"


def make_ssl_context(verify: bool, ca_file: Path | None, where: str) -> ssl.SSLContext:
    """A client context: system trust plus ``ca_file``; verification off only when asked.

    ``where`` names the config table in the :class:`ConfigError` raised for a ``ca_file``
    that cannot be loaded (``accounts[0].ca_file: cannot load ...``).
    """
    ctx = ssl.create_default_context()
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.ca_file: cannot load {ca_file}: {exc}") from exc
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_reason_hint(reason: str | None) -> str:
    """What an OpenSSL handshake failure reason most likely means for an administrator, as a
    suffix for the error text; empty when there is nothing to add.

    ``WRONG_VERSION_NUMBER``: the first bytes back were no TLS record, typically the server's
    plain-text greeting (``+OK``, ``220``) on a port that speaks TLS only after STLS/STARTTLS,
    or not at all.  Only meaningful for implicit TLS, where we speak TLS first.
    """
    if reason == "WRONG_VERSION_NUMBER":
        return " (the port speaks plain text: implicit TLS against a STARTTLS/plain port?)"
    return ""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and its subdomains (RFC 6761 §6.3) and for loopback addresses
    (``127.0.0.0/8``, ``::1``, in brackets or not); a final dot is ignored."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
