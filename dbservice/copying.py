"""COPY through the daemon: libpq's own COPY on a pooled connection, its data streamed in chunks both ways.

psycopg2 cannot COPY on an async connection (its ``copy_expert()`` blocks,
reading and writing a file), and the daemon's event loop must never block.
So a COPY is a job like the others: it waits in the pool's queue for a
pooled connection, counting against ``max_size`` as any job does, or,
inside a client's transaction, it runs on that transaction's pinned
connection, the only one that sees what the transaction did so far. There
libpq's own non-blocking COPY functions drive it, through ctypes
(``PQputCopyData``, ``PQputCopyEnd``, ``PQgetCopyData``, ``PQgetResult``):
psycopg2 puts every async connection in non-blocking mode, and the event
loop waits on the socket as for any job. psycopg2 never sees the COPY: its
``poll()`` takes the connection back once libpq has read the COPY's last
result. (A synchronous connection of its own per COPY, in a thread, could
not run inside a client's transaction, and would count against nothing.)

The data goes in frames of the job's id (``wire.MSG_COPY_*``), with flow
control by credit in both directions: a sender may have at most
:data:`WINDOW` bytes on their way that the receiver has not taken yet, and
the receiver grants more as it takes them (into libpq, or into the client's
file). So a COPY of any size holds about a window in the daemon and in the
client, the rest waiting in the client's file or in the server; the client's
socket is never paused, so a COPY on an asyncio client's connection holds up
none of the other jobs on it.

A COPY given up on (its timeout, its client cancelled it or went away, the
daemon is stopping) is ended on the server: a COPY FROM STDIN is failed
with ``PQputCopyEnd(reason)``, so none of it commits; a COPY TO STDOUT is
cancelled by a cancel request, and what the server sent meanwhile is read
and dropped. A connection that does not come back to idle within
CLEANUP_GRACE is closed. At most ``max_copies`` COPYs run at once
(:class:`CopySlots`); more are refused as busy, so that long COPYs leave
connections to the other jobs.
"""

import asyncio
import collections
import ctypes
import functools
import logging
import struct

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
from psycopg2 import sql as sqlcomp

from . import libpq
from .errors import Error, JobRefused, QueryOutcomeUnknown, QueryTimeout, ServiceBusy
from .jobs import COPY, FETCH_ROWCOUNT, Job, dumps_reply, loads_message
from .runner import CLEANUP_GRACE
from .wait import set_done, until, wait_writable
from .wire import (
    COPY_CREDIT,
    COPY_IN,
    COPY_OUT,
    MSG_COPY_CREDIT,
    MSG_COPY_DATA,
    MSG_COPY_DONE,
    MSG_COPY_STARTED,
    encode_frame,
)

logger = logging.getLogger("dbservice.copy")

#: Bytes of a COPY's data that may be on their way, not yet taken by their receiver, either way.
WINDOW = 1024 * 1024
#: The largest chunk a client may send: a quarter of the window, so that credit comes back in time.
MAX_CHUNK = WINDOW // 4
#: What the daemon gathers from the server into one frame of a COPY TO STDOUT.
BATCH = 65536


# libpq's ExecStatusType and ConnStatusType values, and PG_DIAG_SQLSTATE.
_COMMAND_OK, _TUPLES_OK, _COPY_OUT, _COPY_IN = 1, 2, 3, 4
_ERRORS = frozenset((5, 6, 7))  # PGRES_BAD_RESPONSE, PGRES_NONFATAL_ERROR, PGRES_FATAL_ERROR
_CONNECTION_BAD = 1
_SQLSTATE = ord("C")
# Where the COPY stands, for what giving up on it takes.
_SENT, _IN, _OUT, _ENDING = "sent", "in", "out", "ending"


