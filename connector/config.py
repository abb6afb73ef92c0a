"""Settings: the TOML file of docs/design.md §4.1, overridden by ``POP3_CONNECTOR_*`` variables.

The only pydantic in the package (docs/design.md §2).  :func:`load_settings` is the one way in; it
turns every failure (missing file, TOML syntax, validation, bad environment JSON, unreadable secret
file) into a :class:`~connector.errors.ConfigError` whose ``problems`` hold one line per problem,
key path first: ``accounts[1].port: Input should be less than or equal to 65535``.

Precedence is environment > TOML > defaults, merged deeply: ``POP3_CONNECTOR_SMTP__HOST`` replaces
``smtp.host`` and keeps the rest of ``[smtp]``.  Items of ``[[accounts]]`` cannot be reached from
the environment (pydantic-settings would replace the whole list), so per-account secrets come
from ``password_env`` or ``password_file``.  ``POP3_CONNECTOR_CONFIG`` names the config file (the
CLI reads it) and is not a setting.

After loading, every default that depends on something else is filled in, so callers read plain
values: ``port`` (by ``tls``), ``smtp.helo_name`` (this host's FQDN), ``dead_letter.path``
(``<state_dir>/dead-letters``), each account's ``poll_interval`` (``service.poll_interval``), and
``password`` (the secret, whichever of password / password_file / password_env gave it).

Secrets: pydantic's error dicts carry the whole input of a model (password included) even with
``hide_input_in_errors``; :func:`format_validation_error` asks for them without inputs, and no
message written here quotes a value.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shlex
import socket
import stat
import tomllib
import typing
from collections.abc import Collection, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from connector.addresses import is_address_pattern, is_domain, is_field_name, is_plain_address
from connector.errors import ConfigError
from connector.imap.protocol import folder_levels
from connector.tls import is_loopback

__all__ = [
    "DEFAULT_TARGET",
    "ENV_PREFIX",
    "MASK",
    "AccountConfig",
    "DeadLetterConfig",
    "ImapDeadLetter",
    "MaildirDeadLetter",
    "MetricsSettings",
    "ServiceSettings",
    "Settings",
    "SmtpConfig",
    "account_key",
    "config_warnings",
    "configured_secrets",
    "dead_letter_path",
    "format_duration",
    "format_validation_error",
    "holds_secret",
    "load_settings",
    "mask_secrets",
    "parse_duration",
    "parse_size",
    "poll_interval_warnings",
    "port_tls_warnings",
    "render_settings",
]

ENV_PREFIX: Final = "POP3_CONNECTOR_"
# The CLI's config-path variable shares the prefix but is not a setting (docs/design.md §4.1).
CONFIG_ENV: Final = ENV_PREFIX + "CONFIG"
EVENT_LOOP_ENV: Final = ENV_PREFIX + "EVENT_LOOP"  # read by connector.runloop, not a setting
# The number of shards, set by deploy/kubernetes/statefulset.yaml for its
# `run --shard auto/$(POP3_CONNECTOR_SHARDS)` (deploy/kubernetes/README.md): not a setting.
SHARDS_ENV: Final = ENV_PREFIX + "SHARDS"
MASK: Final = "********"
# The one error type our validators raise: ``key`` (optional) is appended to pydantic's location,
# so a cross-field check on ``accounts[1]`` can still name ``accounts[1].password_file``.
_ERROR_TYPE: Final = "config"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _problem(detail: str, key: str | None = None) -> PydanticCustomError:
    return PydanticCustomError(_ERROR_TYPE, "{detail}", {"detail": detail, "key": key})


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------

_NUMBER: Final = r"\d+(?:\.\d+)?"
_DURATION_RE: Final = re.compile(
    rf"(?:(?P<d>{_NUMBER})d)?(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m)?(?:(?P<s>{_NUMBER})s)?",
    re.IGNORECASE,
)
_UNIT_SECONDS: Final = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_HINT: Final = 'expected a duration like "30s", "15m", "2h", "5d", "1h30m" or seconds'


def parse_duration(value: object) -> float:
    """Seconds from a duration: ``"30s"``, ``"15m"``, ``"2h"``, ``"5d"``, ``"1h30m"``, or a number.

    Units go from large to small, each at most once; a bare number (or numeric string) is
    seconds.  The result must be finite and greater than zero.  Raises ``ValueError`` without
    quoting the value.
    """
    if isinstance(value, bool):  # TOML `true` is not a duration, though bool is an int
        raise ValueError(_DURATION_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(_NUMBER, text):
            seconds = float(text)
        else:
            m = _DURATION_RE.fullmatch(text)
            if not text or m is None:
                raise ValueError(_DURATION_HINT)
            seconds = sum(float(n) * _UNIT_SECONDS[u] for u, n in m.groupdict().items() if n)
    else:
        raise ValueError(_DURATION_HINT)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("a duration must be greater than 0")
    return seconds


def format_duration(seconds: float) -> str | float:
    """The inverse of :func:`parse_duration` for rendering: ``5400`` -> ``"1h30m"``.

    Whole seconds become a duration string; a fractional value stays a float (TOML keeps it
    exactly, and ``parse_duration`` accepts numbers).
    """
    if seconds <= 0 or not math.isfinite(seconds) or seconds != int(seconds):
        return seconds
    rest = int(seconds)
    parts: list[str] = []
    for unit, size in _UNIT_SECONDS.items():
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _problem(str(exc)) from None


Duration = Annotated[float, BeforeValidator(_duration)]

# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

_SIZE_RE: Final = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMG]i?B|B)?", re.IGNORECASE)
# "MB" is 10^6 octets and "MiB" 2^20 (IEC 80000-13), as the units say.
_SIZE_UNITS: Final = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_SIZE_HINT: Final = 'expected a size in octets, or like "50MB", "25MiB", "512KiB"'


def parse_size(value: object) -> int:
    """Octets from a size: a whole number, or ``"50MB"`` (10^6), ``"25MiB"`` (2^20), ``"1GB"``...

    The result must be a whole number greater than zero.  Raises ``ValueError`` without quoting
    the value.
    """
    if isinstance(value, bool):  # TOML `true` is not a size, though bool is an int
        raise ValueError(_SIZE_HINT)
    if isinstance(value, int):
        octets = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError(_SIZE_HINT)
        exact = float(m["n"]) * _SIZE_UNITS[(m["unit"] or "b").lower()]
        if exact != int(exact):
            raise ValueError("a size must be a whole number of octets")
        octets = int(exact)
    else:
        raise ValueError(_SIZE_HINT)
    if octets <= 0:
        raise ValueError("a size must be greater than 0")
    return octets


def _size(value: object) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise _problem(str(exc)) from None


Size = Annotated[int, BeforeValidator(_size)]

# --------------------------------------------------------------------------------------------
# Small validated types
# --------------------------------------------------------------------------------------------


def _address(value: str) -> str:
    # ASCII only: a non-ASCII address needs SMTPUTF8, which an Exchange relay may not offer.
    if not is_plain_address(value):
        raise _problem("not a valid mail address (expected user@domain, ASCII, no <>)")
    return value


Address = Annotated[str, AfterValidator(_address)]

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def _account_name(value: str) -> str:
    # The name goes into log lines, metric labels and file names: keep it to safe characters.
    if not _NAME_RE.fullmatch(value) or value in {".", ".."}:
        raise _problem("use 1-64 characters: letters, digits, '.', '_', '-' or '@'")
    return value


DEFAULT_TARGET: Final = "default"
"""The name of ``[smtp]`` as an SMTP target: what an account without ``smtp`` delivers to."""


def _target_name(value: str) -> str:
    # A label value of account_info and a field of /status, like an account's name.
    if not _NAME_RE.fullmatch(value) or value in {".", ".."}:
        raise _problem("use 1-64 characters: letters, digits, '.', '_', '-' or '@'")
    return value


TargetName = Annotated[str, AfterValidator(_target_name)]


def _pop3_username(value: str) -> str:
    # RFC 1939 §3: arguments are separated by single spaces, so a POP3 user name has none.
    if not value or _CONTROL.search(value) or " " in value:
        raise _problem("must be non-empty, without spaces or control characters (RFC 1939 §3)")
    return value


def _host(value: str) -> str:
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise _problem("a host name or IP address without spaces is required")
    return value


Host = Annotated[str, AfterValidator(_host)]
Port = Annotated[int, Field(ge=1, le=65535)]
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):
        raise _problem("not a valid environment variable name")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class _Secretful(_Model):
    """``password`` / ``password_file`` / ``password_env``: at most one; ``password`` ends resolved.

    After validation ``password`` holds the secret whichever way it was given (a file's trailing
    newline stripped), and the other two record where it came from.
    """

    _password_required: ClassVar[bool] = True

    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: EnvName | None = None

    def secret(self) -> str | None:
        """The resolved password in clear text, or None when none is configured."""
        return self.password.get_secret_value() if self.password is not None else None

    def _resolved_password(self) -> SecretStr | None:
        given = [n for n in ("password", "password_file", "password_env") if getattr(self, n)]
        if len(given) > 1:
            raise _problem(
                f"set only one of password, password_file, password_env (got {', '.join(given)})"
            )
        if self.password_file is not None:
            try:
                # UTF-8; "utf-8-sig" drops the byte-order mark that Windows editors and
                # PowerShell 5.1's Set-Content -Encoding utf8 put first, which would otherwise
                # become the password's first character.
                text = self.password_file.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                if isinstance(exc, UnicodeDecodeError):
                    reason = "not UTF-8 text"
                raise _problem(
                    f"cannot read {self.password_file}: {reason}", "password_file"
                ) from None
            value = text.rstrip("\r\n")
            if not value:
                raise _problem(f"{self.password_file} is empty", "password_file")
            return SecretStr(value)
        if self.password_env is not None:
            env = os.environ.get(self.password_env)
            if env is None:
                raise _problem(
                    f"environment variable {self.password_env} is not set", "password_env"
                )
            if not env:
                raise _problem(f"environment variable {self.password_env} is empty", "password_env")
            return SecretStr(env)
        if self.password is not None and not self.password.get_secret_value():
            raise _problem("must not be empty", "password")
        if self.password is None and self._password_required:
            raise _problem("required: set password, password_file or password_env", "password")
        return self.password


def _check_directory(value: Path | None, key: str) -> None:
    # Created when missing (at start, or with the Maildir's first dead letter); a file in its
    # place would otherwise fail later as "lock: File exists" or "cannot read new/: Not a
    # directory".  Raised from the model, so that the whole path is in the message.
    if value is not None and value.exists() and not value.is_dir():
        raise _problem(f"{value} exists and is not a directory", key)


class ServiceSettings(_Model):
    """``[service]``: the daemon as a whole."""

    state_dir: Path = Path("/var/lib/pop3-connector")
    poll_interval: Duration = 900.0
    max_parallel_accounts: int = Field(default=8, ge=1)
    # POP3 sessions at once on one host (the configured host name, in lower case): providers
    # throttle or block an address that opens many (docs/design.md §10.2).
    max_sessions_per_host: int = Field(default=2, ge=1)
    shutdown_grace: Duration = 30.0
    # The longest one account's cycle may take, connect to QUIT, whatever the servers do (a
    # POP3 server sending a byte per read timeout); then its connections are dropped.
    cycle_timeout: Duration = 3600.0
    # A message whose LIST size is above this is streamed to <state_dir>/spool and handled
    # from the file (docs/design.md §5.3); smaller ones stay in memory.
    spool_threshold: Size = 2 * 1024 * 1024
    # The octets of messages in memory at once, over all accounts (docs/design.md §10.6);
    # None: twice the threshold per parallel account (memory_budget()).
    message_memory_budget: Size | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _budget_holds_a_message(self) -> Self:
        budget = self.message_memory_budget
        if budget is not None and budget < self.spool_threshold:
            raise _problem(
                f"must be at least spool_threshold ({self.spool_threshold} octets): a message "
                f"the threshold keeps in memory must fit (got {budget})",
                "message_memory_budget",
            )
        return self

    @model_validator(mode="after")
    def _state_dir_is_a_directory(self) -> Self:
        _check_directory(self.state_dir, "state_dir")
        return self

    def memory_budget(self) -> int:
        """``message_memory_budget``, or its default: room for two messages at the spool
        threshold (the one being delivered, the next one being read) per parallel account."""
        if self.message_memory_budget is not None:
            return self.message_memory_budget
        return 2 * self.spool_threshold * self.max_parallel_accounts


_LISTEN_V6_RE: Final = re.compile(r"\[(?P<host>[^\]]+)\]:(?P<port>\d{1,5})")
_LISTEN_RE: Final = re.compile(r"(?P<host>[A-Za-z0-9.-]+):(?P<port>\d{1,5})")


_HOST_NAME_RE: Final = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63}){0,126}")


def _split_listen(value: str) -> tuple[str, int] | None:
    if value == "":
        return None
    m = _LISTEN_V6_RE.fullmatch(value)
    if m is not None:
        try:
            ipaddress.IPv6Address(m["host"])
        except ValueError:
            raise _problem("not an IPv6 address inside [ ]") from None
    else:
        m = _LISTEN_RE.fullmatch(value)
        if m is None:
            raise _problem('expected "host:port" ("[::1]:9469" for IPv6), or "" to turn it off')
    port = int(m["port"])
    if port > 65535:
        raise _problem("port must be 0-65535")
    return m["host"], port


def _host_name(value: str) -> str:
    # RFC 1123 §2.1 labels; compared in lower case, without a final dot.
    name = value.lower().removesuffix(".")
    if not _HOST_NAME_RE.fullmatch(name):
        raise _problem(f"{value!r} is not a host name (letters, digits, '-' and '.')")
    return name


def _listen(value: str) -> str:
    _split_listen(value)
    return value


class NoticesConfig(_Model):
    """``[notices]``: mail to a postmaster about dead letters and failing accounts (optional)."""

    postmaster: Address | None = None  # None: no notices
    min_interval: Duration = 3600.0  # at most one notice per kind and account this often
    on_dead_letter: bool = True
    on_account_failing: bool = True


class MetricsSettings(_Model):
    """``[metrics]``: the HTTP endpoint for /metrics, /healthz, /status and POST /poll."""

    # Port 0 is allowed: the OS picks one (tests use it).
    listen: Annotated[str, AfterValidator(_listen)] = "127.0.0.1:9469"
    # Host names a request's Host header may give besides the listen address, localhost and
    # IP literals (connector/http.py: DNS rebinding): the name Prometheus scrapes us by.
    allowed_hosts: list[Annotated[str, AfterValidator(_host_name)]] = []
    # The account label and the per-account series (docs/design.md §11.1): on for an office's
    # few mailboxes; a provider with thousands turns it off and gets the totals.
    per_account: bool = True

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind, IPv6 without brackets; None when the endpoint is off."""
        return _split_listen(self.listen)


