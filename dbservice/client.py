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
import pickle
import socket as socketlib
import sys
import threading
import time
import weakref

import psycopg2

from .config import SECRET_NAME, SOCKET_NAME, default_state_dir
from .errors import Error, JobRefused, QueryTimeout, ServiceUnavailable
from .jobs import (
    FETCH_ALL,
    FETCH_BEGIN,
    FETCH_COMMIT,
    FETCH_MANY,
    FETCH_ONE,
    FETCH_ROLLBACK,
    FETCH_ROWCOUNT,
    FETCH_TABLE,
    FETCH_VALUE,
    PICKLE_PROTOCOL,
    STREAM_DECLARE,
    STREAM_FETCH,
    Job,
    loads_reply,
    transaction_options,
)
from .wire import MSG_ERROR, MSG_JOB, MSG_STATUS, FrameReader, OversizedFrame, client_handshake, encode_frame

#: Bytes asked of the socket at a time: most replies come in one receive.
RECEIVE_BYTES = 65536

#: Seconds the client waits beyond a job's timeout for the daemon's own
#: QueryTimeout reply, before it gives up on the daemon itself.
REPLY_GRACE = 10.0


class _QueryMethods:
    """The query methods of every client; subclasses provide ``_run(job)``."""

    timeout = None
    _tx = None  # the id of the transaction the jobs belong to, if any

    def fetchall(self, sql, params=None, *, timeout=None):
        """Run *sql* and return all its rows as a list of tuples."""
        return self._submit(sql, params, FETCH_ALL, timeout)

    def fetchone(self, sql, params=None, *, timeout=None):
        """Run *sql* and return its first row as a tuple, or None."""
        return self._submit(sql, params, FETCH_ONE, timeout)

    def fetchval(self, sql, params=None, *, timeout=None):
        """Run *sql* and return the first column of its first row, or None."""
        return self._submit(sql, params, FETCH_VALUE, timeout)

    def fetchtable(self, sql, params=None, *, timeout=None):
        """Run *sql* and return ``(column_names, rows)``."""
        return self._submit(sql, params, FETCH_TABLE, timeout)

    def execute(self, sql, params=None, *, timeout=None):
        """Run *sql* and return the number of rows it affected."""
        return self._submit(sql, params, FETCH_ROWCOUNT, timeout)

    def executemany(self, sql, seq_of_params, *, timeout=None):
        """Run *sql* once per parameter set, all in one transaction; return the total rowcount."""
        return self._submit(sql, list(seq_of_params), FETCH_MANY, timeout)

    def _submit(self, sql, params, fetch, timeout):
        if timeout is None:
            timeout = self.timeout
        return self._run(Job(sql, params, fetch, timeout, self._tx))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _encode(job):
    try:
        return pickle.dumps(job.to_wire(), PICKLE_PROTOCOL)
    except Exception as exc:
        raise JobRefused("the job's parameters cannot be sent: %s" % exc) from None


def check_size(payload, max_frame):
    """Refuse, before it is sent, a job larger than the daemon takes: it would only be refused there."""
    if len(payload) > max_frame:
        raise JobRefused(str(OversizedFrame(0, len(payload), max_frame))) from None


def _reply_wait(timeout):
    return None if timeout is None else timeout + REPLY_GRACE


class _ChannelLost(Exception):
    """The connection to the daemon is unusable; *error* is for the caller.

    *unsent* says the job never reached the daemon, so sending it again on a
    new connection cannot run it twice.
    """

    def __init__(self, error, unsent=False):
        super().__init__(error)
        self.error = error
        self.unsent = unsent


def _connect_unix(sock, path, deadline):
    """Connect, waiting while the daemon's listen backlog is full.

    With a timeout set, a Unix socket's connect fails at once with EAGAIN
    when the backlog is full (many clients connecting together), where a TCP
    one would wait: so wait here, until *deadline*.
    """
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise socketlib.timeout("the daemon's listen backlog stayed full") from None
            time.sleep(0.002)


