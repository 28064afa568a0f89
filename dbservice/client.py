"""The client library: submit jobs to a dbservice daemon and wait for replies.

:class:`Client` talks to a daemon over its Unix socket. It is thread-safe:
each thread gets a connection of its own (opened on its first job), so threads
never wait on each other. It is fork-safe: a child process forked after
:func:`connect` opens its own connections rather than share the parent's.

:class:`~dbservice.QueueClient`, in :mod:`dbservice.queue_client`, talks to a
:class:`~dbservice.DBService` child through its job queue instead.
"""

import itertools
from types import TracebackType
from typing import Any, Dict, Iterator, Optional, Type, Union, cast

from .channel import Channel
from .copy_client import CopyMethods, copy_on_channel
from .errors import Error
from .jobs import COMMIT, ROLLBACK, STREAM_DECLARE, STREAM_FETCH, Job, Params, Row, transaction_options
from .queries import Blocking, BlockingTransactionJobs, ChannelLost, ThreadChannels, encode_job, resolve_address
from .subscriptions import Subscription
from .wire import MSG_JOB, MSG_PAUSE, MSG_RESUME, MSG_STATUS


class Transaction(BlockingTransactionJobs, CopyMethods[int]):
    """Jobs that run on one pinned connection and commit or roll back together.

    Get one from :meth:`Client.transaction`; its query methods are the
    client's. Leaving the ``with`` block commits, or rolls back if it raised.
    Its jobs travel on the connection to the daemon it began on, whichever
    thread sends them: a thread that ends it (closing an ``iterate()`` begun
    elsewhere, say) ends it for real.
    """

    _channel: Channel = None  # type: ignore[assignment]  # until __enter__, before any of its jobs
    _client: "Client"

    def __enter__(self) -> "Transaction":
        self._channel = self._client._channel()
        self._call(self._begin_job())
        return self

    def _call(self, job: Job) -> Any:
        return self._client._call_on(self._channel, job)

    def _copy(self, job: Job, file: Any, size: int) -> Any:
        if self._tx is None:
            raise Error("the transaction is not open: use it as a context manager")
        return self._client._copy_on(self._channel, job, file, size)

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if self._tx is None:
            return
        if exc_type is None:
            self.commit()
        else:
            try:
                self.rollback()
            except Error:
                pass  # the block's own exception is the one to see

    def commit(self) -> None:
        self._call(self._end_job(COMMIT))

    def rollback(self) -> None:
        self._call(self._end_job(ROLLBACK))