def _bind():
    # A PyDLL keeps the GIL: these calls never block (the connection is
    # non-blocking), and releasing it would cost each of a million rows.
    lib = libpq.load(ctypes.PyDLL)
    pointer, number, text = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    for name, restype, argtypes in (
        ("PQsendQuery", number, [pointer, text]),
        ("PQflush", number, [pointer]),
        ("PQconsumeInput", number, [pointer]),
        ("PQisBusy", number, [pointer]),
        ("PQgetResult", pointer, [pointer]),
        ("PQresultStatus", number, [pointer]),
        ("PQcmdTuples", text, [pointer]),
        ("PQresultErrorField", text, [pointer, number]),
        ("PQresultErrorMessage", text, [pointer]),
        ("PQclear", None, [pointer]),
        ("PQputCopyData", number, [pointer, text, number]),
        ("PQputCopyEnd", number, [pointer, text]),
        ("PQgetCopyData", number, [pointer, pointer, number]),
        ("PQfreemem", None, [pointer]),
        ("PQerrorMessage", text, [pointer]),
        ("PQstatus", number, [pointer]),
        ("PQtransactionStatus", number, [pointer]),
    ):
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_pq = _bind()


class CopySlots:
    """The daemon's bound on COPYs running at once (``max_copies``)."""

    def __init__(self, limit):
        self.limit = limit
        self.running = 0

    def take(self):
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def give_back(self):
        self.running -= 1


class ClientCopies:
    """The COPYs of one client connection (a socket_intake ``_ClientProtocol``) and their streams."""

    def __init__(self, protocol, slots):
        self.protocol = protocol
        self.slots = slots
        self.streams = {}  # job id -> CopyStream, until the job's reply

    def start(self, job_id, payload):
        """A MSG_COPY arrived: hand its job to the engine, unless it is malformed or max_copies run."""
        protocol = self.protocol
        try:
            job = CopyJob.from_wire(loads_message(payload))
        except JobRefused as exc:
            logger.warning("refused a COPY: %s", exc)
            protocol.engine.refuse(protocol.reply, job_id, exc)
            return
        if not self.slots.take():
            protocol.engine.refuse(protocol.reply, job_id, ServiceBusy(
                "%d COPYs run already (max_copies): try again later, or raise --max-copies" % self.slots.limit
            ))
            return
        job.stream = self.streams[job_id] = CopyStream(protocol.transport, job_id)
        pending = protocol.engine.submit(job, self._reply, job_id, owner=protocol)
        if not pending.done:
            protocol.in_flight[job_id] = pending

    def receive(self, job_id, kind, payload):
        """A frame of COPY data, its end or credit: for its stream; a job that ended drops the rest."""
        stream = self.streams.get(job_id)
        if stream is None or stream.broken:
            return
        try:
            stream.receive(kind, payload)
        except JobRefused as exc:
            logger.warning("stopping a COPY: %s", exc)
            stream.broken = True
            pending = self.protocol.in_flight.get(job_id)
            if pending is not None:
                self.protocol.engine.cancel(pending, exc)

    def _reply(self, job_id, ok, value):
        del self.streams[job_id]
        self.slots.give_back()
        return self.protocol.reply(job_id, ok, value)