class _Endpoint(_Secretful):
    """Host, port, TLS and trust; ``port`` is filled from ``tls`` when not given."""

    _default_ports: ClassVar[dict[str, int]] = {}

    host: Host
    port: Port | None = None
    tls: str  # narrowed to a Literal by each subclass
    verify_certificate: bool = True
    ca_file: Path | None = None

    @property
    def effective_port(self) -> int:
        """The port to connect to: the configured one, else the default for ``tls``."""
        if self.port is not None:
            return self.port
        return self._default_ports[self.tls]

    def _finished(self) -> dict[str, Any]:
        password = self._resolved_password()
        if password is not None and _CONTROL.search(password.get_secret_value()):
            # A line break would end the PASS/AUTH command early (RFC 1939 §3): refuse it here,
            # naming the key, rather than fail at login every cycle.
            raise _problem(
                "must not contain a line break, NUL or other control character", "password"
            )
        return {"port": self.effective_port, "password": password}

    # Set once the derived values are in: pydantic runs "after" validators again when an
    # instance is validated (Settings(accounts=[AccountConfig(...)])), and a resolved password
    # next to its password_env must not then look like two sources.
    _complete: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _finish(self) -> Self:
        if self._complete:
            return self
        # The models are frozen, and a model validator that returns a copy makes pydantic warn
        # when the model is built directly.  This instance is new and not yet seen by anyone,
        # so filling in the derived values is the end of its construction, not a mutation.
        self.__dict__.update(self._finished())
        self._complete = True
        return self


