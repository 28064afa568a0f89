"""dbservice: one daemon holds a bounded pool of PostgreSQL connections and runs
everybody's SQL on them.

    import dbservice
    with dbservice.connect() as db:
        db.fetchall("select id, name from accounts where id = %s", [42])
"""

#: This version of dbservice: what ``dbserviced --version`` prints and what
#: the package's metadata says (pyproject.toml reads it from here).
__version__ = "0.2.0.dev0"

from .async_client import AsyncClient, connect_async
from .client import Client, connect
from .errors import (
    AuthenticationError,
    Error,
    InternalError,
    JobCancelled,
    JobRefused,
    QueryOutcomeUnknown,
    QueryTimeout,
    ResultTooLarge,
    ServiceBusy,
    ServiceUnavailable,
    StatementTimeout,
)
from .notifications import Notification, NotificationsLost
from .pool import AsyncConnectionPool
from .queue_client import QueueClient
from .service import DBService

__all__ = [
    "AsyncClient",
    "AsyncConnectionPool",
    "AuthenticationError",
    "Client",
    "DBService",
    "Error",
    "InternalError",
    "JobCancelled",
    "JobRefused",
    "Notification",
    "NotificationsLost",
    "QueryOutcomeUnknown",
    "QueryTimeout",
    "QueueClient",
    "ResultTooLarge",
    "ServiceBusy",
    "ServiceUnavailable",
    "StatementTimeout",
    "connect",
    "connect_async",
]
