"""The daemon's settings: their defaults, and where an operator sets them.

A setting comes from the first place that has it: a command-line flag, a
``DBSERVICE_<NAME>`` environment variable (the CLI reads both), the TOML config
file (``--config``), then the defaults here.
"""

import dataclasses
import os
from typing import Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from .pool import check_sizes

#: The state directory when none is given: socket, secret, pidfile, log,
#: and the embedded cluster unless we are root (see embedded.default_cluster_dir).
DEFAULT_STATE_DIR = os.path.join("~", ".local", "state", "dbservice")
SOCKET_NAME = "dbservice.sock"
SECRET_NAME = "secret"
PIDFILE_NAME = "dbserviced.pid"
LOG_NAME = "dbserviced.log"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_state_dir():
    return os.path.expanduser(os.environ.get("DBSERVICE_HOME") or DEFAULT_STATE_DIR)


@dataclasses.dataclass
class Settings:
    """Everything the engine needs to run; the daemon's CLI fills it in."""

    dsn: str
    min_size: int = 2
    max_size: int = 10
    #: seconds an idle connection above min_size stays open
    max_idle: float = 300.0
    #: seconds a job without a timeout may wait for a free connection
    pool_timeout: float = 30.0
    #: seconds to open one connection to PostgreSQL
    connect_timeout: float = 10.0
    #: Unix socket to serve on; None serves the multiprocessing queue instead
    socket: Optional[str] = None
    authkey: Optional[bytes] = None
    #: "auto", "epoll" or "select"
    selector: str = "auto"
    #: jobs queued at most before new ones are refused as busy
    max_queue: int = 10000
    #: bytes one job message may take, on the socket or the queue
    max_frame: int = 32 * 1024 * 1024
    #: socket clients connected at once; more are refused as busy
    max_clients: int = 2048
    #: bytes one job's pickled result may take; a larger one is an error
    max_result_bytes: int = 256 * 1024 * 1024
    #: seconds a new socket client has to authenticate
    auth_timeout: float = 10.0
    #: seconds a reply may go unread by a queue client (a stopped or stalled
    #: process) before its reply channel is dropped and its jobs cancelled
    unread_reply_timeout: float = 10.0
    #: seconds a graceful stop waits for queued and running jobs
    stop_timeout: float = 30.0
    #: seconds a client's transaction may sit idle before it is rolled back
    idle_in_transaction_timeout: float = 60.0
    #: jobs that take longer (milliseconds, queueing included) are logged; 0 logs none
    slow_ms: float = 1000.0
    log_level: str = "WARNING"

    def __post_init__(self):
        check_sizes(self.min_size, self.max_size)


class StateDir:
    """Where a daemon keeps its files; every command finds the daemon through it."""

    def __init__(self, path=None):
        self.path = os.path.abspath(os.path.expanduser(path or default_state_dir()))
        self.socket = os.path.join(self.path, SOCKET_NAME)
        self.secret = os.path.join(self.path, SECRET_NAME)
        self.pidfile = os.path.join(self.path, PIDFILE_NAME)
        self.log = os.path.join(self.path, LOG_NAME)


class ConfigError(ValueError):
    """A setting has a value the daemon cannot run with; the message says which and why."""


#: What an operator sets, with its type: these Settings fields, plus the
#: directory of the embedded cluster. No dsn means: run the embedded cluster.
OPERATOR_SETTINGS = {
    "dsn": str,
    "min_size": int,
    "max_size": int,
    "max_idle": float,
    "pool_timeout": float,
    "connect_timeout": float,
    "max_queue": int,
    "max_clients": int,
    "max_frame": int,
    "max_result_bytes": int,
    "idle_in_transaction_timeout": float,
    "selector": str,
    "stop_timeout": float,
    "slow_ms": float,
    "log_level": str,
    "cluster_dir": str,
}

#: The daemon's defaults where they differ from Settings': it logs its lifecycle.
_DAEMON_DEFAULTS = {"dsn": None, "cluster_dir": None, "log_level": "INFO"}


def defaults():
    """The operator settings' defaults, by name."""
    values = {f.name: f.default for f in dataclasses.fields(Settings) if f.name in OPERATOR_SETTINGS}
    values.update(_DAEMON_DEFAULTS)
    return values


def load_config(given, path=None):
    """The operator settings: *given* (flags and environment) over the file at *path* over the defaults.

    Values of None in *given* were not given. Raises ConfigError.
    """
    config = defaults()
    if path:
        config.update(read_config_file(path))
    config.update({name: value for name, value in given.items() if value is not None})
    if config["min_size"] == defaults()["min_size"]:
        config["min_size"] = min(config["min_size"], config["max_size"])  # max_size = 1 alone is fine
    return check_config(config)


def read_config_file(path):
    """The settings in the TOML file at *path*; ConfigError if it cannot be used."""
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("cannot read the config file %s: %s" % (path, exc.strerror)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("the config file %s is not valid TOML: %s" % (path, exc)) from None
    for name, value in values.items():
        kind = OPERATOR_SETTINGS.get(name)
        if kind is None:
            raise ConfigError(
                "the config file %s sets %r, which is no setting; the settings are: %s"
                % (path, name, ", ".join(OPERATOR_SETTINGS))
            )
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ConfigError(
                "the config file %s sets %s = %r; it must be %s"
                % (path, name, value, {int: "an integer", float: "a number", str: "a string"}[kind])
            )
    return values


def check_config(config):
    """Return *config* with the log level in capitals; ConfigError if a value is out of range."""
    for name, kind in OPERATOR_SETTINGS.items():
        if kind is not str and config[name] < 0:
            raise ConfigError("%s must not be negative, got %r" % (name, config[name]))
    try:
        check_sizes(config["min_size"], config["max_size"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    level = config["log_level"].upper()
    if level not in LOG_LEVELS:
        raise ConfigError("log_level must be one of %s, got %r" % (", ".join(LOG_LEVELS), config["log_level"]))
    return dict(config, log_level=level)


def mask_dsn(dsn):
    """*dsn* with its password replaced by ``***``, fit for logs and status."""
    try:
        params = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "(a connection string that does not parse)"
    if "password" in params:
        params["password"] = "***"
    return make_dsn(**params)