def _helo_name(value: str) -> str:
    # RFC 5321 §4.1.1.1: a domain or an address literal; no spaces or line breaks either way.
    if not re.fullmatch(r"[A-Za-z0-9._-]+|\[[A-Za-z0-9:.]+\]", value):
        raise _problem("expected a host name like connector.example.local")
    return value


def _envelope_sender(value: str) -> str:
    if value in {"return-path", "null"}:
        return value
    if not is_plain_address(value):
        raise _problem('expected "return-path", "null" or a mail address')
    return value


class SmtpConfig(_Endpoint):
    """``[smtp]``: the Exchange receive connector.  SMTP AUTH is optional."""

    _password_required: ClassVar[bool] = False
    # RFC 8314 §3.3: implicit TLS on 465; RFC 5321 §4.5.4 / RFC 3207: 25 with STARTTLS or none.
    _default_ports: ClassVar[dict[str, int]] = {"implicit": 465, "starttls": 25, "none": 25}

    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str | None = Field(default=None, min_length=1)
    helo_name: Annotated[str, AfterValidator(_helo_name)] | None = None
    envelope_sender: Annotated[str, AfterValidator(_envelope_sender)] = "return-path"
    dsn: bool = True
    timeout: Duration = 60.0
    # RFC 5321 §4.5.3.2.6: the reply to the final dot, 10 minutes (a timeout there may deliver
    # the message twice).
    data_termination_timeout: Duration = 600.0

    def _finished(self) -> dict[str, Any]:
        updates = super()._finished()
        if self.username is not None and updates["password"] is None:
            raise _problem(
                "username is set: set password, password_file or password_env too", "password"
            )
        if self.username is None and updates["password"] is not None:
            raise _problem("required when a password is set (SMTP AUTH)", "username")
        if self.helo_name is None:
            updates["helo_name"] = socket.getfqdn()
        return updates


class MaildirDeadLetter(_Model):
    """``[dead_letter] store = "maildir"``: a Maildir any mail client can read
    (docs/design.md §7.2)."""

    store: Literal["maildir"] = "maildir"
    # None only before loading: load_settings fills in <state_dir>/dead-letters.
    path: Path | None = None

    @model_validator(mode="after")
    def _path_is_a_directory(self) -> Self:
        _check_directory(self.path, "path")
        return self


def _folder(value: str) -> str:
    # RFC 3501 §9: a mailbox name is an astring; CR, LF and NUL can never be sent.
    if not value or any(c in value for c in "\r\n\0"):
        raise _problem("a folder name without line breaks is required")
    return value


class ImapDeadLetter(_Endpoint):
    """``[dead_letter] store = "imap"``: APPEND to a folder on an IMAP server."""

    # RFC 8314 §3.3 (993) and RFC 3501 §2.1 (143).
    _default_ports: ClassVar[dict[str, int]] = {"implicit": 993, "none": 143}

    store: Literal["imap"]
    tls: Literal["implicit", "none"] = "implicit"
    username: str = Field(min_length=1)
    folder: Annotated[str, AfterValidator(_folder)] = "POP3 Connector/Dead Letters"


def _dead_letter_store(value: Any) -> str:
    # A missing `store` means the default Maildir (docs/design.md §7.2).
    if isinstance(value, dict):
        return str(value.get("store", "maildir"))
    return str(getattr(value, "store", "maildir"))


DeadLetterConfig = Annotated[
    Annotated[MaildirDeadLetter, Tag("maildir")] | Annotated[ImapDeadLetter, Tag("imap")],
    Discriminator(
        _dead_letter_store,
        custom_error_type=_ERROR_TYPE,
        custom_error_message='must be "maildir" or "imap"',
        custom_error_context={"detail": 'must be "maildir" or "imap"', "key": "store"},
    ),
]
_DEAD_LETTER_TAGS: Final = frozenset({"maildir", "imap"})


def _domain(value: str) -> str:
    value = value.lower().rstrip(".")
    if not is_domain(value):
        raise _problem("not a valid domain name (expected like firma.example, ASCII)")
    return value


def _field_name(value: str) -> str:
    if not is_field_name(value):
        raise _problem("not a header field name (like Delivered-To)")
    return value


def _pattern(value: str) -> str:
    if not is_address_pattern(value):
        raise _problem(
            'expected an address, where * and ? may stand for any text ("*@sales.firma.example")'
        )
    return value.lower()


Domain = Annotated[str, AfterValidator(_domain)]


class RoutingRule(_Model):
    """One ``[[accounts.shared.rules]]``: an address (pattern) and the Exchange recipients."""

    match: Annotated[str, AfterValidator(_pattern)]
    deliver_to: list[Address] = Field(min_length=1)