class Client(Blocking, ThreadChannels[Channel], CopyMethods[int]):
    """A thread-safe, fork-safe client of a dbservice daemon's Unix socket.

    Build it with :func:`connect`. Every query method takes ``timeout=``
    (seconds, covering the wait in the daemon's queue and the query itself);
    the client's own *timeout* is the default.
    """

    def __init__(
        self, socket: str, authkey: bytes, timeout: Optional[float] = None, connect_timeout: float = 10.0
    ) -> None:
        self.socket = socket
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._authkey = authkey
        self._tx_ids = itertools.count(1)
        self.closed = False
        self._init_channels()

    def __repr__(self) -> str:
        return "<dbservice.Client %s%s>" % (self.socket, " closed" if self.closed else "")

    def _open_channel(self) -> Channel:
        return Channel(self.socket, self._authkey, self.connect_timeout)

    def transaction(
        self, isolation_level: Union[str, int, None] = None, readonly: Optional[bool] = None,
        deferrable: Optional[bool] = None, timeout: Optional[float] = None,
    ) -> Transaction:
        """``with client.transaction() as tx:`` runs tx's jobs in one transaction.

        The block's jobs run on one pooled connection, pinned for it; leaving
        the block commits, or rolls back if it raised. *isolation_level*
        ("read committed", "repeatable read", "serializable", or psycopg2's
        ISOLATION_LEVEL_* numbers), *readonly* and *deferrable* are those of
        psycopg2's ``set_session()``. A transaction belongs to the thread that
        began it. Left idle past the daemon's idle_in_transaction_timeout, it
        is rolled back, and its next statement or commit raises.
        """
        options = transaction_options(isolation_level, readonly, deferrable)
        return Transaction(self, options, self.timeout if timeout is None else timeout)

    def iterate(
        self, sql: str, params: Params = None, *, batch: int = 1000, timeout: Optional[float] = None
    ) -> Iterator[Row]:
        """Yield the rows of *sql*, fetched *batch* at a time through a server-side cursor.

        Neither the daemon nor this process holds more than a batch at a time.
        The rows come from one transaction, which ends when the generator is
        exhausted or closed (close it if you stop early).
        """
        with self.transaction(timeout=timeout) as tx:
            tx.execute(STREAM_DECLARE + sql, params)
            while True:
                rows = tx.fetchall(STREAM_FETCH, [batch])
                yield from rows
                if len(rows) < batch:
                    return

    def listen(self, *channels: str, timeout: Optional[float] = None) -> Subscription:
        """A :class:`~dbservice.subscriptions.Subscription` to *channels*, subscribed when this returns.

        Iterate over it for :class:`~dbservice.Notification` objects (and
        :class:`~dbservice.NotificationsLost` markers where some may be
        missing); *timeout* bounds each wait, ending the iteration when it
        passes. It has a socket of its own; close it when done.
        """
        return Subscription(self.socket, self._authkey, self.connect_timeout, channels, timeout)

    def status(self) -> Dict[str, Any]:
        """The daemon's figures: pool, queue, jobs, latency (``dbserviced status --json``)."""
        return cast(Dict[str, Any], self._request(MSG_STATUS, b"", self.connect_timeout))

    def pause(self, timeout: float) -> Dict[str, Any]:
        """Pause the daemon (``dbserviced pause``); its figures once no connection is open, or after *timeout*."""
        return cast(Dict[str, Any], self._request(MSG_PAUSE, b"%r" % float(timeout), timeout))

    def resume(self) -> Dict[str, Any]:
        """Resume a paused daemon (``dbserviced resume``); its figures, with the jobs it held."""
        return cast(Dict[str, Any], self._request(MSG_RESUME, b"", self.connect_timeout))

    def _run(self, job: Job) -> Any:
        return self._request(MSG_JOB, encode_job(job), job.timeout)

    def _call_on(self, channel: Channel, job: Job) -> Any:
        """Run *job* on *channel*, the connection its transaction began on, and on no other."""
        if self.closed:
            raise Error("this dbservice client is closed")
        try:
            return channel.call(encode_job(job), job.timeout)
        except ChannelLost as lost:
            self._drop(channel)
            raise lost.error from None

    def _copy(self, job: Job, file: Any, size: int) -> Any:
        """Run a COPY job on this thread's connection, streaming *file* (see copy_client.py)."""
        if self.closed:
            raise Error("this dbservice client is closed")
        for attempt in (1, 2):
            channel = self._channel()
            try:
                return copy_on_channel(channel, job, file, size)
            except ChannelLost as lost:
                self._drop(channel)
                # Never sent (the daemon restarted since our last job): nothing of the file was read.
                if not (lost.unsent and attempt == 1):
                    raise lost.error from None

    def _copy_on(self, channel: Channel, job: Job, file: Any, size: int) -> Any:
        """Run a COPY job on *channel*, its transaction's, and on no other."""
        if self.closed:
            raise Error("this dbservice client is closed")
        try:
            return copy_on_channel(channel, job, file, size)
        except ChannelLost as lost:
            self._drop(channel)
            raise lost.error from None

    def _request(self, kind: int, payload: bytes, timeout: Optional[float]) -> Any:
        if self.closed:
            raise Error("this dbservice client is closed")
        for attempt in (1, 2):
            channel = self._channel()
            try:
                return channel.call(payload, timeout, kind)
            except ChannelLost as lost:
                self._drop(channel)
                # A job that never left (the daemon restarted since our last
                # one) is sent once more on a new connection; any other loss
                # may have run it, so it is the caller's to decide.
                if not (lost.unsent and attempt == 1):
                    raise lost.error from None

def connect(socket: Optional[str] = None, authkey: Optional[bytes] = None, timeout: Optional[float] = None) -> Client:
    """Connect to a dbservice daemon and return a :class:`Client`.

    *socket* defaults to ``$DBSERVICE_SOCKET``, else the socket in the default
    state directory (``$DBSERVICE_HOME`` or ``~/.local/state/dbservice``).
    *authkey* defaults to the ``secret`` file next to the socket. *timeout* is
    the default per-job timeout in seconds (None: no limit).

    Raises ServiceUnavailable if no daemon answers there.
    """
    socket, authkey = resolve_address(socket, authkey)
    client = Client(socket, authkey, timeout=timeout)
    client._channel()  # fail now, not on the first query, if nobody is there
    return client


