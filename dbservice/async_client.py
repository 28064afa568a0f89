"""The asyncio client: many jobs in flight on one connection to the daemon.

Jobs are tagged with ids and replies matched to them as they arrive, in any
order, so one :class:`AsyncClient` serves every task of an event loop at once.
Cancelling the task that awaits a job tells the daemon to cancel the job, so a
query nobody waits for does not run on.
"""

import asyncio
import itertools
import sys

from .client import REPLY_GRACE, _encode, _QueryMethods, _TransactionJobs, resolve_address
from .errors import Error, QueryTimeout, ServiceUnavailable
from .jobs import FETCH_COMMIT, FETCH_ROLLBACK, STREAM_DECLARE, STREAM_FETCH, loads_reply, transaction_options
from .wire import (
    MAX_AUTH_FRAME,
    MAX_REFUSAL_FRAME,
    MSG_AUTH,
    MSG_CANCEL,
    MSG_ERROR,
    MSG_JOB,
    answer_challenge,
    check_verdict,
    encode_frame,
    new_challenge,
    read_frame,
)

#: Bytes buffered for the daemon before a sender waits for the socket to drain.
WRITE_HIGH_WATER = 256 * 1024


class AsyncClient(_QueryMethods):
    """An asyncio client of a dbservice daemon; build it with :func:`connect_async`.

    The query methods are those of :class:`~dbservice.Client`, as coroutines:
    ``await client.fetchall(sql, params, timeout=...)``. Use it from the event
    loop it was connected on.
    """

    def __init__(self, socket, authkey, timeout=None, connect_timeout=10.0):
        self.socket = socket
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._authkey = authkey
        self._writer = None
        self._reading = None
        self._pending = {}
        self._ids = itertools.count(1)
        self._tx_ids = itertools.count(1)
        self._connecting = asyncio.Lock()
        self.closed = False

    def __repr__(self):
        return "<dbservice.AsyncClient %s%s>" % (self.socket, " closed" if self.closed else "")

    async def _connect(self):
        """Open and authenticate the connection unless it is open already."""
        async with self._connecting:
            if self._writer is not None:
                return
            try:
                reader, writer = await asyncio.wait_for(
                    _open_authenticated(self.socket, self._authkey), self.connect_timeout
                )
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ServiceUnavailable(
                    "no dbservice daemon listens on %s (%s); start it with `dbserviced start`"
                    % (self.socket, exc.strerror)
                ) from None
            except asyncio.TimeoutError:
                raise ServiceUnavailable(
                    "the dbservice daemon on %s did not answer within %.1f s" % (self.socket, self.connect_timeout)
                ) from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise ServiceUnavailable("cannot connect to the dbservice daemon on %s: %s" % (self.socket, exc)) from None
            self._writer = writer
            self._reading = asyncio.ensure_future(self._read_replies(reader, writer))

    async def _run(self, job):
        if self.closed:
            raise Error("this dbservice client is closed")
        payload = _encode(job)
        if self._writer is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        job_id = next(self._ids)
        reply = loop.create_future()
        self._pending[job_id] = reply
        writer = self._writer
        timer = None
        if job.timeout is not None:
            timer = loop.call_later(job.timeout + REPLY_GRACE, _give_up, reply, job.timeout + REPLY_GRACE)
        try:
            writer.write(encode_frame(job_id, MSG_JOB, payload))
            if writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await writer.drain()
            return await reply
        except asyncio.CancelledError:
            # Cancelling us cancelled *reply* too; only a reply that really
            # came means the daemon has nothing left to cancel.
            answered = reply.done() and not reply.cancelled()
            if not answered and not writer.is_closing():
                writer.write(encode_frame(job_id, MSG_CANCEL, b""))
            raise
        except ConnectionError as exc:
            raise ServiceUnavailable("lost the connection to the dbservice daemon: %s" % exc) from None
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(job_id, None)

    async def _read_replies(self, reader, writer):
        """Hand each reply to the job waiting for it, until the connection ends."""
        error = ServiceUnavailable("the dbservice daemon closed the connection")
        try:
            while True:
                job_id, kind, body = await read_frame(reader, sys.maxsize)
                if job_id == 0 and kind == MSG_ERROR:  # the daemon dropped us
                    error = loads_reply(body)
                    break
                reply = self._pending.get(job_id)
                if reply is None or reply.done():
                    continue  # a job given up on or cancelled here
                value = loads_reply(body)
                if kind == MSG_ERROR:
                    reply.set_exception(value)
                else:
                    reply.set_result(value)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                error = ServiceUnavailable("lost the connection to the dbservice daemon: %s" % exc)
        finally:
            # The next job opens a new connection (after a daemon restart, say).
            if self._writer is writer:
                self._writer = None
            writer.close()
            for reply in list(self._pending.values()):
                if not reply.done():
                    reply.set_exception(error)

    def transaction(self, isolation_level=None, readonly=None, deferrable=None, timeout=None):
        """``async with client.transaction() as tx:`` runs tx's jobs in one transaction.

        See :meth:`dbservice.Client.transaction`.
        """
        options = transaction_options(isolation_level, readonly, deferrable)
        return AsyncTransaction(self, options, self.timeout if timeout is None else timeout)

    async def iterate(self, sql, params=None, *, batch=1000, timeout=None):
        """Yield the rows of *sql*, fetched *batch* at a time through a server-side cursor.

        Close the generator if you stop early (``contextlib.aclosing``), so
        its transaction ends at once rather than when it is collected.
        """
        async with self.transaction(timeout=timeout) as tx:
            await tx.execute(STREAM_DECLARE + sql, params)
            while True:
                rows = await tx.fetchall(STREAM_FETCH, [batch])
                for row in rows:
                    yield row
                if len(rows) < batch:
                    return

    async def close(self):
        """Close the connection; jobs still waiting get ServiceUnavailable."""
        self.closed = True
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)

    def __enter__(self):
        raise TypeError("use `async with` with an AsyncClient")

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.close()