class CopyStream:
    """One COPY's data between its client and the connection it runs on, under credit both ways."""

    __slots__ = ("direction", "broken", "_transport", "_job_id", "_chunks", "_held", "_ended", "_taken",
                 "_credit", "_wake")

    def __init__(self, transport, job_id):
        self.direction = None  # until the server starts copying
        self.broken = False  # the client broke the protocol: the rest of its frames is dropped
        self._transport = transport
        self._job_id = job_id
        self._chunks = collections.deque()  # COPY FROM STDIN: the client's chunks, not yet in libpq
        self._held = 0  # their bytes
        self._ended = False  # the client's data ended
        self._taken = 0  # bytes passed on to libpq and not granted back to the client yet
        self._credit = 0  # COPY TO STDOUT: bytes we may still send
        self._wake = None  # the future the COPY waits on, if it waits

    # -- what the client sends ---------------------------------------------------

    def receive(self, kind, payload):
        """Take a frame from the client; JobRefused if it breaks the protocol."""
        if kind == MSG_COPY_DATA:
            if self.direction != COPY_IN or self._ended:
                raise JobRefused("the client sent COPY data the server did not ask for")
            if len(payload) > MAX_CHUNK or self._held >= WINDOW:
                raise JobRefused("the client sent more COPY data than its window (%d bytes) allows" % WINDOW)
            self._chunks.append(payload)
            self._held += len(payload)
        elif kind == MSG_COPY_DONE:
            self._ended = True
        else:  # MSG_COPY_CREDIT
            try:
                (granted,) = COPY_CREDIT.unpack(payload)
            except struct.error:
                raise JobRefused("a COPY credit must be %d bytes" % COPY_CREDIT.size) from None
            self._credit += granted
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # -- what the COPY does ------------------------------------------------------

    def started(self, direction, codec):
        """The server copies now, from STDIN (COPY_IN) or to STDOUT (COPY_OUT): the client is told, and given credit."""
        self.direction = direction
        self._credit = WINDOW
        self._send(MSG_COPY_STARTED, dumps_reply((direction, codec, WINDOW)))

    async def next_chunk(self, deadline):
        """The client's next chunk of data, or None once it ended; QueryTimeout at *deadline*."""
        while not self._chunks:
            if self._ended:
                return None
            await self._wait(deadline)
        chunk = self._chunks.popleft()
        self._held -= len(chunk)
        return chunk

    def took(self, size):
        """*size* bytes of the client's went into libpq: grant them back, a quarter window at a time."""
        self._taken += size
        if self._taken >= MAX_CHUNK:
            self._send(MSG_COPY_CREDIT, COPY_CREDIT.pack(self._taken))
            self._taken = 0

    async def send(self, data, deadline):
        """Send *data* to the client once it has credit left; QueryTimeout at *deadline*."""
        while self._credit <= 0:
            await self._wait(deadline)
        self._credit -= len(data)
        self._send(MSG_COPY_DATA, data)

    async def _wait(self, deadline):
        loop = asyncio.get_running_loop()
        self._wake = loop.create_future()
        try:
            await until(loop, self._wake, deadline)
        finally:
            self._wake = None

    def _send(self, kind, payload):
        if not self._transport.is_closing():
            self._transport.write(encode_frame(self._job_id, kind, payload))


class CopyJob(Job):
    """A COPY in the daemon: its statement, or the table form of copy_from()/copy_to(), and its stream.

    *form* is ``(direction, table, columns, sep, null)``, or None for a
    statement of the client's own (copy_expert()).
    """

    __slots__ = ("form", "stream")

    def __init__(self, sql, form, timeout, tx):
        super().__init__(sql, None, COPY, timeout, tx)
        self.form = form
        self.stream = None

    @classmethod
    def from_wire(cls, message):
        """Build a COPY job from a decoded MSG_COPY, or raise JobRefused saying why."""
        if not (isinstance(message, tuple) and len(message) == 5 and message[2] == COPY):
            raise JobRefused("a COPY job must be a tuple (sql, form, 'copy', timeout, tx)")
        sql, form, _, timeout, tx = message
        Job.from_wire(("COPY", None, FETCH_ROWCOUNT, timeout, tx))  # the timeout and tx as any job's
        if form is None:
            if not isinstance(sql, str) or not sql.strip():
                raise JobRefused("a COPY needs its statement: COPY ... FROM STDIN or COPY ... TO STDOUT")
            return cls(sql, None, timeout, tx)
        _check_form(form)
        direction, table = form[0], form[1]
        return cls("COPY %s %s" % (table, "FROM STDIN" if direction == COPY_IN else "TO STDOUT"), form, timeout, tx)

    def statement(self, pgconn):
        """The SQL to run on *pgconn*: the client's, or the table form's, quoted by psycopg2 for that connection."""
        if self.form is None:
            return self.sql
        direction, table, columns, sep, null = self.form
        return sqlcomp.SQL("COPY {}{} {} WITH DELIMITER AS {} NULL AS {}").format(
            sqlcomp.Identifier(table),
            sqlcomp.SQL(" ({})").format(sqlcomp.SQL(", ").join(map(sqlcomp.Identifier, columns)))
            if columns else sqlcomp.SQL(""),
            sqlcomp.SQL("FROM STDIN" if direction == COPY_IN else "TO STDOUT"),
            sqlcomp.Literal(sep),
            sqlcomp.Literal(null),
        ).as_string(pgconn)

    async def run(self, conn, deadline, cancel, in_transaction):
        """Run the COPY on *conn* (see runner.run_job); its rowcount, or its error."""
        copy = _LibpqCopy(conn, self.stream, deadline, cancel, in_transaction)
        rowcount = await copy.run(self.statement(conn.pgconn))
        if not in_transaction and conn.pgconn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
            raise Error(  # the pool rolls it back before anybody else gets the connection
                "the COPY's statement left a transaction open, so it was rolled back; a job is one "
                "transaction of its own: use client.transaction() around the COPY"
            )
        return rowcount