class SharedConfig(_Model):
    """``[accounts.shared]``: a catch-all mailbox whose recipients are read from the messages."""

    domains: list[Domain] = Field(min_length=1)
    envelope_headers: list[Annotated[str, AfterValidator(_field_name)]] = Field(
        default_factory=lambda: ["Delivered-To", "X-Original-To", "X-Envelope-To"]
    )
    header_recipients: bool = True
    rewrite_domain: Domain | None = None
    # Never a recipient: the catch-all's own address (the account's username, when it is an
    # address, is always added), which providers write into Delivered-To.
    ignore_addresses: list[Address] = Field(default_factory=list)
    rules: list[RoutingRule] = Field(default_factory=list)
    # A provider stores one copy per recipient: a Message-ID already delivered to a recipient
    # this long ago or less is not delivered to it again.
    suppress_duplicates: bool = True
    duplicate_window: Duration = 7 * 86400.0


def _account_folder(value: str) -> str:
    try:
        folder_levels(value)
    except ValueError as exc:
        raise _problem(f"{exc}; levels are separated by '/'") from None
    return value


# The keys of an IMAP account that a POP3 account must not have.
_IMAP_ONLY: Final = ("folder", "push", "idle_renewal")
# RFC 2177 §3: a client re-issues IDLE at least every 29 minutes.
_IDLE_RENEWAL_MAX: Final = 29 * 60.0


class AccountConfig(_Endpoint):
    """One ``[[accounts]]`` entry: a POP3 mailbox (or an IMAP folder) and where its mail goes."""

    # RFC 8314 §3.3 (995); RFC 1939 §3 and RFC 2595 §4 (110, plain or with STLS).
    _default_ports: ClassVar[dict[str, int]] = {"implicit": 995, "starttls": 110, "none": 110}
    # RFC 8314 §3.3 (993); RFC 3501 §2.1 and §6.2.1 (143, plain or with STARTTLS).
    _imap_ports: ClassVar[dict[str, int]] = {"implicit": 993, "starttls": 143, "none": 143}

    name: Annotated[str, AfterValidator(_account_name)]
    # "pop3" (the default) or "imap": an IMAP folder collected like a POP3 mailbox, waiting
    # with IDLE where the server offers it (docs/design.md §15).
    protocol: Literal["pop3", "imap"] = "pop3"
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    username: Annotated[str, AfterValidator(_pop3_username)]
    # POP3: auto, user, apop, plain, xoauth2; IMAP: auto, login, plain, xoauth2.
    auth: Literal["auto", "user", "apop", "login", "plain", "xoauth2"] = "auto"
    # IMAP only: the folder to collect ("/" between levels), whether to wait with IDLE, and
    # how often IDLE is renewed.
    folder: Annotated[str, AfterValidator(_account_folder)] = "INBOX"
    push: bool = True
    idle_renewal: Duration = Field(default=25 * 60.0, gt=0, le=_IDLE_RENEWAL_MAX)
    # auth = "xoauth2" (Microsoft 365, Gmail): where each login gets a fresh access token; an
    # external helper keeps it current.  Exactly one of the two, and then no password.
    oauth2_token_file: Path | None = None
    oauth2_token_command: str | None = Field(default=None, min_length=1)
    deliver_to: list[Address] = Field(min_length=1)
    # The SMTP target this account's mail goes to: a name of [smtp_targets.NAME], or "default"
    # ([smtp]); None is [smtp] too.  An IT provider's customers each have their own Exchange.
    smtp: TargetName | None = None
    # None before loading; load_settings fills in service.poll_interval.
    poll_interval: Duration | None = None
    enabled: bool = True
    max_deferral: Duration = 5 * 86400.0

    def _resolved_password(self) -> SecretStr | None:
        oauth2 = [n for n in ("oauth2_token_file", "oauth2_token_command") if getattr(self, n)]
        if self.auth != "xoauth2":
            if oauth2:
                raise _problem('only used with auth = "xoauth2"', oauth2[0])
            return super()._resolved_password()
        if len(oauth2) != 1:
            raise _problem(
                'auth = "xoauth2" needs exactly one of oauth2_token_file, oauth2_token_command'
                + (f" (got {', '.join(oauth2)})" if oauth2 else ""),
                "oauth2_token_file" if not oauth2 else oauth2[1],
            )
        given = [n for n in ("password", "password_file", "password_env") if getattr(self, n)]
        if given:
            # XOAUTH2 sends a token, never a password: an unused secret is a mistake to report.
            raise _problem('not used with auth = "xoauth2" (the token replaces it)', given[0])
        if self.oauth2_token_command is not None:
            try:
                argv = shlex.split(self.oauth2_token_command)
            except ValueError as exc:
                raise _problem(f"cannot split into words: {exc}", "oauth2_token_command") from None
            if not argv:
                raise _problem("must name a program", "oauth2_token_command")
        return None

    def oauth2_argv(self) -> tuple[str, ...] | None:
        """``oauth2_token_command`` split into words like a POSIX shell would (no shell runs)."""
        if self.oauth2_token_command is None:
            return None
        return tuple(shlex.split(self.oauth2_token_command))

    # Larger messages are dead-lettered (stage "size") without an SMTP attempt, or, with
    # oversize = "leave", left upstream and reported (the default is cycle.AccountSpec's).
    max_message_size: Size = 256 * 1024 * 1024
    oversize: Literal["dead-letter", "leave"] = "dead-letter"
    # A shared (catch-all) mailbox: recipients from each message; deliver_to is the fallback.
    shared: SharedConfig | None = None
    # Keep mail upstream after delivery (or dead-lettering); never deliver a UIDL twice.
    leave_on_server: bool = False
    # With leave_on_server: DELE a kept message this long after it was delivered.
    delete_after: Duration | None = None

    @property
    def effective_port(self) -> int:
        """The port to connect to: the configured one, else the default for ``protocol`` and
        ``tls``."""
        if self.port is not None:
            return self.port
        return (self._imap_ports if self.protocol == "imap" else self._default_ports)[self.tls]

    def _finished(self) -> dict[str, Any]:
        if self.protocol == "pop3":
            for key in _IMAP_ONLY:
                if key in self.model_fields_set:
                    raise _problem('only used with protocol = "imap"', key)
            if self.auth == "login":
                raise _problem('"login" is for IMAP accounts; POP3 says "user"', "auth")
        elif self.auth in ("user", "apop"):
            raise _problem(
                f'"{self.auth}" is a POP3 login; an IMAP account takes "auto", "login", '
                '"plain" or "xoauth2"',
                "auth",
            )
        updates = super()._finished()
        if self.delete_after is not None and not self.leave_on_server:
            # Without leave_on_server mail is deleted at once: the key would silently mean
            # nothing, and its author surely meant something.
            raise _problem("only meaningful with leave_on_server = true", "delete_after")
        return updates


# Filled in by load_settings for the duration of one Settings() call (see _TomlData).
_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("_toml_data", default=None)


