"""The client library: submit jobs to a dbservice daemon and wait for replies.

:class:`Client` talks to a daemon over its Unix socket. It is thread-safe:
each thread gets a connection of its own (opened on its first job), so threads
never wait on each other. It is fork-safe: a child process forked after
:func:`connect` opens its own connections rather than share the parent's.

:class:`~dbservice.QueueClient`, in :mod:`dbservice.queue_client`, talks to a
:class:`~dbservice.DBService` child through its job queue instead.
"""

import itertools
import os
import threading
import weakref

from .channel import Channel
from .errors import Error
from .jobs import COMMIT, ROLLBACK, STREAM_DECLARE, STREAM_FETCH, transaction_options
from .queries import ChannelLost, QueryMethods, TransactionJobs, encode_job, resolve_address
from .wire import MSG_JOB, MSG_PAUSE, MSG_RESUME, MSG_STATUS


class Transaction(TransactionJobs):
    """Jobs that run on one pinned connection and commit or roll back together.

    Get one from :meth:`Client.transaction`; its query methods are the
    client's. Leaving the ``with`` block commits, or rolls back if it raised.
    Its jobs travel on the connection to the daemon it began on, whichever
    thread sends them: a thread that ends it (closing an ``iterate()`` begun
    elsewhere, say) ends it for real.
    """

    _channel = None

    def __enter__(self):
        self._channel = self._client._channel()
        self._call(self._begin_job())
        return self

    def _call(self, job):
        return self._client._call_on(self._channel, job)

    def __exit__(self, exc_type, exc, tb):
        if self._tx is None:
            return
        if exc_type is None:
            self.commit()
        else:
            try:
                self.rollback()
            except Error:
                pass  # the block's own exception is the one to see

    def commit(self):
        self._call(self._end_job(COMMIT))

    def rollback(self):
        self._call(self._end_job(ROLLBACK))


_live_clients = weakref.WeakSet()


class Client(QueryMethods):
    """A thread-safe, fork-safe client of a dbservice daemon's Unix socket.

    Build it with :func:`connect`. Every query method takes ``timeout=``
    (seconds, covering the wait in the daemon's queue and the query itself);
    the client's own *timeout* is the default.
    """

    def __init__(self, socket, authkey, timeout=None, connect_timeout=10.0):
        self.socket = socket
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._authkey = authkey
        self._lock = threading.Lock()
        self._local = threading.local()
        # Weak: a thread's channel lives in its thread-local and closes when
        # the thread ends, so one thread per request leaks nothing.
        self._channels = weakref.WeakSet()
        self._tx_ids = itertools.count(1)
        self.closed = False
        _live_clients.add(self)

    def __repr__(self):
        return "<dbservice.Client %s%s>" % (self.socket, " closed" if self.closed else "")

    def _channel(self):
        """This thread's connection to the daemon, opened on its first use or after it was lost."""
        channel = getattr(self._local, "channel", None)
        if channel is None or channel.closed:
            channel = Channel(self.socket, self._authkey, self.connect_timeout)
            self._local.channel = channel
            with self._lock:
                self._channels.add(channel)
        return channel

    def _drop(self, channel):
        channel.close()
        with self._lock:
            self._channels.discard(channel)

    def transaction(self, isolation_level=None, readonly=None, deferrable=None, timeout=None):
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

    def iterate(self, sql, params=None, *, batch=1000, timeout=None):
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

    def status(self):
        """The daemon's figures: pool, queue, jobs, latency (``dbserviced status --json``)."""
        return self._request(MSG_STATUS, b"", self.connect_timeout)

    def pause(self, timeout):
        """Pause the daemon (``dbserviced pause``); its figures once no connection is open, or after *timeout*."""
        return self._request(MSG_PAUSE, b"%r" % float(timeout), timeout)

    def resume(self):
        """Resume a paused daemon (``dbserviced resume``); its figures, with the jobs it held."""
        return self._request(MSG_RESUME, b"", self.connect_timeout)

    def _run(self, job):
        return self._request(MSG_JOB, encode_job(job), job.timeout)

    def _call_on(self, channel, job):
        """Run *job* on *channel*, the connection its transaction began on, and on no other."""
        if self.closed:
            raise Error("this dbservice client is closed")
        try:
            return channel.call(encode_job(job), job.timeout)
        except ChannelLost as lost:
            self._drop(channel)
            raise lost.error from None

    def _request(self, kind, payload, timeout):
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

    def close(self):
        """Close every thread's connection to the daemon."""
        self.closed = True
        with self._lock:
            channels, self._channels = list(self._channels), weakref.WeakSet()
        for channel in channels:
            channel.close()

    def _after_fork(self):
        # The parent's sockets belong to the parent: forget them, close our
        # copies of their file descriptors (that does not touch the parent's).
        for channel in list(self._channels):
            channel.close()
        self._channels = weakref.WeakSet()
        self._local = threading.local()
        self._lock = threading.Lock()


def _reset_after_fork():
    for client in list(_live_clients):
        client._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def connect(socket=None, authkey=None, timeout=None):
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


