"""The asyncio client: many jobs in flight on one connection to the daemon.

Jobs are tagged with ids and replies matched to them as they arrive, in any
order, so one :class:`AsyncClient` serves every task of an event loop at once.
Cancelling the task that awaits a job tells the daemon to cancel the job, so a
query nobody waits for does not run on.

Replies are cut and handed to their jobs by an :class:`asyncio.Protocol`, with
no task of its own, so nothing is left pending when the loop closes. Each
connection is closed by an asynchronous generator its client starts and
holds: the loop closes such generators when it shuts down (``asyncio.run``
does), and when they are collected with a client nobody holds any more. The
protocol holds no reference to its client, so that it can be.
"""

import asyncio
import collections.abc
import itertools
import socket as socketlib
import sys
from types import TracebackType
from typing import Any, AsyncGenerator, AsyncIterator, Coroutine, Dict, Generator, NoReturn, Optional, Type, Union

from .copy_client import CopyMethods, copy_on_connection
from .errors import Error, QueryTimeout, ServiceUnavailable
from .jobs import COMMIT, ROLLBACK, STREAM_DECLARE, STREAM_FETCH, Job, Params, Row, loads_reply, transaction_options
from .subscriptions import AsyncSubscription
from .queries import (
    REPLY_GRACE,
    Awaiting,
    AwaitingTransactionJobs,
    check_size,
    connect_error,
    encode_job,
    resolve_address,
)
from .wire import MSG_CANCEL, MSG_ERROR, MSG_JOB, ClientHandshake, FrameError, FrameReader, encode_frame

#: Bytes buffered for the daemon before a sender waits for the socket to drain.
WRITE_HIGH_WATER = 256 * 1024