class _Channel:
    """One authenticated socket connection to the daemon: a thread's, and its transactions'.

    A call interrupted midway (KeyboardInterrupt, a signal's exception)
    leaves the stream in an unknown state, so it closes the socket: the
    daemon then cancels the job and rolls back the channel's transactions.
    """

    def __init__(self, path, authkey, connect_timeout):
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        try:
            sock.settimeout(connect_timeout)
            _connect_unix(sock, path, time.monotonic() + connect_timeout)
            max_frame = client_handshake(sock, authkey)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ServiceUnavailable(
                "no dbservice daemon listens on %s (%s); start it with `dbserviced start`"
                % (path, exc.strerror)
            ) from None
        except socketlib.timeout:
            sock.close()
            raise ServiceUnavailable(
                "the dbservice daemon on %s did not answer within %.1f s" % (path, connect_timeout)
            ) from None
        except OSError as exc:
            sock.close()
            raise ServiceUnavailable("cannot connect to the dbservice daemon on %s: %s" % (path, exc)) from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.max_frame = max_frame  # the largest job the daemon takes
        self._timeout = connect_timeout
        self._frames = FrameReader(sys.maxsize)  # the daemon is trusted: no limit
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # a transaction may be ended from another thread

    @property
    def closed(self):
        return self.sock is None or self.sock.fileno() == -1

    def call(self, payload, timeout, kind=MSG_JOB):
        with self._lock:
            try:
                return self._call(payload, timeout, kind)
            except BaseException as exc:
                if not isinstance(exc, (Error, psycopg2.Error)) or isinstance(exc, _ChannelLost):
                    self.close()  # not a reply: the stream is in an unknown state
                raise

    def _call(self, payload, timeout, kind):
        if self.closed:
            raise _ChannelLost(ServiceUnavailable("the connection to the dbservice daemon was closed"), unsent=True)
        check_size(payload, self.max_frame)
        job_id = next(self._ids)
        wait = _reply_wait(timeout)
        if wait != self._timeout:  # settimeout costs syscalls: only when it changes
            self.sock.settimeout(wait)
            self._timeout = wait
        try:
            self.sock.sendall(encode_frame(job_id, kind, payload))
        except OSError as exc:
            raise _ChannelLost(
                ServiceUnavailable("cannot send to the dbservice daemon: %s" % exc), unsent=True
            ) from None
        try:
            while True:
                reply_id, kind, body = self._next_frame()
                if reply_id == job_id:
                    break
                if reply_id == 0 and kind == MSG_ERROR:  # the daemon dropped us
                    raise _ChannelLost(loads_reply(body))
                # else: a late reply to an earlier job that timed out here; skip it
        except socketlib.timeout:
            raise _ChannelLost(QueryTimeout("no reply from the dbservice daemon within %.1f s" % wait)) from None
        except OSError as exc:
            raise _ChannelLost(
                ServiceUnavailable("lost the connection to the dbservice daemon: %s" % exc)
            ) from None
        value = loads_reply(body)
        if kind == MSG_ERROR:
            raise value
        return value

    def _next_frame(self):
        """The next reply, read in as few receives as it takes (one, mostly)."""
        while True:
            frame = self._frames.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(RECEIVE_BYTES)
            if not data:
                raise _ChannelLost(ServiceUnavailable("the dbservice daemon closed the connection"))
            self._frames.feed(data)

    sock = None  # until the handshake succeeded

    def close(self):
        if self.sock is not None:
            self.sock.close()

    __del__ = close  # its thread ended: hang up rather than wait for the daemon to notice


class _TransactionJobs(_QueryMethods):
    """What the sync and async transactions share: their jobs carry the transaction's id."""

    def __init__(self, client, options, timeout):
        self._client = client
        self._options = options
        self.timeout = timeout

    def _begin_job(self):
        self._tx = next(self._client._tx_ids)
        return Job("", self._options, FETCH_BEGIN, self.timeout, self._tx)

    def _end_job(self, fetch):
        """COMMIT or ROLLBACK; the transaction is over whether or not it succeeds."""
        tx, self._tx = self._tx, None
        if tx is None:
            raise Error("the transaction is already over")
        return Job("", None, fetch, self.timeout, tx)

    def _run(self, job):
        if self._tx is None:
            raise Error("the transaction is not open: use it as a context manager")
        return self._call(job)

    def _call(self, job):
        return self._client._run(job)


class Transaction(_TransactionJobs):
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
        self._call(self._end_job(FETCH_COMMIT))

    def rollback(self):
        self._call(self._end_job(FETCH_ROLLBACK))


_live_clients = weakref.WeakSet()


class Client(_QueryMethods):
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
            channel = _Channel(self.socket, self._authkey, self.connect_timeout)
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

    def _run(self, job):
        return self._request(MSG_JOB, _encode(job), job.timeout)

    def _call_on(self, channel, job):
        """Run *job* on *channel*, the connection its transaction began on, and on no other."""
        if self.closed:
            raise Error("this dbservice client is closed")
        try:
            return channel.call(_encode(job), job.timeout)
        except _ChannelLost as lost:
            self._drop(channel)
            raise lost.error from None

    def _request(self, kind, payload, timeout):
        if self.closed:
            raise Error("this dbservice client is closed")
        for attempt in (1, 2):
            channel = self._channel()
            try:
                return channel.call(payload, timeout, kind)
            except _ChannelLost as lost:
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


def resolve_address(socket=None, authkey=None):
    """The daemon's socket path and secret, from the arguments or the defaults."""
    if socket is None:
        socket = os.environ.get("DBSERVICE_SOCKET") or os.path.join(default_state_dir(), SOCKET_NAME)
    if authkey is None:
        authkey = read_secret(os.path.join(os.path.dirname(socket), SECRET_NAME))
    return socket, authkey


def read_secret(path):
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except FileNotFoundError:
        raise ServiceUnavailable(
            "no secret at %s: is dbserviced running with that state directory? "
            "Otherwise pass authkey= to connect()" % path
        ) from None
    except PermissionError:
        raise ServiceUnavailable("cannot read the secret %s: run as the daemon's user" % path) from None
