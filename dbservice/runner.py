"""Running one job on one pooled connection: in a task, or by callbacks alone.

Async psycopg2 connections are always in autocommit, so a single statement is
its own transaction: it commits on success and rolls back on error. A job with
several parameter sets (``executemany``) is wrapped in BEGIN/COMMIT. Whatever
happens, the connection is handed back idle: a timed-out query is cancelled on
the server and drained, an open transaction is rolled back, and a connection
that cannot be cleaned is closed.

Most jobs are one statement whose reply comes in one wait. :class:`Statement`
runs those from the socket's readiness callback, with no task: a task per
job, with its future, its steps and its timer, was the daemon's largest cost
in Python. Whatever needs more (the job's deadline, a cancel, a socket not
ready for writing, a transaction to roll back) is handed to :func:`run_job`,
which goes on from where the statement stands.
"""

import asyncio
import logging

import psycopg2
import psycopg2.extensions as ext

from .backpressure import GateClosed
from .errors import Error, JobRefused, QueryOutcomeUnknown, QueryTimeout, StatementTimeout
from .jobs import (
    FETCH_ALL,
    COMMIT,
    COPY,
    FETCH_CURSOR,
    FETCH_MANY,
    FETCH_ONE,
    FETCH_ROWCOUNT,
    FETCH_TABLE,
    FETCH_VALUE,
    TRANSACTION_CONTROL,
)

logger = logging.getLogger("dbservice.runner")

#: Seconds a cancelled query or a rollback may take before the connection is dropped.
CLEANUP_GRACE = 5.0

_EMPTY = {FETCH_ALL: [], FETCH_ONE: None, FETCH_VALUE: None, **dict.fromkeys(TRANSACTION_CONTROL)}

#: The fetch modes of a job that is one statement: the jobs a Statement can run.
STATEMENT_FETCHES = frozenset((FETCH_ALL, FETCH_ONE, FETCH_VALUE, FETCH_ROWCOUNT, FETCH_TABLE, FETCH_CURSOR))

#: A query up to this many bytes leaves in one send, so its reply is the next
#: thing to wait for; a longer one may still be sending (psycopg2 reports
#: POLL_WRITE), so its first poll cannot be skipped.
SENT_AT_ONCE = 4096


class Statement:
    """A one-statement job on *conn*, driven by the socket's readiness callback.

    ``owner.statement_done(ok, value)`` is called once with the job's outcome,
    *conn* then being idle or closed. ``owner.statement_needs_task()`` is
    called instead when the job needs :func:`run_job`, which the owner must
    then await with this statement.
    Neither is called from :meth:`start`, so a caller that starts the next
    job from ``done`` never recurses.
    """

    __slots__ = ("conn", "job", "owner", "cursor", "query", "error", "active")

    def __init__(self, conn, job, owner):
        self.conn = conn
        self.job = job
        self.owner = owner  # the engine's PendingJob
        self.cursor = None
        self.query = None  # the prepared.PreparedQuery it went as, if it went prepared
        self.error = None  # what failed, when the connection needs cleaning after it
        self.active = False  # waiting on the socket: interrupt() may take it over

    def start(self, prepared=True):
        """Send the statement (*prepared*: as a prepared statement, if it can be), and wait for its reply."""
        conn = self.conn
        self.cursor = cursor = self.cursor or conn.pgconn.cursor()
        self.active = True
        try:
            self.query = _send(conn, cursor, self.job.sql, self.job.params, conn.statements if prepared else None)
        except Exception as exc:
            self.error = exc
            asyncio.get_running_loop().call_soon(self._readable)
            return
        if len(cursor.query) <= SENT_AT_ONCE:
            # No poll() first: the reply cannot be there yet, and asking costs a recv().
            conn.when_readable(self._readable)
        else:
            asyncio.get_running_loop().call_soon(self._readable)

    def interrupt(self):
        """Stop waiting by callback and hand the job over to run_job.

        Past the job's deadline, run_job cancels the query on the server.
        """
        if self.active:
            self.conn.when_readable(None)
            self._give_up()

    def _readable(self):
        if not self.active:
            return  # interrupted meanwhile
        if self.error is not None:
            self._failed(self.error)
            return
        conn = self.conn
        try:
            state = conn.poll()
            if state == ext.POLL_READ:
                # More of a large result to read: in its client's turn (backpressure.py).
                if conn.gate is None or conn.gate.may_read(conn, self._resume):
                    conn.when_readable(self._readable)
                return
            if state != ext.POLL_OK or conn.pgconn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
                self._give_up()  # more to send, or a transaction to roll back
                return
            result = _fetch(self.cursor, self.job.kind)
        except Exception as exc:
            self._failed(exc)
            return
        if self.query is not None:
            conn.statements.sent(self.query)
        self.active = False
        self.cursor.close()
        self.owner.statement_done(True, result)

    def _resume(self):
        """The client's turn to read this large result came."""
        if self.active:
            self.conn.when_readable(self._readable)

    def _failed(self, exc):
        """Report *exc*, unless the connection needs cleaning first (run_job's part) or it may run again as plain text."""
        pgconn = self.conn.pgconn
        query, self.query = self.query, None
        idle = not pgconn.closed and pgconn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
        if query is not None and self.conn.statements.failed(query, exc) and idle:
            self.start(prepared=False)  # nothing of it ran: as the plain text it was
            return
        if pgconn.closed or idle:
            self.active = False
            self.cursor.close()
            self.owner.statement_done(False, _server_error(exc))
        else:
            self.error = _server_error(exc)
            self._give_up()

    def _give_up(self):
        self.active = False
        self.owner.statement_needs_task()