class _Connection(asyncio.Protocol):
    """One authenticated connection to the daemon: the handshake, then replies to their jobs.

    It holds the futures of the jobs waiting on it, never the client.
    """

    def __init__(self, authkey: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.transport: Any = None  # an asyncio.Transport, from connection_made() on
        self.ready: "asyncio.Future[None]" = loop.create_future()  # the handshake's outcome
        self.max_frame: Optional[int] = None  # the largest job the daemon takes, from the handshake
        self.replies: "Dict[int, asyncio.Future[Any]]" = {}  # job id -> the future of the job waiting for it
        # job id -> what takes the frames of a job of many (a COPY's, a subscription's)
        self.streams: Dict[int, Any] = {}
        self.lost: Optional[BaseException] = None  # once the connection ended: the error for every job
        self._handshake_state = ClientHandshake(authkey)
        self._frames = FrameReader(self._handshake_state.frame_limit)
        self._drained: "Optional[asyncio.Future[None]]" = None  # while the daemon reads more slowly than we write
        self._ids = itertools.count(1)

    # -- asyncio's side ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._frames.feed(data)
        try:
            while True:
                frame = self._frames.next_frame()
                if frame is None:
                    return
                if self.ready.done():
                    self._reply(*frame)
                else:
                    self._handshake(*frame)
        except (FrameError, Error) as exc:
            self._end(exc if isinstance(exc, Error) else ServiceUnavailable(str(exc)))

    def connection_lost(self, exc: Optional[Exception]) -> None:
        reason = "closed the connection" if exc is None else "lost the connection: %s" % exc
        self._end(ServiceUnavailable("the dbservice daemon %s" % reason))

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- the client's side -------------------------------------------------------

    def send(self, kind: int, payload: bytes, reply: "Optional[asyncio.Future[Any]]" = None) -> int:
        """Write one frame; its reply, if *reply* (a future) is given, goes to it. Return its job id."""
        job_id = next(self._ids)
        if reply is not None:
            self.replies[job_id] = reply
        self.transport.write(encode_frame(job_id, kind, payload))
        return job_id

    def cancel(self, job_id: int) -> None:
        """Ask the daemon to cancel job *job_id*; its reply, if one still comes, is dropped."""
        self.replies.pop(job_id, None)
        self.transport.write(encode_frame(job_id, MSG_CANCEL, b""))

    async def drain(self) -> None:
        if self._drained is not None:
            await self._drained

    def open_stream(self, receiver: Any) -> int:
        """A job id whose frames, its reply among them, go to ``receiver.frame(kind, payload)``.

        ``receiver.lost(error)`` is called if the connection ends first; close it with :meth:`close_stream`.
        """
        job_id = next(self._ids)
        self.streams[job_id] = receiver
        return job_id

    def close_stream(self, job_id: int) -> None:
        self.streams.pop(job_id, None)

    def write_nowait(self, job_id: int, kind: int, payload: bytes) -> None:
        """Write one frame of job *job_id*; the transport buffers what the socket does not take yet."""
        self.transport.write(encode_frame(job_id, kind, payload))

    async def write(self, job_id: int, kind: int, payload: bytes) -> None:
        """Write one frame of job *job_id*, then wait while the daemon reads more slowly than we write."""
        if self.lost is not None:
            raise self.lost
        self.transport.write(encode_frame(job_id, kind, payload))
        if self.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self.drain()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _handshake(self, job_id: int, kind: int, payload: bytes) -> None:
        answer = self._handshake_state.receive(kind, payload)
        if answer is not None:
            self.transport.write(answer)
            self._frames.max_size = self._handshake_state.frame_limit
        else:
            self.max_frame = self._handshake_state.max_frame
            self._frames.max_size = sys.maxsize  # the daemon is trusted now
            self.ready.set_result(None)

    def _reply(self, job_id: int, kind: int, body: bytes) -> None:
        if job_id == 0 and kind == MSG_ERROR:  # the daemon dropped us, saying why
            self._end(loads_reply(body))
            return
        reply = self.replies.pop(job_id, None)
        if reply is None:
            stream = self.streams.get(job_id)
            if stream is not None:
                stream.frame(kind, body)
            return  # else a job given up on or cancelled here, or one nobody waits for
        if reply.done():
            return
        value = loads_reply(body)
        if kind == MSG_ERROR:
            reply.set_exception(value)
        else:
            reply.set_result(value)

    def _end(self, error: BaseException) -> None:
        if self.lost is None:
            self.lost = error
        self.close()
        if not self.ready.done():
            self.ready.set_exception(error)
        replies, self.replies = self.replies, {}
        for reply in replies.values():
            if not reply.done():
                reply.set_exception(self.lost)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.lost(self.lost)
        self.resume_writing()


async def _closes_with_loop(connection: _Connection) -> AsyncGenerator[None, None]:
    """An asynchronous generator the loop closes as it shuts down, closing *connection*."""
    try:
        yield
    finally:
        connection.close()


class AsyncClient(Awaiting, CopyMethods[Coroutine[Any, Any, int]]):
    """An asyncio client of a dbservice daemon; build it with :func:`connect_async`.

    The query methods are those of :class:`~dbservice.Client`, as coroutines:
    ``await client.fetchall(sql, params, timeout=...)``. It belongs to the
    event loop it was connected on: make one per event loop, open it where
    the app starts (a web framework's lifespan) and close it where it stops,
    or use it as ``async with``.
    """

    def __init__(
        self, socket: str, authkey: bytes, timeout: Optional[float] = None, connect_timeout: float = 10.0
    ) -> None:
        self.socket = socket
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._authkey = authkey
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._connection: Optional[_Connection] = None
        self._closer: Optional[AsyncGenerator[None, None]] = None  # the _closes_with_loop generator of the connection
        self._connecting: Optional[asyncio.Lock] = None
        self._tx_ids = itertools.count(1)
        self.closed = False

    def __repr__(self) -> str:
        return "<dbservice.AsyncClient %s%s>" % (self.socket, " closed" if self.closed else "")

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise Error(
                "this AsyncClient belongs to the event loop it was connected on, not to this one; "
                "make one client per event loop (or thread), with dbservice.connect_async() in it"
            )

    async def connect(self) -> None:
        """Open and authenticate the connection unless it is open already; ServiceUnavailable if no daemon answers."""
        self._check_loop()
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._connection is not None and self._connection.lost is None:
                return
            try:
                connection = await asyncio.wait_for(_open(self.socket, self._authkey), self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                raise connect_error(self.socket, exc, self.connect_timeout) from None
            self._connection = connection
            self._closer = _closes_with_loop(connection)
            await self._closer.__anext__()

    async def run(self, job: Job) -> Any:
        """Send *job* (a :class:`dbservice.jobs.Job`) and return its result: what the query methods are made of.

        For layers on top of the client (the asyncio DB-API connection).
        """
        return await self._run(job)

    @property
    def connection(self) -> object:
        """The connection to the daemon the next job goes on (None before the first), as an opaque token.

        A new one after the old one ended (the daemon restarted): the
        transactions begun on the old one were lost with it.
        """
        return self._connection

    def abort(self) -> None:
        """Close at once, without waiting, from the loop's thread: jobs waiting get ServiceUnavailable."""
        self.closed = True
        if self._connection is not None:
            self._connection.close()

    async def _run(self, job: Job) -> Any:
        if self.closed:
            raise Error("this dbservice client is closed")
        self._check_loop()
        payload = encode_job(job)
        if self._connection is None or self._connection.lost is not None:
            await self.connect()
        connection: _Connection = self._connection  # type: ignore[assignment]  # connect() opened it
        check_size(payload, connection.max_frame)  # type: ignore[arg-type]  # the handshake set it
        loop: asyncio.AbstractEventLoop = self._loop  # type: ignore[assignment]  # _check_loop() set it
        reply = loop.create_future()
        timer = None
        if job.timeout is not None:
            timer = loop.call_later(job.timeout + REPLY_GRACE, _give_up, reply, job.timeout + REPLY_GRACE)
        job_id = connection.send(MSG_JOB, payload, reply)
        try:
            if connection.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await connection.drain()
            return await reply
        except asyncio.CancelledError:
            # Cancelling us cancelled *reply* too; only a reply that really
            # came means the daemon has nothing left to cancel.
            answered = reply.done() and not reply.cancelled()
            if not answered and connection.lost is None:
                connection.cancel(job_id)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            connection.replies.pop(job_id, None)

    async def run_copy(self, job: Job, file: Any, size: int = 8192) -> Any:
        """Run a COPY *job*, streaming *file* (see copy_client.py); its rowcount. For layers on top of the client."""
        return await self._copy(job, file, size)

    async def _copy(self, job: Job, file: Any, size: int) -> Any:
        """Run a COPY job on the connection, streaming *file* (see copy_client.py)."""
        if self.closed:
            raise Error("this dbservice client is closed")
        self._check_loop()
        if self._connection is None or self._connection.lost is not None:
            await self.connect()
        return await copy_on_connection(self._connection, job, file, size)

    def _send_only(self, job: Job) -> None:
        """Send *job* with nobody to wait for its reply, if the connection is still up."""
        if self._connection is not None and self._connection.lost is None:
            self._connection.send(MSG_JOB, encode_job(job))

    def transaction(
        self, isolation_level: Union[str, int, None] = None, readonly: Optional[bool] = None,
        deferrable: Optional[bool] = None, timeout: Optional[float] = None,
    ) -> "AsyncTransaction":
        """``async with client.transaction() as tx:`` runs tx's jobs in one transaction.

        See :meth:`dbservice.Client.transaction`.
        """
        options = transaction_options(isolation_level, readonly, deferrable)
        return AsyncTransaction(self, options, self.timeout if timeout is None else timeout)

    def listen(self, *channels: str, timeout: Optional[float] = None) -> AsyncSubscription:
        """An :class:`~dbservice.subscriptions.AsyncSubscription` to *channels*: ``async for n in client.listen(...)``.

        ``await`` it (or ``async with`` it) to be subscribed before going on;
        iterating subscribes first too. *timeout* bounds each wait, ending the
        iteration when it passes. See :meth:`dbservice.Client.listen`.
        """
        return AsyncSubscription(self, channels, timeout)

    async def iterate(
        self, sql: str, params: Params = None, *, batch: int = 1000, timeout: Optional[float] = None
    ) -> AsyncIterator[Row]:
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

    async def close(self) -> None:
        """Close the connection; jobs still waiting get ServiceUnavailable."""
        self.closed = True
        if self._connection is not None:
            self._connection.close()
        if self._closer is not None:
            closer, self._closer = self._closer, None
            await closer.aclose()

    def __enter__(self) -> NoReturn:
        raise TypeError("use `async with` with an AsyncClient")

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncTransaction(AwaitingTransactionJobs, CopyMethods[Coroutine[Any, Any, int]]):
    """Jobs that run on one pinned connection and commit or roll back together.

    Get one from :meth:`AsyncClient.transaction`; its query methods are the
    client's. Leaving the ``async with`` block commits, or rolls back if it
    raised.
    """

    _client: AsyncClient

    async def __aenter__(self) -> "AsyncTransaction":
        begin = self._begin_job()
        try:
            await self._client._run(begin)
        except (asyncio.CancelledError, QueryTimeout):
            # The BEGIN may have run with its reply lost to us: a ROLLBACK
            # after it, which the daemon takes in order, leaves nothing open.
            self._client._send_only(self._end_job(ROLLBACK))
            raise
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if self._tx is None:
            return
        if exc_type is None:
            await self.commit()
        else:
            try:
                await self.rollback()
            except Error:
                pass  # the block's own exception is the one to see

    async def _copy(self, job: Job, file: Any, size: int) -> Any:
        if self._tx is None:
            raise Error("the transaction is not open: use it as a context manager")
        return await self._client._copy(job, file, size)

    async def commit(self) -> None:
        await self._client._run(self._end_job(COMMIT))

    async def rollback(self) -> None:
        await self._client._run(self._end_job(ROLLBACK))


def _give_up(reply: "asyncio.Future[Any]", waited: float) -> None:
    if not reply.done():
        reply.set_exception(QueryTimeout("no reply from the dbservice daemon within %.1f s" % waited))


async def _open(path: str, authkey: bytes) -> _Connection:
    """Connect to the daemon at *path* and pass the handshake; the _Connection."""
    loop = asyncio.get_running_loop()
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
        _, connection = await loop.create_unix_connection(lambda: _Connection(authkey), sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        await connection.ready
    except BaseException:
        connection.close()
        raise
    return connection


class _Connecting(collections.abc.Coroutine):  # type: ignore[type-arg]  # a Coroutine[Any, Any, AsyncClient]
    """What :func:`connect_async` returns: a coroutine to await, or a context for ``async with``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._connected = self._connect()

    async def _connect(self) -> AsyncClient:
        await self._client.connect()
        return self._client

    def send(self, value: Any) -> Any:
        return self._connected.send(value)

    def throw(self, *exc_info: Any) -> Any:
        return self._connected.throw(*exc_info)

    def close(self) -> None:
        return self._connected.close()

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return self._connected.__await__()

    async def __aenter__(self) -> AsyncClient:
        return await self._connected

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()


def connect_async(
    socket: Optional[str] = None, authkey: Optional[bytes] = None, timeout: Optional[float] = None
) -> _Connecting:
    """Connect to a dbservice daemon: ``db = await connect_async()`` or ``async with connect_async() as db``.

    The arguments and their defaults are those of :func:`dbservice.connect`.
    Raises ServiceUnavailable if no daemon answers there.
    """
    socket, authkey = resolve_address(socket, authkey)
    return _Connecting(AsyncClient(socket, authkey, timeout=timeout))
