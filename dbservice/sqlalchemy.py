"""The SQLAlchemy dialect ``postgresql+dbservice://``: SQLAlchemy's PostgreSQL over dbservice.dbapi.

    engine = create_engine("postgresql+dbservice://")         # the daemon dbservice.connect() finds
    engine = create_engine("postgresql+dbservice://?socket=/run/app/dbservice.sock&timeout=5")
    engine = create_engine("postgresql+dbservice://", connect_args={"socket": path, "authkey": key})
    engine = create_async_engine("postgresql+dbservice://")   # asyncio, over the AsyncClient

It is built on SQLAlchemy's generic PostgreSQL dialect, as SQLAlchemy's own
pg8000 dialect is: the SQL, reflection and types are SQLAlchemy's, and what
is overridden is what touches the driver. The values are psycopg2's (psycopg2
fetches them in the daemon), so results are handled as SQLAlchemy's psycopg
dialects handle them: numbers by their type's OID, json already parsed.
Nothing is set on the session of a pooled connection, which other clients
share: the isolation level, read-only and deferrable go into each
transaction's BEGIN, never into ``SET SESSION CHARACTERISTICS``.

The daemon's DSN chooses the database, user and host, so the URL takes none
of them; its query may carry ``socket``, ``timeout`` and ``connect_timeout``.
"""

import decimal
from contextlib import contextmanager

from sqlalchemy import exc, pool, util
from sqlalchemy.connectors.asyncio import (
    AsyncAdapt_dbapi_connection,
    AsyncAdapt_dbapi_cursor,
    AsyncAdapt_dbapi_ss_cursor,
    AsyncAdapt_terminate,
)
from sqlalchemy.dialects.postgresql.base import _FLOAT_TYPES, PGDialect, PGExecutionContext
from sqlalchemy.dialects.postgresql.json import JSON, JSONB
from sqlalchemy.dialects.postgresql.pg_catalog import INT2VECTOR, OIDVECTOR, _SpaceVector
from sqlalchemy.engine import processors
from sqlalchemy.sql import sqltypes

from . import dbapi
from .errors import ServiceBusy, ServiceUnavailable

try:
    from sqlalchemy.util.concurrency import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util.concurrency import await_only as await_

#: What the URL's query may carry, and the type of each.
URL_OPTIONS = {"socket": str, "timeout": float, "connect_timeout": float}

_server_side_id = util.counter()


class _NumericResults:
    """psycopg2 gives numeric as Decimal and float8 as float: convert only what asks otherwise."""

    def bind_processor(self, dialect):
        return None  # psycopg2 binds Decimal and float as they are

    def result_processor(self, dialect, coltype):
        if self.asdecimal:
            if coltype in _FLOAT_TYPES:
                scale = self._effective_decimal_return_scale
                return processors.to_decimal_processor_factory(decimal.Decimal, scale)
            return None
        return None if coltype in _FLOAT_TYPES else processors.to_float


class _Numeric(_NumericResults, sqltypes.Numeric):
    pass


class _Float(_NumericResults, sqltypes.Float):
    pass


class _JSON(JSON):
    def result_processor(self, dialect, coltype):
        return None  # psycopg2 parsed it in the daemon


class _JSONB(JSONB):
    def result_processor(self, dialect, coltype):
        return None


class _Int2Vector(_SpaceVector, INT2VECTOR):
    """psycopg2 gives int2vector (the catalogs' index columns) as text: "1 3"."""


class _OidVector(_SpaceVector, OIDVECTOR):
    """psycopg2 gives oidvector as text too."""


class _ExecutionContext(PGExecutionContext):
    def create_server_side_cursor(self):
        # A named cursor, as with psycopg2: it streams from a server-side cursor.
        ident = "c_%s_%s" % (hex(id(self))[2:], hex(_server_side_id())[2:])
        return self._dbapi_connection.cursor(ident)


