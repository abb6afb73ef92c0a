"""The configuration turned into the values the code below the composition root takes.

:func:`build_runtime` reads :class:`connector.config.Settings` once (at start and at each
reload, docs/design.md §4.3) and builds frozen values: an :class:`~connector.cycle.AccountSpec`
per account, the SMTP settings and delivery policy, where the dead letters go
(:func:`open_store`), the notices, the SMTP targets.  Only this module, ``service`` and ``cli``
read ``Settings`` (docs/design.md §2).  Every value compares by its contents, so a reload can tell
what changed.  :func:`owned_by` narrows a runtime to the accounts of one shard (``--shard``).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path

from connector.config import (
    DEFAULT_TARGET,
    ImapDeadLetter,
    Settings,
    SharedConfig,
    account_key,
    configured_secrets,
    dead_letter_path,
    mask_secrets,
)
from connector.cycle import AccountSpec, DeliveryPolicy, Oversize, SmtpTarget
from connector.deadletter import DeadLetterArchive
from connector.deadletter.maildir import MaildirStore
from connector.errors import ConfigError
from connector.imap import ImapAuth, ImapOptions
from connector.notices import NoticeSettings
from connector.oauth2 import OAuth2TokenSource
from connector.pop3 import AuthMethod, Pop3Endpoint
from connector.recipients import Rule, SharedMailbox
from connector.shard import ALL, Shard
from connector.smtp import SenderPolicy, SmtpSettings
from connector.tls import TlsMode, make_ssl_context


def secret_env_names(settings: Settings) -> frozenset[str]:
    """Every variable a ``password_env`` names (accounts, ``[smtp]`` and the other SMTP targets,
    ``[dead_letter]``), in upper case."""
    models: list[object] = [*settings.accounts, settings.smtp, settings.dead_letter]
    models += settings.smtp_targets.values()
    names = (getattr(m, "password_env", None) for m in models)
    return frozenset(n.upper() for n in names if isinstance(n, str))


@dataclass(frozen=True, slots=True)
class ImapStoreSpec:
    """Where the IMAP dead-letter store appends (``[dead_letter] store = "imap"``)."""

    host: str
    port: int
    tls: TlsMode
    ssl_context: ssl.SSLContext | None = field(compare=False)
    username: str
    password: str = field(repr=False)
    folder: str
    # What ssl_context was built from, compared in its place (a reload rebuilds the context).
    verify_certificate: bool = True
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Runtime:
    """The config, turned into what the code below the composition root takes."""

    accounts: tuple[AccountSpec, ...]
    intervals: dict[str, float]
    # The default target ([smtp]): notices go there, and an account without `smtp`.
    smtp: SmtpSettings
    policy: DeliveryPolicy
    state_dir: Path
    dead_letter_path: Path | None  # the Maildir store; None with the IMAP store
    max_parallel: int
    shutdown_grace: float
    transcripts: bool
    imap_store: ImapStoreSpec | None = None
    notices: NoticeSettings | None = None  # None: [notices] postmaster not set
    # [service] spool_threshold and the memory budget (docs/design.md §5.3, §10.6); the
    # defaults are the config's for max_parallel_accounts = 8.
    spool_threshold: int = 2 * 1024 * 1024
    memory_budget: int = 32 * 1024 * 1024
    # Accounts with enabled = false, built only for `check --connect` (build_runtime's
    # include_disabled): never polled.
    disabled: tuple[AccountSpec, ...] = ()
    # POP3 sessions at once on one host ([service] max_sessions_per_host; schedule.host_key).
    per_host: int = 2
    # Every SMTP target by name, "default" ([smtp]) first, then [smtp_targets] in config order;
    # and the name of the target of every account of the config, enabled or not (the disabled
    # ones' dead letters and ledger rows are theirs too; no spec is built for them).
    targets: dict[str, SmtpTarget] = field(default_factory=dict)
    target_names: dict[str, str] = field(default_factory=dict)
    # The deliver_to of every account of the config, enabled or not, whichever shard owns it
    # (requeue sends a disabled account's dead letters there: it is configured, only not
    # polled); and the names of those with enabled = false (status: no next poll).
    deliver_to: dict[str, tuple[str, ...]] = field(default_factory=dict)
    disabled_names: frozenset[str] = frozenset()
    # The accounts of this process (--shard, owned_by): the others of the config are
    # `elsewhere`, polled by other replicas.
    shard: Shard = ALL
    elsewhere: tuple[str, ...] = ()

    def account_targets(self) -> dict[str, SmtpTarget]:
        """The SMTP target of each account of the config, by account name (an account it
        does not have, such as one removed from the config, goes to :attr:`default_target`)."""
        default = self.default_target
        found = {name: self.targets.get(t, default) for name, t in self.target_names.items()}
        found.update(
            (s.name, s.smtp if s.smtp is not None else default)
            for s in (*self.accounts, *self.disabled)
        )
        return found

    @property
    def default_target(self) -> SmtpTarget:
        """``[smtp]`` as a target."""
        return self.targets.get(DEFAULT_TARGET) or SmtpTarget(
            DEFAULT_TARGET, self.smtp, self.policy
        )

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def dead_letter_where(self) -> str:
        """The dead-letter store for humans: a path, or imap://user@host:port/folder."""
        if self.imap_store is not None:
            s = self.imap_store
            return f"imap://{s.username}@{s.host}:{s.port}/{s.folder}"
        return str(self.dead_letter_path)


