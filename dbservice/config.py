"""The daemon's settings, each declared once, and where an operator sets them.

Each setting is a field of :class:`Settings` carrying what everything else
derives from it: its type and default, its help and metavar for the
command line, the values it may take, and whether a reload applies it. The
CLI's options, the TOML file's keys and their checks, and what ``reload``
changes all come from these fields.

A setting comes from the first place that has it: a command-line flag, a
``DBSERVICE_<NAME>`` environment variable (the CLI reads both), the TOML config
file (``--config``), then the defaults here.
"""

import dataclasses
import importlib.util
import logging
import os
import sys
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # as the dependency on tomli says
    import tomli as tomllib

import psycopg2
from psycopg2.extensions import parse_dsn

from .health import mask_dsn
from .session import AUTO, SESSION_RESETS
from .supply import check_sizes

#: The state directory when none is given: socket, secret, pidfile, log,
#: and the embedded cluster unless we are root (see embedded.default_cluster_dir).
DEFAULT_STATE_DIR = os.path.join("~", ".local", "state", "dbservice")
SOCKET_NAME = "dbservice.sock"
SECRET_NAME = "secret"
PIDFILE_NAME = "dbserviced.pid"
LOG_NAME = "dbserviced.log"

logger = logging.getLogger("dbservice.config")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SELECTORS = ("auto", "epoll", "select", "uvloop")


def default_state_dir() -> str:
    return os.path.expanduser(os.environ.get("DBSERVICE_HOME") or DEFAULT_STATE_DIR)


class ConfigError(ValueError):
    """A setting has a value the daemon cannot run with; the message says which and why."""


_T = TypeVar("_T")


