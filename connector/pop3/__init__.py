"""POP3: a sans-I/O protocol core (``protocol``) and its asyncio shell (``client``).

Layers above use the shell (:class:`Pop3Client` and its parameter types); the core's names are
re-exported for tests and for anyone driving the protocol over another transport.
"""

from connector.pop3.client import AuthMethod, Pop3Client, Pop3Endpoint, Pop3Timeouts, TlsMode
from connector.pop3.protocol import (
    NEED_DATA,
    Capabilities,
    Closed,
    Command,
    Connection,
    Continuation,
    Err,
    Event,
    Greeting,
    Listing,
    LocalProtocolError,
    Message,
    Ok,
    State,
    Verb,
)

__all__ = [
    "NEED_DATA",
    "AuthMethod",
    "Capabilities",
    "Closed",
    "Command",
    "Connection",
    "Continuation",
    "Err",
    "Event",
    "Greeting",
    "Listing",
    "LocalProtocolError",
    "Message",
    "Ok",
    "Pop3Client",
    "Pop3Endpoint",
    "Pop3Timeouts",
    "State",
    "TlsMode",
    "Verb",
]