def open_store(runtime: Runtime) -> DeadLetterArchive:
    """The configured dead-letter store: the Maildir (default) or an IMAP folder."""
    spec = runtime.imap_store
    if spec is not None:
        from connector.deadletter.imap import ImapStore  # here: aioimaplib costs start-up time

        return ImapStore(
            spec.host,
            spec.port,
            spec.tls,
            spec.ssl_context,
            spec.username,
            spec.password,
            spec.folder,
        )
    if runtime.dead_letter_path is None:  # build_runtime sets one or the other
        raise ConfigError("dead_letter: neither a Maildir path nor an IMAP store is configured")
    return MaildirStore(runtime.dead_letter_path)


def shared_mailbox(config: SharedConfig, username: str = "") -> SharedMailbox:
    """``[accounts.shared]`` as the router's plain values; ``username`` (the POP3 login), when
    it is an address, is the catch-all's own and never a recipient."""
    ignore = {a.lower() for a in config.ignore_addresses}
    if "@" in username:
        ignore.add(username.lower())
    return SharedMailbox(
        domains=frozenset(config.domains),
        envelope_headers=tuple(config.envelope_headers),
        header_recipients=config.header_recipients,
        rules=tuple(Rule(r.match, tuple(r.deliver_to)) for r in config.rules),
        rewrite_domain=config.rewrite_domain,
        duplicate_window=config.duplicate_window if config.suppress_duplicates else 0.0,
        ignore=frozenset(ignore),
    )


def build_runtime(settings: Settings, *, include_disabled: bool = False) -> Runtime:
    """Turn validated settings into runtime objects; raises ConfigError (e.g. a bad ca_file).

    ``include_disabled`` also builds the accounts with ``enabled = false`` (``disabled``), for
    ``check --connect``; otherwise they are skipped, so a disabled account's bad ``ca_file``
    never stops the service.  The errors' text never holds a configured password (a path or
    a host may be one pasted into the wrong key).
    """
    try:
        return _build_runtime(settings, include_disabled)
    except ConfigError as exc:
        secrets = configured_secrets(settings)
        raise ConfigError([mask_secrets(p, secrets) for p in exc.problems]) from None


