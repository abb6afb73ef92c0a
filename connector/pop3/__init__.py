"""POP3: a sans-I/O protocol core (``protocol``) and its asyncio shell (``client``)."""

from connector.pop3.client import AuthMethod, Pop3Client, Pop3Endpoint, Pop3Timeouts, TlsMode

__all__ = ["AuthMethod", "Pop3Client", "Pop3Endpoint", "Pop3Timeouts", "TlsMode"]