class _TomlData(PydanticBaseSettingsSource):
    """The parsed TOML file as the lowest-priority source.

    load_settings parses the file itself (a missing file is an error, and syntax errors keep
    their line and column), so this source only hands the dict on; pydantic-settings merges it
    deeply under the environment.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole dict

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_data.get() or {})


class Settings(BaseSettings):
    """The whole configuration (docs/design.md §4.1).  Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    # Order matters: the validators of later fields read the earlier ones from info.data.
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    smtp: SmtpConfig
    # More SMTP servers, by name ([smtp_targets.kunde-a], the same keys as [smtp]), that an
    # account chooses with `smtp = "kunde-a"` (docs/design.md §14.1).  A table of tables, so
    # that an error names `smtp_targets.kunde-a.port`; the environment still reaches [smtp]
    # as POP3_CONNECTOR_SMTP__HOST.
    smtp_targets: dict[TargetName, SmtpConfig] = Field(default_factory=dict)
    dead_letter: DeadLetterConfig = Field(default_factory=MaildirDeadLetter, validate_default=True)
    notices: NoticesConfig = Field(default_factory=NoticesConfig)
    accounts: list[AccountConfig] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: init kwargs (tests), environment, TOML.  No .env file, no secrets dir.
        return (init_settings, env_settings, _TomlData(settings_cls))

    @field_validator("dead_letter")
    @classmethod
    def _default_dead_letter_path(
        cls, value: MaildirDeadLetter | ImapDeadLetter, info: ValidationInfo
    ) -> MaildirDeadLetter | ImapDeadLetter:
        service = info.data.get("service")
        if isinstance(value, MaildirDeadLetter) and value.path is None and service is not None:
            return value.model_copy(update={"path": service.state_dir / "dead-letters"})
        return value

    @field_validator("accounts")
    @classmethod
    def _check_accounts(
        cls, value: list[AccountConfig], info: ValidationInfo
    ) -> list[AccountConfig]:
        # Names become file names and metric labels; "Info" and "info" collide on some disks.
        seen: dict[str, int] = {}
        for i, account in enumerate(value):
            first = seen.setdefault(account.name.lower(), i)
            if first != i:
                raise _problem(f"duplicate account name (also accounts[{first}])", f"[{i}].name")
        targets = info.data.get("smtp_targets")
        if targets is not None:  # None: the targets had errors of their own, reported instead
            known = [DEFAULT_TARGET, *targets]
            for i, account in enumerate(value):
                if account.smtp is not None and account.smtp not in known:
                    there = ", ".join(
                        f"{_toml_string(t)}{' ([smtp])' if t == DEFAULT_TARGET else ''}"
                        for t in known
                    )
                    raise _problem(
                        f"no SMTP target {_toml_string(account.smtp)}: add a table "
                        f"[smtp_targets.{_toml_key(account.smtp)}], or name one there is: {there}",
                        f"[{i}].smtp",
                    )
        service = info.data.get("service")
        if service is None:
            return value
        return [
            a
            if a.poll_interval is not None
            else a.model_copy(update={"poll_interval": service.poll_interval})
            for a in value
        ]

    @field_validator("smtp_targets")
    @classmethod
    def _check_targets(cls, value: dict[str, SmtpConfig]) -> dict[str, SmtpConfig]:
        if DEFAULT_TARGET in value:
            reserved = f'"{DEFAULT_TARGET}" is [smtp]\'s name; give this target another one'
            raise _problem(reserved, DEFAULT_TARGET)
        return value

    def target_of(self, account: AccountConfig) -> str:
        """The name of the SMTP target an account delivers to (``"default"``: ``[smtp]``)."""
        return account.smtp if account.smtp is not None else DEFAULT_TARGET

    def smtp_config(self, target: str) -> SmtpConfig:
        """``[smtp]`` for ``"default"``, else ``[smtp_targets.<target>]`` (KeyError if none)."""
        return self.smtp if target == DEFAULT_TARGET else self.smtp_targets[target]

    def poll_interval_of(self, account: AccountConfig) -> float:
        """Seconds between an account's cycles: its own ``poll_interval``, else the service's."""
        return (
            account.poll_interval
            if account.poll_interval is not None
            else self.service.poll_interval
        )


def dead_letter_path(settings: Settings) -> Path | None:
    """The dead-letter Maildir (default ``<state_dir>/dead-letters``); None for the IMAP store."""
    dl = settings.dead_letter
    if isinstance(dl, ImapDeadLetter):
        return None
    return dl.path if dl.path is not None else settings.service.state_dir / "dead-letters"


# --------------------------------------------------------------------------------------------
# Loading and errors
# --------------------------------------------------------------------------------------------


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif i == 1 and loc[0] == "dead_letter" and part in _DEAD_LETTER_TAGS:
            continue  # the discriminated union's tag is not a TOML key
        elif part == "[key]":
            continue  # pydantic's marker for an error in a table's key: the key names it
        elif i == 1 and loc[0] == "smtp_targets":
            path += "." + _toml_key(part)  # a target's name may hold a "." or a space
        else:
            path += f".{part}" if path else part
    return path


# Keys whose value is a secret, or may hold one (a token command's arguments): never shown.
_SECRET_KEYS: Final = frozenset({"password", "oauth2_token_command"})
_SHOWN_VALUE_MAX: Final = 60
_ACCOUNT_PATH: Final = re.compile(r"accounts\[(\d+)\]")


def holds_secret(value: str, secrets: Collection[str]) -> bool:
    """Whether ``value`` contains one of ``secrets``, or is a piece of one (4 characters or
    more): a password pasted into the wrong key, whole or in part."""
    return any(s in value or (len(value) >= 4 and value in s) for s in secrets if s)


# A secret shorter than this is masked only where it stands alone (not inside a word): a
# one-letter password would otherwise mask that letter in every word of the message.
_SHORT_SECRET: Final = 6


def mask_secrets(text: str, secrets: Collection[str]) -> str:
    """``text`` with every occurrence of each of ``secrets`` replaced by the mask: the net
    under a message built from configured values (a host, a name, a path), any of which may
    hold a password pasted into the wrong key.  A short secret only where no letter or digit
    touches it."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        if len(secret) >= _SHORT_SECRET:
            text = text.replace(secret, MASK)
        else:
            alone = re.compile(rf"(?<![^\W_]){re.escape(secret)}(?![^\W_])")
            text = alone.sub(MASK, text)
    return text


def configured_secrets(settings: Settings) -> frozenset[str]:
    """Every password the settings hold, resolved (inline, ``password_file``,
    ``password_env``): the accounts', ``[smtp]``'s, each SMTP target's and an IMAP dead-letter
    store's.  Only to keep them out of what ``check`` prints."""
    models: list[_Secretful] = [settings.smtp, *settings.smtp_targets.values()]
    models += settings.accounts
    if isinstance(settings.dead_letter, ImapDeadLetter):
        models.append(settings.dead_letter)
    return frozenset(s for m in models if (s := m.secret()))


def _shown_value(err: Any, secrets: Collection[str]) -> str:
    """`` (got VALUE)`` for the value an error is about, when that is safe to show: a plain
    value (not a table), not under a secret key, not an unknown key (a misspelt ``pasword``
    would hold the password), and not one of ``secrets`` nor a piece of one (a password pasted
    into the wrong key).  TOML-quoted, control characters escaped, cut."""
    value = err.get("input")
    keys = {str(part) for part in err["loc"]}
    key = (err.get("ctx") or {}).get("key")
    if key:
        keys.add(str(key).rsplit(".", 1)[-1])
    if err["type"] == "extra_forbidden" or keys & _SECRET_KEYS:
        return ""
    match value:
        case bool():
            shown = "true" if value else "false"
        case int() | float():
            shown = repr(value)
        case str():
            if holds_secret(value, secrets):
                return ""
            text = value if len(value) <= _SHOWN_VALUE_MAX else value[:_SHOWN_VALUE_MAX] + "..."
            shown = _toml_string(text)
        case _:
            return ""
    return f" (got {shown})"