def _build_runtime(settings: Settings, include_disabled: bool) -> Runtime:
    contexts = _Contexts()
    targets = {DEFAULT_TARGET: _target(settings, DEFAULT_TARGET, contexts)}
    targets.update((name, _target(settings, name, contexts)) for name in settings.smtp_targets)
    smtp, policy = targets[DEFAULT_TARGET].settings, targets[DEFAULT_TARGET].policy
    accounts: list[AccountSpec] = []
    disabled: list[AccountSpec] = []
    intervals: dict[str, float] = {}
    for i, acct in enumerate(settings.accounts):
        if not acct.enabled and not include_disabled:
            continue
        spec = _account(settings, i, targets[settings.target_of(acct)], contexts)
        (accounts if acct.enabled else disabled).append(spec)
        if acct.enabled:
            intervals[acct.name] = settings.poll_interval_of(acct)
    notices = settings.notices
    return Runtime(
        accounts=tuple(accounts),
        intervals=intervals,
        smtp=smtp,
        policy=policy,
        state_dir=settings.service.state_dir,
        dead_letter_path=dead_letter_path(settings),
        max_parallel=settings.service.max_parallel_accounts,
        per_host=settings.service.max_sessions_per_host,
        shutdown_grace=settings.service.shutdown_grace,
        transcripts=settings.service.log_level == "debug",
        imap_store=_imap_store(settings, contexts),
        spool_threshold=settings.service.spool_threshold,
        memory_budget=settings.service.memory_budget(),
        disabled=tuple(disabled),
        targets=targets,
        target_names={a.name: settings.target_of(a) for a in settings.accounts},
        deliver_to={a.name: tuple(a.deliver_to) for a in settings.accounts},
        disabled_names=frozenset(a.name for a in settings.accounts if not a.enabled),
        notices=None
        if notices.postmaster is None
        else NoticeSettings(
            postmaster=notices.postmaster,
            min_interval=notices.min_interval,
            on_dead_letter=notices.on_dead_letter,
            on_account_failing=notices.on_account_failing,
        ),
    )


class _Contexts:
    """The client TLS contexts of one build, one per distinct (``verify_certificate``,
    ``ca_file``): a context holds no per-connection state and is shared safely by every
    connection, and each costs the system trust store loaded again (some 20 ms of CPU and
    800 KiB: per account, 10,000 POP3S accounts would take minutes and gigabytes to start,
    bench/README.md "fleet").  A reload builds a new set, so a changed CA file is read again."""

    def __init__(self) -> None:
        self._built: dict[tuple[bool, Path | None], ssl.SSLContext] = {}

    def get(
        self, tls: TlsMode, verify: bool, ca_file: Path | None, where: str
    ) -> ssl.SSLContext | None:
        """The context for ``tls`` (None without TLS); ``where`` names the config key of the
        first account that asks for it (a ``ca_file`` that cannot be loaded is its error)."""
        if tls is TlsMode.NONE:
            return None
        key = (verify, ca_file)
        ctx = self._built.get(key)
        if ctx is None:
            ctx = self._built[key] = make_ssl_context(verify, ca_file, where)
        return ctx


def _target(settings: Settings, name: str, contexts: _Contexts) -> SmtpTarget:
    """``[smtp]`` (``name`` "default") or ``[smtp_targets.<name>]``: the session's settings, with
    its own TLS context, and how messages go on the envelope."""
    smtp_cfg = settings.smtp_config(name)
    where = "smtp" if name == DEFAULT_TARGET else f"smtp_targets.{name}"
    smtp_tls = TlsMode(smtp_cfg.tls)
    helo = smtp_cfg.helo_name or socket.getfqdn()
    smtp = SmtpSettings(
        host=smtp_cfg.host,
        port=smtp_cfg.effective_port,
        tls=smtp_tls,
        ssl_context=contexts.get(smtp_tls, smtp_cfg.verify_certificate, smtp_cfg.ca_file, where),
        helo_name=helo,
        username=smtp_cfg.username,
        password=smtp_cfg.secret(),
        dsn=smtp_cfg.dsn,
        timeout=smtp_cfg.timeout,
        data_termination_timeout=smtp_cfg.data_termination_timeout,
        verify_certificate=smtp_cfg.verify_certificate,
        ca_file=smtp_cfg.ca_file,
    )
    match smtp_cfg.envelope_sender:
        case "return-path":
            policy = DeliveryPolicy(SenderPolicy.RETURN_PATH, None, helo)
        case "null":
            policy = DeliveryPolicy(SenderPolicy.NULL, None, helo)
        case address:
            policy = DeliveryPolicy(SenderPolicy.FIXED, address, helo)
    return SmtpTarget(name, smtp, policy)