async def run_job(conn, job, deadline, cancel, in_transaction=False, statement=None):
    """Run *job* on *conn*, a PooledConnection; return its result or raise its error.

    *deadline* is on the event loop's clock (None: no limit). ``await
    cancel(conn)`` must ask the server to cancel the query running on *conn*
    (see AsyncConnectionPool.cancel). On return or raise, *conn* is idle and
    reusable, or closed; *in_transaction* jobs belong to a client's
    transaction instead, which stays open (failed, after an error). A
    *statement* that handed the job over was sent already: run_job takes it
    from where it stands. A COPY runs itself (see copying.py).
    """
    if job.kind == COPY:
        return await job.run(conn, deadline, cancel, in_transaction)
    cursor = conn.pgconn.cursor() if statement is None else statement.cursor
    query = None if statement is None else statement.query
    try:
        if statement is not None and statement.error is not None:
            raise statement.error
        if job.kind == FETCH_MANY:
            result = await _execute_many(conn, cursor, job, deadline, cancel, in_transaction)
        else:
            if statement is None:
                # Inside a client's transaction a failed PREPARE would abort it: only what is prepared already.
                query = _send(conn, cursor, job.sql, job.params, conn.statements, prepare_new=False)
            commits = job.kind == COMMIT if in_transaction else True
            await _wait_or_cancel(conn, deadline, cancel, commits)
            result = _fetch(cursor, job.kind)
            if query is not None:
                conn.statements.sent(query)
    except BaseException as exc:
        if query is not None:
            conn.statements.failed(query, exc)
        await _clean_up(conn, cancel, keep_transaction=in_transaction)
        raise
    finally:
        cursor.close()
    if not in_transaction and conn.pgconn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
        await _clean_up(conn, cancel)
        raise Error(
            "the statement left a transaction open, so it was rolled back; "
            "a job is one transaction of its own and must not run BEGIN or COMMIT"
        )
    return result


async def _execute_many(conn, cursor, job, deadline, cancel, in_transaction):
    """All parameter sets in one transaction: the caller's, or one of our own.

    Each set runs the statement prepared (the first one prepares it): in a
    transaction of our own, a PREPARE the server refuses is rolled back with
    it, and the whole runs again as plain text.
    """
    if in_transaction:
        return await _each_set(conn, cursor, job, deadline, cancel, prepare_new=False)
    for prepare_new in (True, None):
        _send(conn, cursor, "BEGIN")
        await _wait_or_cancel(conn, deadline, cancel, commits=False)
        try:
            total = await _each_set(conn, cursor, job, deadline, cancel, prepare_new)
        except _RunPlain:
            _send(conn, cursor, "ROLLBACK")
            await _wait_or_cancel(conn, deadline, cancel, commits=False)
            continue
        _send(conn, cursor, "COMMIT")
        await _wait_or_cancel(conn, deadline, cancel, commits=True)
        return total


class _RunPlain(Exception):
    """A PREPARE the server refused, in a transaction of our own: roll it back and run plain."""


async def _each_set(conn, cursor, job, deadline, cancel, prepare_new):
    """Run *job*'s statement once per parameter set; prepared unless *prepare_new* is None."""
    statements = None if prepare_new is None else conn.statements
    total = 0
    for params in job.params:
        query = _send(conn, cursor, job.sql, params, statements, prepare_new)
        try:
            await _wait_or_cancel(conn, deadline, cancel, commits=False)
        except psycopg2.Error as exc:
            if query is not None and conn.statements.failed(query, exc) and query.fresh and prepare_new:
                raise _RunPlain() from None
            raise
        if query is not None:
            conn.statements.sent(query)
        total += max(cursor.rowcount, 0)
    return total