def _with_account_name(path: str, names: Mapping[int, str]) -> str:
    """``accounts[4].port`` -> ``accounts[4] (name "buchhaltung").port``: an index alone is
    hard to find in a file of twenty accounts."""
    m = _ACCOUNT_PATH.match(path)
    if m is None or int(m[1]) not in names:
        return path
    name = names[int(m[1])]
    name = name if len(name) <= _SHOWN_VALUE_MAX else name[:_SHOWN_VALUE_MAX] + "..."
    return f"{m[0]} (name {_toml_string(name)}){path[m.end() :]}"


def _account_names(data: Mapping[str, Any]) -> dict[int, str]:
    """Each ``[[accounts]]`` table's ``name`` in the TOML, by index; none when the environment
    replaces the list (``POP3_CONNECTOR_ACCOUNTS``), whose indexes the file does not know."""
    if any(n.upper() == ENV_PREFIX + "ACCOUNTS" for n in os.environ):
        return {}
    accounts = data.get("accounts")
    if not isinstance(accounts, list):
        return {}
    return {
        i: a["name"]
        for i, a in enumerate(accounts)
        if isinstance(a, dict) and isinstance(a.get("name"), str)
    }


def _known_secrets(data: object) -> set[str]:
    """Every secret the configuration gives: inline passwords, the variables ``password_env``
    names and the ``POP3_CONNECTOR_*PASSWORD*`` overrides, the first line of each readable
    ``password_file``.  Only to keep them out of error messages."""
    found: set[str] = set()
    match data:
        case dict():
            for key, value in data.items():
                if key == "password" and isinstance(value, str):
                    found.add(value)
                elif key == "password_file" and isinstance(value, str):
                    try:
                        with open(value, encoding="utf-8-sig", errors="replace") as f:
                            found.add(f.read(4096).strip("\r\n"))
                    except OSError:
                        pass
                else:
                    found |= _known_secrets(value)
        case list():
            for value in data:
                found |= _known_secrets(value)
    return found


def _secrets_in(data: Mapping[str, Any]) -> set[str]:
    env = {n.upper(): v for n, v in os.environ.items()}
    names = _password_env_names(data)
    names |= {n for n in env if n.startswith(ENV_PREFIX) and "PASSWORD" in n}
    return _known_secrets(data) | {env[n] for n in names if n in env}


