"""OAuth2 access tokens for SASL XOAUTH2 (``auth = "xoauth2"``), fetched anew at every login.

An account names a token file (re-read each time) or a command (run without a shell; its stdout
is the token), so that an external helper can refresh the token between sessions.  The command
runs in a session of its own with our secrets taken out of its environment, and is killed with
its whole process group when it takes longer than ``OAUTH2_COMMAND_TIMEOUT`` (docs/design.md
§10.1).  No error message contains the token (docs/design.md §12).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from connector.config import ENV_PREFIX
from connector.errors import ConfigError
from connector.sdnotify import NOTIFY_VARIABLES

# How long an oauth2_token_command may take to print a token; a helper that refreshes the token
# makes one HTTPS round trip to the identity provider, which should take seconds.
OAUTH2_COMMAND_TIMEOUT = 30.0
# RFC 6750 §2.1 b64token: the characters a Bearer token may consist of.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True, slots=True)
class OAuth2TokenSource:
    """An account's OAuth2 access token for SASL XOAUTH2, fetched anew at every login.

    From ``file`` (re-read each time) or by running ``argv`` (no shell; its stdout is the
    token), so that an external helper can refresh the token between sessions.  ``key`` names
    the config key in error messages.  Comparable, so a reload that changes nothing keeps the
    account as it is.  Failures raise :class:`ConfigError`; no message contains the token.
    """

    key: str
    file: Path | None = None
    argv: tuple[str, ...] | None = None
    timeout: float = OAUTH2_COMMAND_TIMEOUT
    # Variables the command must not inherit (see child_environment); names, not secrets.
    secret_env: frozenset[str] = field(default=frozenset(), repr=False)

    async def __call__(self) -> str:
        """The current access token; raises ConfigError when it cannot be had."""
        if self.file is not None:
            text = await asyncio.to_thread(self._read, self.file)
        elif self.argv is not None:
            text = await self._run(self.argv)
        else:  # pragma: no cover (build_runtime sets one)
            raise ConfigError(f"{self.key}: no token file or command")
        token = text.strip()
        if not token:
            raise ConfigError(f"{self.key}: no access token (empty output)")
        if not _BEARER_TOKEN.fullmatch(token):
            # RFC 6750 §2.1; also keeps a multi-line or chatty output out of the AUTH line.
            raise ConfigError(f"{self.key}: the output is not a single OAuth2 access token")
        return token

    def _read(self, path: Path) -> str:
        try:
            # "utf-8-sig": a byte-order mark (Windows editors, PowerShell 5.1) is not the token's.
            return path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigError(f"{self.key}: cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{self.key}: {path} is not UTF-8 text") from None

    async def _run(self, argv: tuple[str, ...]) -> str:
        # No shell (argv from shlex.split); stderr is left to the service's own log.  A session
        # (so a process group) of its own: a helper may fork (a refresher, or `sh -c '... &'`),
        # and a descendant that inherited stdout keeps the pipe open after the helper is gone.
        # Killing the helper alone would leave that descendant running and, on the stock loop,
        # Process.wait() waiting for the pipe to close, for ever.
        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=child_environment(os.environ, self.secret_env),
            )
        )
        try:
            # Shielded: cancelled while the helper starts, the loop would kill the helper alone
            # (or nothing), and we would never learn the group to end.
            proc = await asyncio.shield(spawn)
        except OSError as exc:
            raise ConfigError(f"{self.key}: cannot run {argv[0]}: {exc.strerror or exc}") from None
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):  # it did not start: nothing to end
                await _end_group(await spawn)
            raise
        finished = False
        try:
            async with asyncio.timeout(self.timeout):
                out, _ = await proc.communicate()
            finished = True
        except TimeoutError:
            raise ConfigError(
                f"{self.key}: no token within {self.timeout:g}s; the command was killed"
            ) from None
        finally:
            if not finished:  # timed out or cancelled: leave nothing of it running
                await _end_group(proc)
        if proc.returncode != 0:
            raise ConfigError(f"{self.key}: the command exited with status {proc.returncode}")
        try:
            return out.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{self.key}: the output is not UTF-8 text") from None


def child_environment(environ: Mapping[str, str], secret_env: frozenset[str]) -> dict[str, str]:
    """``environ`` for a helper we run (``oauth2_token_command``), without our secrets.

    Dropped: every variable a ``password_env`` names (``secret_env``, upper case: another
    account's password is none of the helper's business) and every ``POP3_CONNECTOR_*``
    variable (our settings overrides, ``POP3_CONNECTOR_SMTP__PASSWORD`` among them), and
    systemd's notification socket and watchdog variables.  The rest
    (PATH, HOME, proxies, the helper's own variables) stays: the helper may need it.
    """
    return {
        name: value
        for name, value in environ.items()
        if name.upper() not in secret_env
        and not name.upper().startswith(ENV_PREFIX)
        and name not in NOTIFY_VARIABLES  # sd_notify(3): systemd's messages are ours to send
    }


async def _end_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL every process in ``proc``'s group (it leads one), then reap ``proc``.

    A group already gone is no error.  Even once the leader has exited (or been reaped), its id
    stays the group's while any member lives, and the kernel gives that id to no new process
    meanwhile.  Reaping reads what is left of stdout (discarded) to its EOF, which comes now
    that every writer is dead: uvloop's wait() does not wait for the pipe, whose transport
    would otherwise stay open.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.communicate()
