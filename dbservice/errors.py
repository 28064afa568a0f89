"""The exceptions dbservice raises to its callers.

Errors from PostgreSQL itself are not wrapped: they reach the caller as the very
``psycopg2.errors`` class psycopg2 would raise, with ``pgcode`` and the server's
message. The classes here are for what goes wrong around the query.

Each of them is also one of psycopg2's DB-API classes, the one psycopg2 would
raise for the same trouble, so code written for psycopg2, and the ORMs on
top of it, handle them where they handle psycopg2's: a lost daemon is an
``OperationalError`` as a lost server is, a malformed job a ``ProgrammingError``.
"""

from typing import Type, TypeVar

import psycopg2.errors

_StatementTimeout = TypeVar("_StatementTimeout", bound="StatementTimeout")


class Error(psycopg2.Error):
    """Base class of every error raised by dbservice itself; a ``psycopg2.Error``."""


class ServiceUnavailable(Error, psycopg2.OperationalError):
    """No daemon answers, the daemon went away, or the database cannot be reached."""


class ServiceBusy(ServiceUnavailable):
    """The daemon's job queue stayed full for the whole of the job's timeout."""


class QueryTimeout(Error, psycopg2.OperationalError):
    """The job's timeout passed; the query was cancelled on the server."""


class QueryOutcomeUnknown(Error):
    """The job's timeout passed and its query could not be stopped: it may still commit.

    The daemon cancels a timed-out query on the server; when the cancel
    cannot be delivered, or the query does not end after it, the daemon
    drops the connection, but a statement waiting on a lock may yet complete
    and commit. Check the data before doing the job again.
    """


class StatementTimeout(QueryTimeout, psycopg2.errors.QueryCanceled):
    """The server's statement_timeout cancelled the query.

    Both a QueryTimeout and the very ``psycopg2.errors.QueryCanceled`` the
    server raised, with its ``pgcode``: catch either.
    """

    @classmethod
    def from_server(cls: Type[_StatementTimeout], exc: psycopg2.Error) -> _StatementTimeout:
        error = cls(str(exc))
        # types-psycopg2 leaves __setstate__ unannotated.
        error.__setstate__({"pgerror": exc.pgerror, "pgcode": exc.pgcode})  # type: ignore[no-untyped-call]
        return error


class ResultTooLarge(Error, psycopg2.OperationalError):
    """The job's result is larger than the daemon sends (max_result_bytes)."""


class JobCancelled(Error, psycopg2.OperationalError):
    """The job was cancelled before it ended (its client cancelled it or went away)."""


class JobRefused(Error, psycopg2.ProgrammingError):
    """The daemon refused a job as malformed or unsafe; nothing was executed."""


class InternalError(Error, psycopg2.InternalError):
    """The daemon failed on the job: a bug of dbservice's, not the job's.

    Only this job fails; the connection and its other jobs go on. The
    daemon logged the failure once, with its traceback.
    """

    @classmethod
    def of(cls, exc: BaseException) -> "InternalError":
        """The error that answers a job the daemon failed on with *exc*."""
        return cls(
            "dbservice internal error: %s: %s; the daemon logged it with its traceback: "
            "please report it with that log line" % (type(exc).__name__, exc)
        )


class AuthenticationError(Error, psycopg2.OperationalError):
    """The client and the daemon do not share the same secret."""