def _env_source(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    """The ``POP3_CONNECTOR_*`` variable that gave the value at ``loc`` (``smtp.port`` from
    ``POP3_CONNECTOR_SMTP__PORT``), if one did: the environment wins over the file."""
    if not loc or any(isinstance(part, int) for part in loc):
        return None  # list items cannot be reached from the environment
    wanted = ENV_PREFIX + "__".join(str(part) for part in loc).upper()
    return next((name for name in environ if name.upper() == wanted), None)


def format_validation_error(
    exc: ValidationError,
    account_names: Mapping[int, str] | None = None,
    secrets: Collection[str] = (),
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per error, ``key.path[0].name: message``, the bad value after it when it is
    no secret (see :func:`_shown_value`), and an account's name next to its index.  With
    ``environ`` (the variables the settings were loaded with), a value that came from a
    ``POP3_CONNECTOR_*`` variable is blamed on it, not on the file."""
    lines: list[str] = []
    for err in exc.errors(include_input=True, include_url=False):
        path = _key_path(err["loc"])
        msg = err["msg"]
        ctx = err.get("ctx") or {}
        if err["type"] == _ERROR_TYPE:
            key = ctx.get("key")
            msg = str(ctx.get("detail", msg))
            if key:
                path = (
                    f"{path}{key}" if str(key).startswith("[") else f"{path}.{key}" if path else key
                )
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        shown = _shown_value(err, secrets)
        if not (shown and path.endswith("].name")):  # the name itself is the bad value
            path = _with_account_name(path, account_names or {})
        variable = _env_source(err["loc"], environ) if environ is not None else None
        if variable is not None:
            path = f"{variable} (environment variable, {path})"
        # The message itself may quote a configured value (a target's name, a path).
        lines.append(mask_secrets(f"{path or '<config>'}: {msg}{shown}", secrets))
    return lines


def _password_env_names(data: object) -> set[str]:
    """Every ``password_env`` value in the raw TOML, at any depth."""
    match data:
        case dict():
            names = {
                v.upper() for k, v in data.items() if k == "password_env" and isinstance(v, str)
            }
            return names.union(*(_password_env_names(v) for v in data.values()))
        case list():
            return set().union(*(_password_env_names(v) for v in data))
        case _:
            return set()


def _unknown_env(exempt: set[str]) -> list[str]:
    # pydantic-settings ignores a prefixed variable that matches no field; a typo like
    # POP3_CONNECTOR_SMPT__HOST would be silently dropped, so report it like an unknown key.
    # Exempt: the config-path, event-loop and shard-count variables, and variables a
    # password_env names.
    fields = set(Settings.model_fields)
    problems = []
    for name in sorted(os.environ):
        upper = name.upper()
        if (
            not upper.startswith(ENV_PREFIX)
            or upper in (CONFIG_ENV, EVENT_LOOP_ENV, SHARDS_ENV)
            or upper in exempt
        ):
            continue
        top = name[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if top not in fields:
            problems.append(f"{name}: unknown setting (environment variable)")
    return problems


def load_settings(path: Path) -> Settings:
    """Read the TOML file at ``path``, apply ``POP3_CONNECTOR_*`` overrides, validate, resolve.

    Raises :class:`ConfigError` listing every problem found; no message contains a secret.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        # "utf-8-sig" drops one byte-order mark at the start, which Notepad writes (as for a
        # password_file); TOML 1.0 would take it for a syntax error at 1:1.
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files must be UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        # The message carries the line and column, never the text of the line.
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    unknown = _unknown_env(_password_env_names(data))
    token = _toml_data.set(data)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = format_validation_error(exc, _account_names(data), _secrets_in(data), os.environ)
        raise ConfigError(unknown + problems) from None
    except SettingsError as exc:
        # Bad JSON in a variable such as POP3_CONNECTOR_ACCOUNTS; the message names the field.
        raise ConfigError([*unknown, f"environment: {exc}"]) from None
    finally:
        _toml_data.reset(token)
    if unknown:
        raise ConfigError(unknown)
    return settings


_SECRET_SOURCES: Final = ("password", "password_file", "password_env")
_UNRESOLVED: Final = "unresolved"  # stands in for a secret that is not read


def _secrets_unresolved(data: object) -> object:
    """``data`` with each table's only secret source given as an inline placeholder, so that
    validating it reads no password file and no environment variable (see
    :func:`config_text_problems`)."""
    match data:
        case dict():
            out = {k: _secrets_unresolved(v) for k, v in data.items()}
            given = [k for k in _SECRET_SOURCES if out.get(k)]
            if given in (["password_file"], ["password_env"]):
                del out[given[0]]
                out["password"] = _UNRESOLVED
            return out
        case list():
            return [_secrets_unresolved(v) for v in data]
        case _:
            return data


def config_text_problems(text: str) -> list[str]:
    """What would stop ``text``, a config file's content, from loading: one line per problem,
    as :func:`load_settings` words it (key path first, no secret); empty when it loads.

    The same models decide, but nothing outside the text is read: a ``password_file`` need
    not exist yet, a ``password_env`` need not be set, and ``POP3_CONNECTOR_*`` variables do
    not apply.  For a config written by a program (``import-fetchmailrc``) before anyone fills
    in its secrets.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [f"TOML syntax error: {exc}"]
    try:
        Settings.model_validate(_secrets_unresolved(data))
    except ValidationError as exc:
        return format_validation_error(exc, _account_names(data), _known_secrets(data))
    return []


# --------------------------------------------------------------------------------------------
# Rendering and warnings (pop3-connector check)
# --------------------------------------------------------------------------------------------


def _is_duration(annotation: object) -> bool:
    """``Duration`` or ``Duration | None``: a key ``check`` shows as "15m", not seconds."""
    if annotation == Duration:
        return True
    return any(_is_duration(arg) for arg in typing.get_args(annotation) if arg is not None)


def _models(base: type[BaseModel]) -> Iterator[type[BaseModel]]:
    yield base
    for sub in base.__subclasses__():
        yield from _models(sub)


# Read from the models, so that a new duration key is shown as one without a list to keep.
_DURATION_KEYS: Final = frozenset(
    name
    for model in (*_models(_Model), Settings)
    for name, hint in typing.get_type_hints(model, include_extras=True).items()
    if _is_duration(hint)
)


def _toml_value(key: str, value: object) -> str:
    match value:
        case bool():
            return "true" if value else "false"
        case int():
            return str(value)
        case float() if key in _DURATION_KEYS:
            return _toml_value("", format_duration(value))
        case float():
            return repr(value)
        case str():
            return _toml_string(value)
        case Path():
            return _toml_string(str(value))
        case list():
            return "[" + ", ".join(_toml_value(key, v) for v in value) + "]"
        case _:
            raise TypeError(f"cannot render {key} as TOML")


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":  # TOML 1.0 §String: control characters must be escaped
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# Render order: identity first, then connection, then credentials, then the rest in model order.
_KEY_ORDER: Final = (
    "name",
    "store",
    "host",
    "port",
    "tls",
    "verify_certificate",
    "ca_file",
    "username",
    "password",
    "password_file",
    "password_env",
)


def _masked(value: object, secrets: Collection[str]) -> object:
    """``value`` with every string that holds a secret (:func:`holds_secret`) masked."""
    match value:
        case str() | Path() if holds_secret(str(value), secrets):
            return MASK
        case list():
            return [_masked(v, secrets) for v in value]
        case _:
            return value


def _table_lines(model: BaseModel, secrets: Collection[str] = ()) -> Iterator[str]:
    inline = isinstance(model, _Secretful) and not (model.password_file or model.password_env)
    fields = list(type(model).model_fields)
    keys = [k for k in _KEY_ORDER if k in fields] + [k for k in fields if k not in _KEY_ORDER]
    for key in keys:
        if isinstance(model, AccountConfig) and model.protocol == "pop3" and key in _IMAP_ONLY:
            continue  # not valid for a POP3 account, so not shown (the output loads again)
        value = getattr(model, key)
        if value is None or isinstance(value, BaseModel):
            continue  # a sub-table: render_settings writes it after the table's own keys
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            continue
        if isinstance(value, SecretStr):
            # Only an inline (or environment-override) password is shown, masked; one from a
            # file or variable is shown by its source, so the output loads again as it is.
            if inline:
                yield f"{key} = {_toml_string(MASK)}"
            continue
        # A password pasted into another key (host, username, deliver_to) is masked there too.
        yield f"{key} = {_toml_value(key, _masked(value, secrets))}"


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    """A TOML key: bare when it can be (TOML 1.0 §Keys), else a quoted string."""
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def render_settings(settings: Settings) -> str:
    """The effective configuration as TOML, defaults filled in and every secret masked."""
    secrets = configured_secrets(settings)
    lines = ["# pop3-connector: effective configuration (defaults filled in, secrets masked)"]
    for table in ("service", "metrics", "smtp", "dead_letter", "notices"):
        lines += ["", f"[{table}]", *_table_lines(getattr(settings, table), secrets)]
    for name, target in settings.smtp_targets.items():
        table_name = mask_secrets(_toml_key(name), secrets)
        lines += ["", f"[smtp_targets.{table_name}]", *_table_lines(target, secrets)]
    for account in settings.accounts:
        lines += ["", "[[accounts]]", *_table_lines(account, secrets)]
        if account.shared is not None:
            lines += ["", "[accounts.shared]", *_table_lines(account.shared, secrets)]
            for rule in account.shared.rules:
                lines += ["", "[[accounts.shared.rules]]", *_table_lines(rule, secrets)]
    return "\n".join(lines) + "\n"


def _inline_password_keys(path: Path) -> list[str]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return []
    keys = [f"{t}.password" for t in ("smtp", "dead_letter") if "password" in data.get(t, {})]
    targets = data.get("smtp_targets", {})
    if isinstance(targets, dict):
        keys += [
            f"smtp_targets.{_toml_key(name)}.password"
            for name, table in targets.items()
            if isinstance(table, dict) and "password" in table
        ]
    accounts = data.get("accounts", [])
    if isinstance(accounts, list):
        keys += [
            _with_account_name(f"accounts[{i}].password", _account_names(data))
            for i, a in enumerate(accounts)
            if isinstance(a, dict) and "password" in a
        ]
    return keys


def _group_or_world_readable(path: Path) -> int | None:
    """The permission bits if someone besides us may read or write ``path`` (POSIX only).

    Group access by our own group is fine: that is how a service user reads a secret owned by
    root (``root:pop3-connector``, mode 0640, deploy/README.md).
    """
    if os.name != "posix":
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    risky = 0o007 if st.st_gid in {os.getegid(), *os.getgroups()} and st.st_gid != 0 else 0o077
    return mode if mode & risky else None


def config_warnings(settings: Settings, path: Path) -> list[str]:
    """Risky but valid settings, for ``pop3-connector check``: one line each, key path first.

    Clear-text passwords towards a non-loopback host (docs/design.md §12), certificate checks turned
    off, a config file or password file that group or others can read while it holds a secret,
    and no enabled account.
    """
    warnings: list[str] = []
    endpoints: list[tuple[str, _Endpoint]] = [("smtp", settings.smtp)]
    endpoints += [(f"smtp_targets.{_toml_key(n)}", t) for n, t in settings.smtp_targets.items()]
    if isinstance(settings.dead_letter, ImapDeadLetter):
        endpoints.append(("dead_letter", settings.dead_letter))
    endpoints += [(account_key(i, a), a) for i, a in enumerate(settings.accounts)]
    for where, ep in endpoints:
        if ep.tls == "none" and ep.password is not None and not is_loopback(ep.host):
            warnings.append(f'{where}.tls: "none" sends the password in clear text to {ep.host}')
        if (
            isinstance(ep, AccountConfig)
            and ep.auth == "xoauth2"
            and ep.tls == "none"
            and not is_loopback(ep.host)
        ):
            # RFC 6750 §5.3: a bearer token must only travel over TLS; whoever reads it is
            # the mailbox owner until it expires.
            warnings.append(
                f'{where}.tls: "none" sends the OAuth2 access token in clear text to {ep.host}'
            )
        if ep.tls != "none" and not ep.verify_certificate:
            warnings.append(
                f"{where}.verify_certificate: false accepts any certificate from {ep.host} "
                "(anyone on the path can read the password and the mail)"
            )
        if ep.password_file is not None:
            mode = _group_or_world_readable(ep.password_file)
            if mode is not None:
                warnings.append(
                    f"{where}.password_file: {ep.password_file} is accessible to group or "
                    f"others (mode {mode:04o}); chmod 600 it"
                )
    inline = _inline_password_keys(path)
    mode = _group_or_world_readable(path)
    if inline and mode is not None:
        warnings.append(
            f"{inline[0]}: {path} holds a password and is accessible to group or others "
            f"(mode {mode:04o}); chmod 600 it, or use password_file / password_env"
        )
    if not any(a.enabled for a in settings.accounts):
        warnings.append("accounts: no account is enabled; run and once will do nothing")
    warnings += port_tls_warnings(settings) + poll_interval_warnings(settings, path)
    warnings += scale_warnings(settings)
    # The warnings quote hosts, names and paths, any of which may hold a pasted password.
    secrets = configured_secrets(settings)
    return [mask_secrets(w, secrets) for w in warnings]


def account_key(index: int, account: AccountConfig) -> str:
    """``accounts[4] (name "buchhaltung")``, as the config errors name an account."""
    return f"accounts[{index}] (name {_toml_string(account.name)})"


# Well-known ports and the TLS they speak: implicit TLS from the first byte (RFC 8314 §3.3:
# 995 POP3S, 465 submissions, 993 IMAPS), or plain text with an optional STARTTLS/STLS
# (RFC 1939 110, RFC 5321 25, RFC 6409 587, RFC 3501 143).
_IMPLICIT_PORTS: Final = {"pop3": 995, "smtp": 465, "imap": 993}
_PLAIN_PORTS: Final = {"pop3": (110,), "smtp": (25, 587), "imap": (143,)}


def port_tls_warnings(settings: Settings) -> list[str]:
    """A well-known port set with the other kind of TLS: ``port = 110`` with the default
    ``tls = "implicit"`` fails every handshake ("wrong version number"), ``port = 995`` with
    ``tls = "starttls"`` waits for a greeting that never comes in clear text."""
    endpoints: list[tuple[str, str, _Endpoint]] = [("smtp", "smtp", settings.smtp)]
    endpoints += [
        (f"smtp_targets.{_toml_key(n)}", "smtp", t) for n, t in settings.smtp_targets.items()
    ]
    if isinstance(settings.dead_letter, ImapDeadLetter):
        endpoints.append(("dead_letter", "imap", settings.dead_letter))
    endpoints += [(account_key(i, a), a.protocol, a) for i, a in enumerate(settings.accounts)]
    warnings = []
    for where, protocol, ep in endpoints:
        implicit_port = _IMPLICIT_PORTS[protocol]
        if ep.tls == "implicit" and ep.port in _PLAIN_PORTS[protocol]:
            # The IMAP store has no STARTTLS (aioimaplib): plain IMAP is "none" there.
            other = "none" if isinstance(ep, ImapDeadLetter) else "starttls"
            default = "" if "tls" in ep.model_fields_set else " (the default: tls is not set)"
            warnings.append(
                f"{where}.port: {ep.port} speaks plain text (STARTTLS at most), but tls = "
                f'"implicit"{default} starts with a TLS handshake; use port {implicit_port}, '
                f'or tls = "{other}"'
            )
        elif ep.tls != "implicit" and ep.port == implicit_port:
            warnings.append(
                f"{where}.port: {ep.port} expects a TLS handshake first (implicit TLS), but "
                f'tls = "{ep.tls}" waits for a greeting in plain text; use tls = "implicit"'
            )
    return warnings


# RFC 2449 §6.8 LOGIN-DELAY: a server may ask for minutes between logins; and ``15`` is
# seconds, where the SBS schedule said minutes.
_MIN_SENSIBLE_POLL: Final = 60.0


def _with_unit(path: Path | None) -> set[str]:
    """Where ``poll_interval`` is written with a unit (``"10s"``): ``"service"`` and
    ``"accounts[i]"``, read from the file at ``path`` and the environment's override."""

    def has_unit(value: object) -> bool:
        return isinstance(value, str) and re.fullmatch(_NUMBER, value.strip()) is None

    found: set[str] = set()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig")) if path else {}
    except (OSError, ValueError):
        data = {}
    service = data.get("service")
    if isinstance(service, dict) and has_unit(service.get("poll_interval")):
        found.add("service")
    env = {n.upper(): v for n, v in os.environ.items()}
    override = env.get(ENV_PREFIX + "SERVICE__POLL_INTERVAL")
    if override is not None:
        found.discard("service")
        if has_unit(override):
            found.add("service")
    accounts = data.get("accounts")
    if isinstance(accounts, list):
        found |= {
            f"accounts[{i}]"
            for i, a in enumerate(accounts)
            if isinstance(a, dict) and has_unit(a.get("poll_interval"))
        }
    return found


def poll_interval_warnings(settings: Settings, path: Path | None = None) -> list[str]:
    """A poll interval under a minute: most likely minutes written as a bare number, which is
    seconds (``poll_interval = 15``).  For ``check`` and the log when ``run`` starts.  With the
    config file's ``path``, an interval written with its unit (``"10s"``) gets no hint at
    minutes: it says what it means."""
    warnings = []
    with_unit = _with_unit(path)

    def warn(where: str, key: str, seconds: float) -> None:
        hint = f'; a bare number is seconds: for {seconds:g} minutes write "{seconds:g}m"'
        warnings.append(
            f"{where}.poll_interval: {seconds:g} s, a login every {seconds:g} seconds"
            f"{'' if key in with_unit else hint}.  Providers may lock or refuse a mailbox "
            "polled this often (RFC 2449 LOGIN-DELAY)"
        )

    service = settings.service.poll_interval
    if service < _MIN_SENSIBLE_POLL:
        warn("service", "service", service)
    for i, account in enumerate(settings.accounts):
        interval = settings.poll_interval_of(account)
        if interval < _MIN_SENSIBLE_POLL and interval != service:
            warn(account_key(i, account), f"accounts[{i}]", interval)
    return warnings


# Above this many accounts the per-account series (some 30 each) make a scrape of megabytes
# that takes most of a second to render (bench/README.md, "fleet").
PER_ACCOUNT_SERIES_ADVICE: Final = 1000


def scale_warnings(settings: Settings) -> list[str]:
    """Per-account metrics for more accounts than a Prometheus should scrape one by one.  For
    ``check`` and the log when ``run`` starts."""
    enabled = sum(1 for a in settings.accounts if a.enabled)
    if settings.metrics.per_account and enabled > PER_ACCOUNT_SERIES_ADVICE:
        return [
            f"metrics.per_account: true with {enabled} accounts exports some {enabled * 30:,} "
            'series per scrape; set it to false for the totals (README: "Many accounts")'
        ]
    return []