def setting(
    default: _T, metavar: str, help: str, reloadable: bool = False, choices: Sequence[str] = (),
    daemon_default: Any = dataclasses.MISSING, flag: Optional[str] = None,
) -> _T:
    """A field of Settings that an operator sets: its default and what the CLI says of it.

    *daemon_default* is the daemon's own default where it differs from the
    engine's (which DBService runs with). *flag* is the option's name where
    it is not the field's (``--replica`` for ``replicas``, given once per DSN).
    """
    metadata: Dict[str, Any] = {
        "metavar": metavar, "help": help, "reloadable": reloadable, "choices": choices, "flag": flag,
    }
    if daemon_default is not dataclasses.MISSING:
        metadata["daemon_default"] = daemon_default
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class Settings:
    """Everything the engine needs to run; the daemon's CLI fills it in.

    The fields declared with :func:`setting` are the operator's; ``socket``
    and ``authkey`` come from the state directory, or from DBService.
    """

    dsn: Optional[str] = setting(
        None, "DSN",
        "the PostgreSQL to serve, as a libpq connection string or URI. Without one the daemon runs "
        "its own PostgreSQL cluster (see --cluster-dir).",
    )
    min_size: int = setting(2, "N", "connections the pool keeps open, at most --max-size", reloadable=True)
    max_size: int = setting(10, "N", "connections the pool opens at most", reloadable=True)
    max_idle: float = setting(
        300.0, "SECONDS", "how long a connection above --min-size may stay idle", reloadable=True
    )
    max_lifetime: float = setting(
        3600.0, "SECONDS",
        "how long a connection may live: past it (0-5% sooner for each, so that they do not all go at once) "
        "it is closed when next idle and replaced; this bounds a backend's memory and lets a failover or a "
        "DNS change reach the pool. 0: no limit. A reload applies to connections opened after it",
        reloadable=True,
    )
    pool_timeout: float = setting(
        30.0, "SECONDS", "how long a job without a timeout may wait for a free connection", reloadable=True
    )
    connect_timeout: float = setting(
        10.0, "SECONDS", "how long opening one connection to PostgreSQL may take", reloadable=True
    )
    max_queue: int = setting(
        10000, "N", "jobs waiting for a connection at most; more are refused as busy at once"
    )
    max_clients: int = setting(2048, "N", "socket clients connected at once; more are refused as busy")
    max_client_jobs: int = setting(
        1024, "N", "jobs of one client connection in the daemon at once; its further jobs wait, unread"
    )
    max_client_buffer: int = setting(
        16 * 1024 * 1024, "BYTES",
        "replies waiting for one client beyond which it is backed up: none of its jobs is read and none "
        "reads more of its result until it reads its replies",
    )
    client_stall_timeout: float = setting(
        30.0, "SECONDS", "how long a backed-up client may read nothing before it is dropped"
    )
    max_frame: int = setting(
        32 * 1024 * 1024, "BYTES", "the largest job a client may send, once pickled; a larger one is refused"
    )
    max_params_size: Optional[int] = setting(
        None, "BYTES",
        "what a job's parameters may cost once bound: 64 per value plus the length of each string and "
        "bytes, a shared reference counted each time it is used; more is refused [default: --max-frame]",
    )
    max_prepared: int = setting(
        256, "N",
        "statements each pooled connection keeps prepared on the server, so that it does not parse and plan "
        "them again (the least recently used are deallocated); 0 prepares none",
    )
    max_result_bytes: int = setting(
        256 * 1024 * 1024, "BYTES", "the largest result sent back; a larger one is an error for that job"
    )
    max_copies: int = setting(
        4, "N", "COPYs running at once at most, each holding a pooled connection; more are refused as busy"
    )
    idle_in_transaction_timeout: float = setting(
        60.0, "SECONDS", "how long a client's transaction may sit idle before it is rolled back"
    )
    stop_timeout: float = setting(
        30.0, "SECONDS", "how long a graceful stop lets queued and running jobs finish", reloadable=True
    )
    slow_ms: float = setting(
        1000.0, "MS", "log every job slower than this, queueing included; 0 logs none", reloadable=True
    )
    session_reset: str = setting(
        AUTO, "WHEN",
        "when a connection's session is reset (DISCARD ALL) before it serves another job: auto, after a job "
        "whose SQL may change it (SET, temporary tables, PREPARE, LISTEN, advisory locks...); always, after "
        "every job, for functions that change session state",
        reloadable=True, choices=SESSION_RESETS,
    )
    log_level: str = setting(
        "WARNING", "LEVEL", "DEBUG, INFO, WARNING or ERROR", reloadable=True, choices=LOG_LEVELS,
        daemon_default="INFO",
    )
    selector: str = setting(
        "auto", "LOOP",
        "the event loop: auto (uvloop where it is installed, else epoll on Linux), epoll, select, or uvloop, "
        "which costs the daemon about a quarter less CPU per job than epoll (pip install 'dbservice[uvloop]')",
        choices=SELECTORS,
    )
    metrics: Optional[str] = setting(
        None, "HOST:PORT",
        "serve Prometheus metrics at http://HOST:PORT/metrics (127.0.0.1:9188; port 0: any free one, which "
        "status shows); needs pip install 'dbservice[metrics]' [default: off]",
    )
    cluster_dir: Optional[str] = setting(
        None, "DIR",
        "where the embedded PostgreSQL keeps its data [default: STATE_DIR/postgresql; as root, "
        "where the postgres user can reach it: /var/lib/dbservice/postgresql-HASH]",
    )
    unread_reply_timeout: float = setting(
        10.0, "SECONDS",
        "how long a reply may go unread by a client of the multiprocessing queue (a stopped or stalled "
        "process) before its reply channel is dropped and its jobs cancelled",
    )
    replicas: Tuple[str, ...] = setting(
        (), "DSN",
        "a streaming replica of the database, which serves reads; give it once per replica "
        "(in the config file: replicas = [\"DSN\", ...])",
        flag="replica",
    )
    embedded_replicas: int = setting(
        0, "N",
        "without --dsn: run N streaming standbys of the embedded PostgreSQL (pg_basebackup), which serve reads",
        flag="replicas",
    )
    max_replica_lag: float = setting(
        10.0, "SECONDS", "a replica that has not replayed what the primary wrote this long ago gets no reads"
    )
    auth_timeout: float = 10.0  # seconds a new socket client has to authenticate
    #: the postmaster pid of each embedded cluster, by its DSN, for status
    embedded_pids: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: the Unix socket to serve on; None serves the multiprocessing queue instead
    socket: Optional[str] = None
    authkey: Optional[bytes] = None

    def __post_init__(self) -> None:
        check(self)
        if self.max_params_size is None:
            self.max_params_size = self.max_frame

    def __repr__(self) -> str:
        """Every field, but the DSN's password and the authkey masked: a repr ends up in logs and tracebacks."""
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "dsn" and value is not None:
                text = repr(mask_dsn(value))
            elif field.name == "authkey" and value is not None:
                text = "***"
            else:
                text = repr(value)
            shown.append("%s=%s" % (field.name, text))
        return "Settings(%s)" % ", ".join(shown)


def operator_settings() -> "List[dataclasses.Field[Any]]":
    """The fields of Settings an operator sets, in the order the CLI shows them."""
    return [field for field in dataclasses.fields(Settings) if "help" in field.metadata]


def reloadable_settings() -> Tuple[str, ...]:
    """The names of the settings a reload applies while jobs flow; the others need a restart."""
    return tuple(field.name for field in operator_settings() if field.metadata["reloadable"])


def reloaded(old: Settings, new: Settings) -> Settings:
    """*old* with *new*'s reloadable settings; a warning names each other one that changed."""
    reloadable = reloadable_settings()
    for field in dataclasses.fields(new):
        if field.name not in reloadable and getattr(new, field.name) != getattr(old, field.name):
            logger.warning("%s changed in the configuration; restart the daemon to apply it", field.name)
    return dataclasses.replace(old, **{name: getattr(new, name) for name in reloadable})


