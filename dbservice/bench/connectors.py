"""How a client thread reaches PostgreSQL, one connector per way.

A connector is built in the bench process and inherited by the forked client
processes; there :meth:`open_thread` gives each client thread a session whose
``query(sql, params)`` runs one statement as its own transaction and fetches
its one row, the same for every strategy. ``open()`` does what a real app does
before its first request (a persistent connection connects); its cost is not
measured.
"""

import os

import psycopg2

import dbservice
from dbservice import dbapi

#: Seconds a query may take in the bench before it counts as an error.
QUERY_TIMEOUT = 30.0
#: Seconds to open one connection before it counts as an error.
CONNECT_TIMEOUT = 10


def _connect(dsn):
    conn = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT)
    # One statement is one transaction, as in dbservice: no BEGIN, no COMMIT.
    conn.autocommit = True
    return conn


def _fetch_one(conn, sql, params):
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


class DirectConnector:
    """psycopg2 straight to *dsn*: a persistent connection per thread, or a new one per query."""

    is_async = False

    def __init__(self, dsn, persistent):
        self.dsn = dsn
        self.persistent = persistent

    def open_thread(self):
        return _PersistentSession(self.dsn) if self.persistent else _ConnectPerQuerySession(self.dsn)


class _PersistentSession:
    def __init__(self, dsn):
        self.dsn = dsn
        self.conn = None

    def open(self):
        self.conn = _connect(self.dsn)

    def query(self, sql, params):
        if self.conn is None or self.conn.closed:
            self.open()  # the first connect failed, or the server dropped us
        return _fetch_one(self.conn, sql, params)

    def close(self):
        if self.conn is not None:
            self.conn.close()


class _ConnectPerQuerySession:
    def __init__(self, dsn):
        self.dsn = dsn

    def open(self):
        pass

    def query(self, sql, params):
        conn = _connect(self.dsn)
        try:
            return _fetch_one(conn, sql, params)
        finally:
            conn.close()

    def close(self):
        pass


class ClientConnector:
    """A dbservice client (socket or queue), shared by the threads of each process.

    Both clients are fork-safe, so the one made in the bench process serves
    the client processes forked from it.
    """

    is_async = False

    def __init__(self, client):
        self.client = client

    def open_thread(self):
        return _ClientSession(self.client)


class _ClientSession:
    def __init__(self, client):
        self.client = client

    def open(self):
        pass

    def query(self, sql, params):
        return self.client.fetchone(sql, params, timeout=QUERY_TIMEOUT)

    def close(self):
        pass


class AsyncClientConnector:
    """dbservice's asyncio client: each client process runs one event loop,
    and its "threads" are coroutines sharing one client."""

    is_async = True

    def __init__(self, socket, authkey):
        self.socket = socket
        self.authkey = authkey

    async def open_process(self):
        return await dbservice.connect_async(socket=self.socket, authkey=self.authkey)

    @staticmethod
    async def query(client, sql, params):
        return await client.fetchone(sql, params, timeout=QUERY_TIMEOUT)


class DBAPIConnector:
    """dbservice.dbapi: a DB-API connection per client thread, in autocommit, a cursor per query."""

    is_async = False

    def __init__(self, socket, authkey):
        self.socket = socket
        self.authkey = authkey

    def open_thread(self):
        return _DBAPISession(self.socket, self.authkey)


class _DBAPISession:
    def __init__(self, socket, authkey):
        self.socket = socket
        self.authkey = authkey
        self.conn = None

    def open(self):
        self.conn = dbapi.connect(self.socket, self.authkey, timeout=QUERY_TIMEOUT, autocommit=True)

    def query(self, sql, params):
        if self.conn is None:
            self.open()  # the first connect failed
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    def close(self):
        if self.conn is not None:
            self.conn.close()


class SQLAlchemyConnector:
    """SQLAlchemy Core: an engine per client process, whose QueuePool has a connection per thread.

    Each query checks a connection out (``engine.connect()``), runs a
    ``text()`` statement with named parameters and gives it back, as an app's
    unit of work does; the engine is in autocommit, as every strategy runs
    each statement as its own transaction. The engine is made in the client
    process, after the fork: a pool is never shared across processes.
    """

    is_async = False

    def __init__(self, url, pool_size, connect_args=None, creator=None):
        self.url = url
        self.pool_size = pool_size
        self.connect_args = connect_args or {}
        self.creator = creator
        self._engine = None
        self._pid = None

    def open_thread(self):
        # Imported here, not with the module: the daemon, a spawned child of
        # the bench, imports the bench again, and SQLAlchemy would add a
        # third to its memory.
        import sqlalchemy

        if self._pid != os.getpid():
            options = {"creator": self.creator} if self.creator else {}
            self._engine = sqlalchemy.create_engine(
                self.url, connect_args=self.connect_args, isolation_level="AUTOCOMMIT",
                pool_size=self.pool_size, max_overflow=0, **options,
            )
            self._pid = os.getpid()
        return _SQLAlchemySession(self._engine)


class _SQLAlchemySession:
    def __init__(self, engine):
        self.engine = engine
        self.warm = None
        self.statements = {}

    def open(self):
        # Held until the first query, so that the pool holds a connection per thread by then.
        self.warm = self.engine.connect()

    def query(self, sql, params):
        if self.warm is not None:
            self.warm.close()
            self.warm = None
        statement, names = self.statements.get(sql) or self._statement(sql)
        with self.engine.connect() as conn:
            return conn.execute(statement, dict(zip(names, params))).fetchone()

    def _statement(self, sql):
        """*sql*'s %s placeholders as SQLAlchemy's named ones: p0, p1, ..."""
        import sqlalchemy

        parts = sql.split("%s")
        names = ["p%d" % n for n in range(len(parts) - 1)]
        text = parts[0] + "".join(":%s%s" % (name, part) for name, part in zip(names, parts[1:]))
        self.statements[sql] = sqlalchemy.text(text), names
        return self.statements[sql]

    def close(self):
        if self.warm is not None:
            self.warm.close()