class AsyncTransaction(_TransactionJobs):
    """Jobs that run on one pinned connection and commit or roll back together.

    Get one from :meth:`AsyncClient.transaction`; its query methods are the
    client's. Leaving the ``async with`` block commits, or rolls back if it
    raised.
    """

    async def __aenter__(self):
        await self._client._run(self._begin_job())
        return self

    async def __aexit__(self, exc_type, exc, tb):
        if self._tx is None:
            return
        if exc_type is None:
            await self.commit()
        else:
            try:
                await self.rollback()
            except Error:
                pass  # the block's own exception is the one to see

    async def commit(self):
        await self._client._run(self._end_job(FETCH_COMMIT))

    async def rollback(self):
        await self._client._run(self._end_job(FETCH_ROLLBACK))


def _give_up(reply, waited):
    if not reply.done():
        reply.set_exception(QueryTimeout("no reply from the dbservice daemon within %.1f s" % waited))


async def _open_authenticated(path, authkey):
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        _, kind, challenge = await read_frame(reader, MAX_REFUSAL_FRAME)
        ours = new_challenge()
        writer.write(encode_frame(0, MSG_AUTH, answer_challenge(authkey, kind, challenge) + ours))
        _, _, verdict = await read_frame(reader, MAX_AUTH_FRAME)
        check_verdict(authkey, ours, verdict)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def connect_async(socket=None, authkey=None, timeout=None):
    """Connect to a dbservice daemon and return an :class:`AsyncClient`.

    The arguments and their defaults are those of :func:`dbservice.connect`.
    Raises ServiceUnavailable if no daemon answers there.
    """
    socket, authkey = resolve_address(socket, authkey)
    client = AsyncClient(socket, authkey, timeout=timeout)
    await client._connect()
    return client