def is_list(field: "dataclasses.Field[Any]") -> bool:
    """True for a setting that holds several values (Tuple[str, ...]): given once per value."""
    return typing.get_origin(field.type) is tuple


def value_type(field: "dataclasses.Field[Any]") -> type:
    """int, float or str: the type of a setting's value (of each value of a list), Optional[...] or not.

    A type, not the string of one, since this module's annotations are
    evaluated (it has no ``from __future__ import annotations``): the CLI's
    options and the config file's checks take their types from them.
    """
    kinds = [kind for kind in typing.get_args(field.type) if kind is not type(None)]
    return typing.cast(type, kinds[0] if kinds else field.type)


def daemon_default(field: "dataclasses.Field[Any]") -> Any:
    return field.metadata.get("daemon_default", field.default)


def check(settings: Settings) -> None:
    """Raise ConfigError, saying what is wrong, unless *settings* can run; fold the log level to capitals."""
    for field in operator_settings():
        value = getattr(settings, field.name)
        if value is None:
            continue
        if value_type(field) is not str and not is_list(field) and value < 0:
            raise ConfigError("%s must not be negative, got %r" % (field.name, value))
        choices = field.metadata["choices"]
        if choices and str(value).upper() not in [choice.upper() for choice in choices]:
            raise ConfigError("%s must be one of %s, got %r" % (field.name, ", ".join(choices), value))
    settings.log_level = settings.log_level.upper()
    try:
        check_sizes(settings.min_size, settings.max_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for dsn in (settings.dsn, *settings.replicas):
        if dsn is not None:
            check_dsn(dsn)
    if settings.embedded_replicas and settings.dsn is not None:
        raise ConfigError(
            "embedded_replicas (--replicas N) runs standbys of the embedded PostgreSQL, and a DSN is given: "
            "name the DSN's replicas with --replica DSN instead"
        )
    if settings.metrics is not None:
        check_metrics(settings.metrics)


class StateDir:
    """Where a daemon keeps its files; every command finds the daemon through it."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = os.path.abspath(os.path.expanduser(path or default_state_dir()))
        self.socket = os.path.join(self.path, SOCKET_NAME)
        self.secret = os.path.join(self.path, SECRET_NAME)
        self.pidfile = os.path.join(self.path, PIDFILE_NAME)
        self.log = os.path.join(self.path, LOG_NAME)


def load_config(given: Mapping[str, Any], path: Optional[str] = None) -> Settings:
    """The daemon's Settings: *given* (flags and environment) over the file at *path* over the defaults.

    Values of None in *given* were not given. Raises ConfigError.
    """
    values = {field.name: daemon_default(field) for field in operator_settings()}
    if path:
        values.update(read_config_file(path))
    values.update({name: value for name, value in given.items() if value is not None and value != ()})
    if given.get("min_size") is None and values["min_size"] == Settings.min_size:
        values["min_size"] = min(values["min_size"], values["max_size"])  # max_size = 1 alone is fine
    if values["cluster_dir"]:
        values["cluster_dir"] = os.path.abspath(values["cluster_dir"])
    return Settings(**values)


def read_config_file(path: str) -> Dict[str, Any]:
    """The settings in the TOML file at *path*; ConfigError if it cannot be used."""
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("cannot read the config file %s: %s" % (path, exc.strerror)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("the config file %s is not valid TOML: %s" % (path, exc)) from None
    fields = {field.name: field for field in operator_settings()}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(
                "the config file %s sets %r, which is no setting; the settings are: %s"
                % (path, name, ", ".join(fields))
            )
        kind = value_type(fields[name])
        if is_list(fields[name]):
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ConfigError("the config file %s sets %s = %r; it must be a list of strings" % (path, name, value))
            values[name] = tuple(value)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ConfigError(
                "the config file %s sets %s = %r; it must be %s"
                % (path, name, value, {int: "an integer", float: "a number", str: "a string"}[kind])
            )
    return values


def check_dsn(dsn: str) -> None:
    """Raise ConfigError, with libpq's reason, unless *dsn* parses as a connection string."""
    try:
        parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise ConfigError(
            "the DSN does not parse (%s); give a libpq connection string (host=db dbname=app user=app) "
            "or a URI (postgresql://app@db/app)" % " ".join(str(exc).split())
        ) from None


def parse_address(address: str) -> Tuple[str, int]:
    """``(host, port)`` of *address*, ``HOST:PORT`` or ``[IPv6]:PORT``; ConfigError unless it is one."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            "metrics must be HOST:PORT, such as 127.0.0.1:9188 (0.0.0.0:9188 for every interface), got %r" % address
        )
    return host, int(port)


def check_metrics(address: str) -> None:
    """ConfigError unless *address* parses and the metrics' library is installed."""
    parse_address(address)
    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(
            "--metrics needs the prometheus_client library: pip install 'dbservice[metrics]'"
        )