def _send(conn, cursor, sql, params=None, statements=None, prepare_new=True):
    """Have psycopg2 bind *params* into *sql* and send it; the PreparedQuery it went as, or None.

    With *statements* (the connection's prepared.ConnectionStatements) it goes
    as a prepared statement where it can.
    """
    query = None if statements is None else statements.query(sql, params, prepare_new)
    try:
        if query is None:
            conn.execute(cursor, sql, params)
        else:
            conn.execute(cursor, query.text, query.params)
        return query
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        # psycopg2 binds before sending: these mean nothing reached the server.
        raise JobRefused(
            "the parameters do not fit the placeholders of the SQL (%s: %s); "
            "use one %%s per positional parameter, %%(name)s per key, and %%%% for a literal %%"
            % (type(exc).__name__, exc)
        ) from None


def _fetch(cursor, mode):
    if mode == FETCH_ROWCOUNT:
        return cursor.rowcount
    if mode == FETCH_CURSOR:
        if cursor.description is None:
            return None, cursor.rowcount, None, cursor.statusmessage
        description = [tuple(column) for column in cursor.description]
        return description, cursor.rowcount, cursor.fetchall(), cursor.statusmessage
    if cursor.description is None:  # a statement that returns no rows
        return ([], []) if mode == FETCH_TABLE else _EMPTY[mode]
    if mode == FETCH_ALL:
        return cursor.fetchall()
    if mode == FETCH_TABLE:
        return [column.name for column in cursor.description], cursor.fetchall()
    row = cursor.fetchone()
    if mode == FETCH_ONE:
        return row
    return None if row is None else row[0]


async def _wait_or_cancel(conn, deadline, cancel, commits):
    """Wait for the query; past *deadline*, cancel it on the server.

    If the query finished just as the timeout fired, its result stands: the
    job did succeed, and saying otherwise would lie about a commit. *commits*
    says that the statement commits when it completes (it is its own
    transaction, or a COMMIT): if it cannot be stopped, the caller is told
    that it may still commit.
    """
    try:
        await conn.wait(deadline, gated=True)
    except QueryTimeout:
        try:
            await _cancel_and_drain(conn, cancel, commits)
        except psycopg2.errors.QueryCanceled:
            raise QueryTimeout("the job's timeout passed; the query was cancelled") from None
    except psycopg2.errors.QueryCanceled as exc:
        raise _server_error(exc) from None


def _server_error(exc):
    """The error a job's caller gets for *exc*: a server's statement timeout is a StatementTimeout.

    A query cancelled by someone else (pg_cancel_backend) keeps psycopg2's own error.
    """
    if isinstance(exc, psycopg2.errors.QueryCanceled) and "statement timeout" in (exc.diag.message_primary or ""):
        return StatementTimeout.from_server(exc)
    return exc


async def _cancel_and_drain(conn, cancel, commits=False):
    """Have the server cancel the running query and wait for it to end.

    If the cancel request cannot be sent, or the query does not end within
    CLEANUP_GRACE after it, the connection is closed: it can never be trusted
    again. That does not stop a statement the server is still running (one
    waiting on a lock, say), so when it *commits* on completion the error
    says that it may still commit.
    """
    loop = asyncio.get_running_loop()
    try:
        await cancel(conn)
        await conn.wait(loop.time() + CLEANUP_GRACE, gated=True)  # a large result waits its turn
    except (QueryTimeout, psycopg2.OperationalError) as exc:
        if isinstance(exc, psycopg2.errors.QueryCanceled):
            raise
        if not isinstance(exc, GateClosed):
            logger.warning("could not cancel a query (%s); closing its connection", exc)
        conn.close()
        if commits:
            raise QueryOutcomeUnknown(
                "the job's timeout passed and its query could not be stopped (%s): it may still commit; "
                "check before you run it again" % exc
            ) from None
        raise QueryTimeout("the job's timeout passed and its query could not be cancelled: %s" % exc) from None


async def _clean_up(conn, cancel, keep_transaction=False):
    """Bring *conn* back to idle, or close it: never hand back a dirty one.

    With *keep_transaction*, a running query is still cancelled but the
    transaction around it is left for its owner to roll back.
    """
    loop = asyncio.get_running_loop()
    pgconn = conn.pgconn
    try:
        if pgconn.closed:
            return
        status = pgconn.get_transaction_status()
        if status == ext.TRANSACTION_STATUS_ACTIVE:
            try:
                await _cancel_and_drain(conn, cancel)
            except (psycopg2.Error, QueryTimeout):
                pass  # the cancelled query's own error: expected
            status = pgconn.get_transaction_status()
        if keep_transaction:
            return
        if status in (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR):
            cursor = pgconn.cursor()
            _send(conn, cursor, "ROLLBACK")
            await conn.wait(loop.time() + CLEANUP_GRACE)
            cursor.close()
        if pgconn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
            conn.close()
    except asyncio.CancelledError:
        conn.close()
        raise
    except Exception as exc:
        # Whatever stopped the clean-up, the connection is not safe to reuse;
        # the job's own error is the one its caller must see.
        logger.warning("could not clean up a connection (%s); closing it", exc)
        conn.close()