def owned_by(runtime: Runtime, shard: Shard) -> Runtime:
    """``runtime`` with only the accounts ``shard`` owns (docs/design.md §14.2); the rest are
    named in ``elsewhere``.  Every target stays: ``check --connect`` tests them all."""
    if shard == ALL:
        return replace(runtime, shard=shard)
    mine = tuple(s for s in runtime.accounts if shard.owns(s.name))
    mine_disabled = tuple(s for s in runtime.disabled if shard.owns(s.name))
    others = tuple(s.name for s in (*runtime.accounts, *runtime.disabled) if not shard.owns(s.name))
    return replace(
        runtime,
        accounts=mine,
        disabled=mine_disabled,
        intervals={s.name: runtime.intervals[s.name] for s in mine},
        shard=shard,
        elsewhere=others,
    )


def _account(settings: Settings, i: int, target: SmtpTarget, contexts: _Contexts) -> AccountSpec:
    """``accounts[i]`` as the cycle takes it, delivering to ``target``."""
    acct = settings.accounts[i]
    where = account_key(i, acct)  # accounts[4] (name "buchhaltung"), as the config's errors
    tls = TlsMode(acct.tls)
    password: str | OAuth2TokenSource | None = acct.secret()
    if acct.auth == "xoauth2":
        # The config guarantees exactly one source (and no password) for XOAUTH2.
        argv = acct.oauth2_argv()
        password = OAuth2TokenSource(
            f"{where}.oauth2_token_{'command' if argv else 'file'}",
            file=acct.oauth2_token_file,
            argv=argv,
            secret_env=secret_env_names(settings),
        )
    if password is None:  # the config guarantees one; be explicit for the type checker
        raise ConfigError(f"{where}.password: no password given")
    imap: ImapOptions | None = None
    if acct.protocol == "imap":
        imap = ImapOptions(
            folder=acct.folder,
            auth=ImapAuth(acct.auth),
            push=acct.push,
            idle_renewal=acct.idle_renewal,
        )
    return AccountSpec(
        name=acct.name,
        endpoint=Pop3Endpoint(
            acct.host,
            acct.effective_port,
            tls,
            contexts.get(tls, acct.verify_certificate, acct.ca_file, where),
            acct.host,
            verify_certificate=acct.verify_certificate,
            ca_file=acct.ca_file,
        ),
        username=acct.username,
        password=password,
        # An IMAP account's login is in ``imap`` (its "login" is no POP3 method).
        auth=AuthMethod.AUTO if imap is not None else AuthMethod(acct.auth),
        deliver_to=tuple(acct.deliver_to),
        max_deferral=acct.max_deferral,
        max_message_size=acct.max_message_size,
        leave_on_server=acct.leave_on_server,
        delete_after=acct.delete_after,
        oversize=Oversize(acct.oversize),
        shared=None if acct.shared is None else shared_mailbox(acct.shared, acct.username),
        cycle_timeout=settings.service.cycle_timeout,
        imap=imap,
        smtp=target,
    )


def _imap_store(settings: Settings, contexts: _Contexts) -> ImapStoreSpec | None:
    """``[dead_letter] store = "imap"``, or None for the Maildir store."""
    dl = settings.dead_letter
    if not isinstance(dl, ImapDeadLetter):
        return None
    tls = TlsMode(dl.tls)
    return ImapStoreSpec(
        host=dl.host,
        port=dl.effective_port,
        tls=tls,
        ssl_context=contexts.get(tls, dl.verify_certificate, dl.ca_file, "dead_letter"),
        username=dl.username or "",
        password=dl.secret() or "",
        folder=dl.folder,
        verify_certificate=dl.verify_certificate,
        ca_file=dl.ca_file,
    )