class DBServiceDialect(PGDialect):
    """``postgresql+dbservice://``: PostgreSQL through a dbservice daemon."""

    driver = "dbservice"
    supports_statement_cache = True
    default_paramstyle = "pyformat"
    supports_server_side_cursors = True
    supports_sane_multi_rowcount = True  # executemany's rowcount is the total
    use_insertmanyvalues_wo_returning = True
    returns_native_bytes = True  # the daemon gives bytea as bytes
    execution_ctx_cls = _ExecutionContext
    colspecs = util.update_copy(
        PGDialect.colspecs,
        {
            sqltypes.Numeric: _Numeric,
            sqltypes.Float: _Float,
            sqltypes.JSON: _JSON,
            JSON: _JSON,
            JSONB: _JSONB,
            INT2VECTOR: _Int2Vector,
            OIDVECTOR: _OidVector,
        },
    )

    def __init__(self, json_deserializer=None, **kwargs):
        if json_deserializer is not None:
            raise exc.ArgumentError(
                "postgresql+dbservice does not take json_deserializer: psycopg2 parses json in the daemon"
            )
        super().__init__(**kwargs)

    @classmethod
    def import_dbapi(cls):
        return dbapi

    @classmethod
    def get_async_dialect_cls(cls, url):
        return DBServiceAsyncDialect

    def retrieve_dbapi_version(self, dbapi_module):
        return util.parse_version_string(dbapi_module.__version__)

    def create_connect_args(self, url):
        given = [part for part in ("username", "password", "host", "port", "database") if getattr(url, part)]
        if given:
            raise exc.ArgumentError(
                "postgresql+dbservice:// takes no %s: the daemon's DSN chooses the database; give the "
                "daemon's socket as ?socket=PATH, or leave it out for the default daemon" % ", ".join(given)
            )
        options = {}
        for name, value in url.query.items():
            if name not in URL_OPTIONS:
                raise exc.ArgumentError(
                    "unknown option %r in a postgresql+dbservice URL; it takes %s"
                    % (name, ", ".join(sorted(URL_OPTIONS)))
                )
            options[name] = URL_OPTIONS[name](value)
        return [], options

    def on_connect(self):
        return None  # nothing to set up on a connection: there is no session of ours to configure

    def is_disconnect(self, e, connection, cursor):
        if isinstance(e, ServiceUnavailable) and not isinstance(e, ServiceBusy):
            return True  # the daemon went away, or the transaction went with its socket
        return isinstance(e, dbapi.InterfaceError) and connection is not None and bool(connection.closed)

    def get_isolation_level_values(self, dbapi_connection):
        return ("AUTOCOMMIT", "READ COMMITTED", "READ UNCOMMITTED", "REPEATABLE READ", "SERIALIZABLE")

    def set_isolation_level(self, dbapi_connection, level):
        if level == "AUTOCOMMIT":
            dbapi_connection.autocommit = True
        else:
            dbapi_connection.autocommit = False
            dbapi_connection.isolation_level = level

    def get_isolation_level(self, dbapi_connection):
        level = dbapi_connection.isolation_level
        if level is None:
            with _outside_transaction(dbapi_connection) as cursor:
                cursor.execute("show default_transaction_isolation")
                level = cursor.fetchone()[0]
        return level.upper()

    def detect_autocommit_setting(self, dbapi_connection):
        return bool(dbapi_connection.autocommit)

    def set_readonly(self, connection, value):
        connection.readonly = value

    def get_readonly(self, connection):
        return connection.readonly

    def set_deferrable(self, connection, value):
        connection.deferrable = value

    def get_deferrable(self, connection):
        return connection.deferrable

    def do_ping(self, dbapi_connection):
        with _outside_transaction(dbapi_connection) as cursor:
            cursor.execute("select 1")
        return True


@contextmanager
def _outside_transaction(dbapi_connection):
    """A cursor whose statements run alone, not beginning a transaction (unless one is open)."""
    driver_connection = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    switch = not dbapi_connection.autocommit and not driver_connection.in_transaction
    if switch:
        dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    try:
        yield cursor
    finally:
        cursor.close()
        if switch and not dbapi_connection.closed:
            dbapi_connection.autocommit = False


# -- the asyncio variant ----------------------------------------------------------


class _AsyncAdaptedServerCursor(AsyncAdapt_dbapi_ss_cursor):
    __slots__ = ("name",)

    def __init__(self, adapt_connection, name):
        self.name = name
        super().__init__(adapt_connection)

    def _make_new_cursor(self, connection):
        return connection.cursor(self.name)


class _AsyncAdaptedConnection(AsyncAdapt_terminate, AsyncAdapt_dbapi_connection):
    """dbservice.dbapi's AsyncConnection as SQLAlchemy's sync-style connection facade."""

    __slots__ = ()

    def cursor(self, name=None):
        if name:
            return _AsyncAdaptedServerCursor(self, name)
        return AsyncAdapt_dbapi_cursor(self)

    @property
    def closed(self):
        return self._connection.closed

    @property
    def autocommit(self):
        return self._connection.autocommit

    @autocommit.setter
    def autocommit(self, value):
        self._connection.autocommit = value

    @property
    def isolation_level(self):
        return self._connection.isolation_level

    @isolation_level.setter
    def isolation_level(self, value):
        self._connection.isolation_level = value

    @property
    def readonly(self):
        return self._connection.readonly

    @readonly.setter
    def readonly(self, value):
        self._connection.readonly = value

    @property
    def deferrable(self):
        return self._connection.deferrable

    @deferrable.setter
    def deferrable(self, value):
        self._connection.deferrable = value

    async def _terminate_graceful_close(self):
        await self._connection.close()

    def _terminate_force_close(self):
        self._connection.terminate()


class _AsyncAdaptedDBAPI:
    """dbservice.dbapi as SQLAlchemy's asyncio dialects see a driver module: its connect() blocks."""

    def __init__(self):
        for name in dbapi.__all__:
            if not name.startswith("connect"):
                setattr(self, name, getattr(dbapi, name))
        self.__version__ = dbapi.__version__

    def connect(self, *args, **kwargs):
        creator = kwargs.pop("async_creator_fn", dbapi.connect_async)
        return _AsyncAdaptedConnection(self, await_(creator(*args, **kwargs)))


class DBServiceAsyncDialect(DBServiceDialect):
    """``create_async_engine("postgresql+dbservice://")``: the same dialect over the asyncio client."""

    is_async = True
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls):
        return _AsyncAdaptedDBAPI()

    @classmethod
    def get_pool_class(cls, url):
        return pool.AsyncAdaptedQueuePool  # what SQLAlchemy 2.1 picks for any asyncio dialect

    def get_driver_connection(self, connection):
        return connection._connection


dialect = DBServiceDialect
dialect_async = DBServiceAsyncDialect
