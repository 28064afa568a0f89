"""The daemon's settings, with their defaults, in one place."""

import dataclasses
import os
from typing import Optional

from .pool import check_sizes

#: The state directory when none is given: socket, secret, pidfile, log.
DEFAULT_STATE_DIR = os.path.join("~", ".local", "state", "dbservice")
SOCKET_NAME = "dbservice.sock"
SECRET_NAME = "secret"


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
    #: bytes one job message may take on the socket
    max_frame: int = 32 * 1024 * 1024
    #: seconds a new socket client has to authenticate
    auth_timeout: float = 10.0
    #: seconds a graceful stop waits for queued and running jobs
    stop_timeout: float = 30.0
    log_level: str = "WARNING"

    def __post_init__(self):
        check_sizes(self.min_size, self.max_size)
