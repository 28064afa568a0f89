"""The strategies the bench compares: what each starts, and how its clients reach PostgreSQL.

Every strategy runs the same workloads from the same client processes and
threads (pgbench being the exception that brings its own clients). Adding a
strategy is adding an entry to :data:`STRATEGIES`.
"""

import contextlib
import importlib.util
import os
import tempfile

import dbservice

import psycopg2

from . import connectors, load, pgbench, pgbouncer
from .connectors import AsyncClientConnector, ClientConnector, DBAPIConnector, DirectConnector, SQLAlchemyConnector

#: Where the layers apps put over a connection (DB-API, SQLAlchemy) show their cost; the
#: other workloads would measure the same daemon or PgBouncer again.
LAYER_WORKLOADS = ("point-read", "single-client")


#: What every daemon the bench starts is told besides its pool: the bench
#: oversubscribes the pool on purpose, so the warning that jobs wait for a
#: connection would only interleave with its report.
DAEMON_SETTINGS = {"log_level": "ERROR"}

class Strategy:
    """One way for an app's processes and threads to get their queries run."""

    name = ""
    description = ""
    #: the names of the workloads it runs; None: every workload that runs it
    workloads = None

    def runs(self, workload_name):
        return self.workloads is None or workload_name in self.workloads

    def skip_reason(self):
        """Why this strategy cannot run on this machine, or None."""
        return None

    def serving(self, dsn, plan):
        """Start what the strategy needs (a context manager); yield the target :meth:`measure` takes."""
        raise NotImplementedError

    def measure(self, target, workload, clients, plan, started=None):
        """Run one cell; return its Samples."""
        return load.measure(target, workload, clients, plan, started)


class ConnectPerQuery(Strategy):
    name = "connect-per-query"
    description = "the app before any service: open, query, close"

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        yield DirectConnector(dsn, persistent=False)


class ThreadPool(Strategy):
    name = "threadpool"
    description = "a persistent psycopg2 connection per client thread"

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        yield DirectConnector(dsn, persistent=True)


class QueuePipe(Strategy):
    name = "mp-queue-pipe"
    description = "dbservice's queue intake: jobs on one pipe, a reply FIFO per client thread, made once"

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        with dbservice.DBService(
            dsn, min_size=plan.pool_size, max_size=plan.pool_size, selector=plan.loop, **DAEMON_SETTINGS
        ) as service:
            yield ClientConnector(service.client())


class SocketService(Strategy):
    name = "dbservice"
    description = "dbservice over its Unix socket, sync client threads"

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        with _socket_service(dsn, plan) as service:
            yield ClientConnector(service.client())


class UnpreparedSocketService(Strategy):
    name = "dbservice-unprepared"
    description = "dbservice as above, with --max-prepared 0: every statement parsed and planned anew, as plain text"
    workloads = ("point-read", "write", "single-client")

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        with _socket_service(dsn, plan, max_prepared=0) as service:
            yield ClientConnector(service.client())


class AsyncSocketService(Strategy):
    name = "dbservice-async"
    description = "dbservice over its Unix socket, asyncio client, one event loop per process"

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        with _socket_service(dsn, plan) as service:
            yield AsyncClientConnector(service.socket, service.authkey)


class PgBouncer(Strategy):
    name = "pgbouncer"
    description = "PgBouncer in transaction mode, a persistent connection per client thread"

    def skip_reason(self):
        return pgbouncer.skip_reason()

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        with pgbouncer.running(dsn, plan.pool_size, plan.max_clients) as bouncer:
            yield DirectConnector(bouncer.dsn, persistent=True)


class DBAPIService(Strategy):
    name = "dbservice-dbapi"
    description = "dbservice.dbapi over the socket: a DB-API connection per client thread"
    workloads = LAYER_WORKLOADS

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        with _socket_service(dsn, plan) as service:
            yield DBAPIConnector(service.socket, service.authkey)


class SQLAlchemyService(Strategy):
    name = "dbservice-sqlalchemy"
    description = "SQLAlchemy Core on postgresql+dbservice://, a QueuePool per client process"
    workloads = LAYER_WORKLOADS

    def skip_reason(self):
        return _sqlalchemy_missing()

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        with _socket_service(dsn, plan) as service:
            address = {"socket": service.socket, "authkey": service.authkey, "timeout": connectors.QUERY_TIMEOUT}
            yield SQLAlchemyConnector("postgresql+dbservice://", plan.max_clients, connect_args=address)


class SQLAlchemyPgBouncer(Strategy):
    name = "pgbouncer-sqlalchemy"
    description = "SQLAlchemy Core with psycopg2 on PgBouncer in transaction mode, a QueuePool per client process"
    workloads = LAYER_WORKLOADS

    def skip_reason(self):
        return _sqlalchemy_missing() or pgbouncer.skip_reason()

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        with pgbouncer.running(dsn, plan.pool_size, plan.max_clients) as bouncer:
            target = bouncer.dsn
            yield SQLAlchemyConnector(
                "postgresql+psycopg2://", plan.max_clients,
                creator=lambda: psycopg2.connect(target, connect_timeout=connectors.CONNECT_TIMEOUT),
            )


def _sqlalchemy_missing():
    return None if importlib.util.find_spec("sqlalchemy") else "SQLAlchemy is not installed (pip install sqlalchemy)"


class PgBench(Strategy):
    name = "pgbench"
    description = "pgbench's C clients straight to the server (pgbench -S, plain text): its own limit on this machine"
    protocol = "simple"

    def skip_reason(self):
        return pgbench.skip_reason()

    @contextlib.contextmanager
    def serving(self, dsn, plan):
        yield dsn

    def measure(self, target, workload, clients, plan, started=None):
        return pgbench.measure(target, workload, clients, plan, started, protocol=self.protocol)


class PgBenchPrepared(PgBench):
    name = "pgbench-prepared"
    description = "pgbench as above with -M prepared: each statement parsed and planned once per connection"
    protocol = "prepared"


@contextlib.contextmanager
def _socket_service(dsn, plan, **settings):
    # A fresh 0700 directory: the daemon refuses a socket others could reach.
    with tempfile.TemporaryDirectory(prefix="dbservice-bench-") as directory:
        socket = os.path.join(directory, "dbservice.sock")
        with dbservice.DBService(
            dsn, min_size=plan.pool_size, max_size=plan.pool_size, socket=socket, selector=plan.loop,
            **DAEMON_SETTINGS, **settings
        ) as service:
            yield service


STRATEGIES = (
    ConnectPerQuery(),
    ThreadPool(),
    QueuePipe(),
    SocketService(),
    UnpreparedSocketService(),
    AsyncSocketService(),
    PgBouncer(),
    PgBench(),
    PgBenchPrepared(),
    DBAPIService(),
    SQLAlchemyService(),
    SQLAlchemyPgBouncer(),
)
