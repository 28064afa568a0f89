"""dbservice.dbapi: a PEP 249 (DB-API 2.0) module whose connections run their SQL through a dbservice daemon.

    from dbservice import dbapi

    conn = dbapi.connect()          # finds the daemon as dbservice.connect() does
    cur = conn.cursor()
    cur.execute("insert into posts (title) values (%s) returning id", ["Hello"])
    post_id = cur.fetchone()[0]
    conn.commit()

It is what ORMs and tools written for psycopg2 plug into: the SQLAlchemy
dialect ``postgresql+dbservice://`` and the Django backend
``dbservice.django`` are built on it. Parameters use psycopg2's ``pyformat``
style and are bound by psycopg2 on the daemon.

The exceptions are psycopg2's own classes: a server error is the very
``psycopg2.errors`` class psycopg2 raises (``except dbapi.IntegrityError``
catches a ``UniqueViolation``), and dbservice's own errors are subclasses of
them (a lost daemon, ``ServiceUnavailable``, is an ``OperationalError``).
"""

import datetime
import time
from typing import Iterable

import psycopg2

from .. import __version__ as _package_version
from .aio import AsyncConnection, AsyncCursor, connect_async
from .connection import Connection, connect
from .cursor import Column, Cursor

__version__ = _package_version  # the package's, as a driver module gives its own
apilevel = "2.0"
#: Threads may share the module and connections (a connection runs one operation at a time).
threadsafety = 2
paramstyle = "pyformat"

Warning = psycopg2.Warning
Error = psycopg2.Error
InterfaceError = psycopg2.InterfaceError
DatabaseError = psycopg2.DatabaseError
DataError = psycopg2.DataError
OperationalError = psycopg2.OperationalError
IntegrityError = psycopg2.IntegrityError
InternalError = psycopg2.InternalError
ProgrammingError = psycopg2.ProgrammingError
NotSupportedError = psycopg2.NotSupportedError

# The constructors give the plain values the daemon accepts, which psycopg2
# binds as date, time, timestamp and bytea.
Date = datetime.date
Time = datetime.time
Timestamp = datetime.datetime
Binary = bytes


def DateFromTicks(ticks: float) -> datetime.date:
    return Date(*time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> datetime.time:
    return Time(*time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> datetime.datetime:
    return Timestamp(*time.localtime(ticks)[:6])


class DBAPITypeObject:
    """A PEP 249 type object: equal to the OID of each PostgreSQL type it stands for."""

    def __init__(self, name: str, oids: Iterable[int]) -> None:
        self.name = name
        self.values = frozenset(oids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DBAPITypeObject):
            return self.values == other.values
        return other in self.values

    def __hash__(self) -> int:
        return hash(self.values)

    def __repr__(self) -> str:
        return "<dbservice.dbapi.%s>" % self.name


STRING = DBAPITypeObject("STRING", (18, 19, 25, 1042, 1043))  # char, name, text, bpchar, varchar
BINARY = DBAPITypeObject("BINARY", (17,))  # bytea
NUMBER = DBAPITypeObject("NUMBER", (20, 21, 23, 26, 700, 701, 790, 1700))  # ints, oid, floats, money, numeric
# date, time, timetz, timestamp, timestamptz, interval
DATETIME = DBAPITypeObject("DATETIME", (1082, 1083, 1266, 1114, 1184, 1186))
ROWID = DBAPITypeObject("ROWID", (26,))  # oid

__all__ = [
    "BINARY", "Binary", "Column", "Connection", "AsyncConnection", "AsyncCursor", "Cursor", "DATETIME",
    "DataError", "DatabaseError", "Date", "DateFromTicks", "Error", "IntegrityError", "InterfaceError",
    "InternalError", "NUMBER", "NotSupportedError", "OperationalError", "ProgrammingError", "ROWID",
    "STRING", "Time", "TimeFromTicks", "Timestamp", "TimestampFromTicks", "Warning", "apilevel",
    "connect", "connect_async", "paramstyle", "threadsafety",
]