def _check_form(form):
    if not (isinstance(form, tuple) and len(form) == 5):
        raise JobRefused("a COPY's table form must be a tuple (direction, table, columns, sep, null)")
    direction, table, columns, sep, null = form
    if direction not in (COPY_IN, COPY_OUT):
        raise JobRefused("a COPY's direction must be %r or %r, not %r" % (COPY_IN, COPY_OUT, direction))
    if columns is not None and not isinstance(columns, (list, tuple)):
        raise JobRefused("a COPY's columns must be a list of names, or None")
    if not all(isinstance(name, str) and name for name in [table, *(columns or ())]):
        raise JobRefused("a COPY's table and columns must be non-empty strings")
    if not (isinstance(sep, str) and isinstance(null, str)):
        raise JobRefused("a COPY's sep and null must be strings")


class _LibpqCopy:
    """One COPY statement under way on one connection, driven by libpq's functions (see the module)."""

    def __init__(self, conn, stream, deadline, cancel, in_transaction):
        self.conn = conn
        self.ptr = conn.pgconn.pgconn_ptr
        self.stream = stream
        self.deadline = deadline
        self.cancel = cancel
        self.in_transaction = in_transaction
        self.loop = asyncio.get_running_loop()
        self.codec = ext.encodings.get(conn.pgconn.encoding, "utf_8")
        self.phase = None

    async def run(self, sql):
        """Send *sql* and follow it to its end, copying as the server asks; its rowcount, or raise its error."""
        self.conn.driven_by_libpq()
        try:
            try:
                if not _pq.PQsendQuery(self.ptr, sql.encode(self.codec)):
                    raise self._broken()
                self.phase = _SENT
                await self._flush()
                outcome = await self._follow()
            except QueryTimeout:
                outcome = await self._abandon_at_timeout()
            except BaseException:  # cancelled, or failed: never hand the connection back mid-COPY
                if not self.conn.pgconn.closed:
                    try:
                        await self._abandon("the COPY was cancelled")
                    except psycopg2.Error:
                        pass  # closed: nothing of the COPY goes on
                raise
        finally:
            self._hand_back()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _follow(self):
        """Read the statement's results, copying whenever the server asks; its outcome (rowcount or error)."""
        while True:
            status, outcome = await self._results()
            if status == _COPY_IN:
                self.phase = _IN
                self.stream.started(COPY_IN, self.codec)
                await self._copy_in()
            elif status == _COPY_OUT:
                self.phase = _OUT
                self.stream.started(COPY_OUT, self.codec)
                await self._copy_out()
            else:
                self.phase = None
                return outcome
            self.phase = _ENDING

    async def _results(self):
        """Results until the server starts copying, ``(status, None)``, or is done, ``(None, outcome)``.

        The outcome is the first error, else the last command's rowcount.
        """
        outcome = None
        while True:
            await self._read_input()
            result = _pq.PQgetResult(self.ptr)
            if not result:
                return None, outcome
            try:
                status = _pq.PQresultStatus(result)
                if status in (_COPY_IN, _COPY_OUT):
                    return status, None
                if isinstance(outcome, Exception):
                    continue
                if status == _TUPLES_OK:
                    outcome = JobRefused("copy_expert() needs COPY ... FROM STDIN or TO STDOUT, not a query: "
                                         "use fetchall() for rows")
                elif status == _COMMAND_OK:
                    outcome = int(_pq.PQcmdTuples(result) or 0)
                elif status in _ERRORS:
                    outcome = self._server_error(result)
            finally:
                _pq.PQclear(result)

    async def _copy_in(self):
        """The client's chunks into the server, as credit allows, then the end of the data."""
        while True:
            chunk = await self.stream.next_chunk(self.deadline)
            if chunk is None:
                break
            if not await self._put(chunk):
                return  # the server ended the COPY: its result says why
            self.stream.took(len(chunk))
        await self._end_copy(None)

    async def _put(self, chunk):
        """Pass *chunk* to libpq and send it; False if the server ended the COPY meanwhile."""
        while True:
            sent = _pq.PQputCopyData(self.ptr, chunk, len(chunk))
            if sent < 0:
                return False
            if sent:
                break
            await self._flush(waiting=True)  # libpq's buffer is full
        await self._flush()
        # What the server said: an error it raised stops the rest of the data here, not at its end.
        if not _pq.PQconsumeInput(self.ptr):
            raise self._broken()
        return True

    async def _end_copy(self, reason):
        """End the data: its end (None), or a failure saying *reason*, after which nothing of it commits."""
        end = None if reason is None else reason.encode(self.codec, "replace")
        while True:
            ended = _pq.PQputCopyEnd(self.ptr, end)
            if ended < 0:
                raise self._broken()
            if ended:
                break
            await self._flush(waiting=True)  # libpq's buffer is full
        await self._flush()

    async def _copy_out(self):
        """The server's rows to the client, a batch a frame, as the client's credit allows."""
        while True:
            data, state = self._gather()
            if data:
                await self.stream.send(data, self.deadline)
            if state is _ENDING:
                return
            if state is None:
                await self._readable()
            else:  # a batch full: let the loop serve the others before the next one
                await asyncio.sleep(0)

    def _gather(self, batch=BATCH):
        """The rows libpq has, up to about *batch* bytes, and what then: _ENDING, None (wait), or more to read."""
        ptr, get, free, string_at = self.ptr, _pq.PQgetCopyData, _pq.PQfreemem, ctypes.string_at
        row = ctypes.c_void_p()
        where = ctypes.addressof(row)
        rows, size, fresh = [], 0, False
        while size < batch:
            length = get(ptr, where, 1)
            if length > 0:
                rows.append(string_at(row.value, length))
                free(row.value)
                size += length
            elif length == 0:
                if fresh:
                    return b"".join(rows), None
                if not _pq.PQconsumeInput(ptr):
                    raise self._broken()
                fresh = True
            elif length == -1:
                return b"".join(rows), _ENDING
            else:
                raise self._broken()
        return b"".join(rows), _OUT

    # -- giving up ---------------------------------------------------------------

    async def _abandon_at_timeout(self):
        """The job's timeout passed: stop the COPY; its outcome if it ended anyway, else a QueryTimeout.

        Past the data (or before any), a statement that cannot be stopped
        may still commit; in the middle of the data, a COPY is failed.
        """
        whole = self.phase in (_SENT, _ENDING)
        try:
            outcome = await self._abandon("the job's timeout passed")
        except psycopg2.Error as exc:
            if whole and not self.in_transaction:
                raise QueryOutcomeUnknown(
                    "the job's timeout passed and its COPY could not be stopped (%s): it may still commit; "
                    "check before you run it again" % exc
                ) from None
            raise QueryTimeout("the job's timeout passed and its COPY could not be stopped: %s" % exc) from None
        if whole and not isinstance(outcome, Exception):
            return outcome  # it ended just as the timeout fired: it did commit
        return QueryTimeout("the job's timeout passed; its COPY was stopped")

    async def _abandon(self, reason):
        """Stop the COPY on the server and read its end; its outcome. Closes the connection if that fails."""
        if self.conn.pgconn.closed:
            raise psycopg2.OperationalError("the connection to the database was lost")
        self.deadline = self.loop.time() + CLEANUP_GRACE
        try:
            if self.phase == _IN:
                await self._end_copy(reason)
            elif self.phase is not None:
                await self.cancel(self.conn)
                if self.phase == _OUT:
                    await self._drain()
            while True:
                status, outcome = await self._results()
                if status == _COPY_IN:
                    await self._end_copy(reason)
                elif status == _COPY_OUT:
                    await self._drain()
                else:
                    return outcome
        except (Exception, asyncio.CancelledError) as exc:
            logger.warning("could not stop a COPY (%s); closing its connection", exc)
            self.conn.close()
            raise psycopg2.OperationalError("the COPY could not be stopped: %s" % exc) from None

    async def _drain(self):
        """Read and drop the rest of a COPY TO STDOUT."""
        while True:
            _, state = self._gather()
            if state is _ENDING:
                return
            if state is None:
                await self._readable()

    # -- libpq's socket ------------------------------------------------------------

    async def _read_input(self):
        """Read what the server sent until libpq holds a whole result."""
        while True:
            if not _pq.PQconsumeInput(self.ptr):
                raise self._broken()
            if not _pq.PQisBusy(self.ptr):
                return
            await self._readable()

    async def _readable(self):
        ready = self.loop.create_future()
        self.conn.when_readable(functools.partial(set_done, ready))
        try:
            await until(self.loop, ready, self.deadline)
        finally:
            self.conn.when_readable(None)

    async def _flush(self, waiting=False):
        """Send what libpq holds; *waiting*: for the socket to take more first."""
        while True:
            if waiting:
                await wait_writable(self.loop, self.conn.pgconn.fileno(), self.deadline)
            unsent = _pq.PQflush(self.ptr)
            if not unsent:
                return
            if unsent < 0:
                raise self._broken()
            waiting = True

    def _hand_back(self):
        """Give the connection back to psycopg2, whose poll() finds it idle; close it if it broke."""
        if self.conn.pgconn.closed:
            return
        try:
            if self.conn.poll() != ext.POLL_OK:
                raise psycopg2.OperationalError("the connection was not idle after the COPY")
        except psycopg2.Error as exc:
            logger.warning("closing a connection after its COPY: %s", exc)
            self.conn.close()

    def _broken(self):
        """The OperationalError for a failed libpq call; the connection is closed if it broke."""
        message = _text(_pq.PQerrorMessage(self.ptr), self.codec) or "the connection to the database failed"
        if _pq.PQstatus(self.ptr) == _CONNECTION_BAD:
            self.conn.close()
        return psycopg2.OperationalError(message)

    def _server_error(self, result):
        """The psycopg2.errors class the server's error stands for, as psycopg2 would raise it."""
        sqlstate = (_pq.PQresultErrorField(result, _SQLSTATE) or b"").decode("ascii", "replace")
        full = _text(_pq.PQresultErrorMessage(result), self.codec)
        message = full.split(":  ", 1)[1] if full.startswith(("ERROR:  ", "FATAL:  ", "PANIC:  ")) else full
        try:
            cls = psycopg2.errors.lookup(sqlstate)
        except KeyError:
            cls = psycopg2.DatabaseError
        error = cls(message)
        error.__setstate__({"pgerror": full, "pgcode": sqlstate or None})
        return error


def _text(raw, codec):
    return (raw or b"").decode(codec, "replace")
