"""What every client of the daemon shares: the query methods, a transaction's jobs, and its plumbing.

The sync :class:`~dbservice.Client`, the :class:`~dbservice.AsyncClient`, the
:class:`~dbservice.QueueClient` and the DB-API connections are drivers of
one protocol over different I/O; what they share is written once, here:
the query methods over a ``_run(job)`` of each, the jobs of a transaction,
how a job is encoded and checked before it leaves, how long to wait for its
reply, what a failed connect means to the user, and where the daemon is.
"""

import os
import pickle
import socket as socketlib
import threading
import weakref
from types import TracebackType
from typing import (
    Any,
    Callable,
    Coroutine,
    Dict,
    Generic,
    Iterable,
    List,
    Literal,
    Optional,
    Protocol,
    Tuple,
    Type,
    TypeVar,
    overload,
)

from .config import SECRET_NAME, SOCKET_NAME, default_state_dir
from .errors import Error, JobRefused, ServiceUnavailable
from .jobs import (
    FETCH_ALL,
    BEGIN,
    FETCH_MANY,
    FETCH_ONE,
    FETCH_ROWCOUNT,
    FETCH_TABLE,
    FETCH_VALUE,
    PICKLE_PROTOCOL,
    Job,
    Params,
    Row,
    Table,
)
from .wire import OversizedFrame

#: Seconds a client waits beyond a job's timeout for the daemon's own
#: QueryTimeout reply, before it gives up on the daemon itself.
REPLY_GRACE = 10.0


# What the query methods return: the result itself (Blocking), or a coroutine
# of it (Awaiting), one type parameter for each kind of result.
_Rows = TypeVar("_Rows")
_Row = TypeVar("_Row")
_Value = TypeVar("_Value")
_Table = TypeVar("_Table")
_Count = TypeVar("_Count")
_Self = TypeVar("_Self", bound="QueryMethods[Any, Any, Any, Any, Any]")


class QueryMethods(Generic[_Rows, _Row, _Value, _Table, _Count]):
    """The query methods of every client; subclasses provide ``_run(job)``.

    Its type parameters are what the methods return, from fetchall()'s to
    execute()'s: see :data:`Blocking` and :data:`Awaiting` below.
    """

    timeout: Optional[float] = None
    _tx: Optional[int] = None  # the id of the transaction the jobs belong to, if any
    # What a subclass provides: sending a job and returning its result (or a
    # coroutine of it), and closing.
    _run: Callable[[Job], Any]
    close: Callable[[], Any]

    def fetchall(self, sql: str, params: Params = None, *, timeout: Optional[float] = None) -> _Rows:
        """Run *sql* and return all its rows as a list of tuples."""
        return self._submit(sql, params, FETCH_ALL, timeout)

    def fetchone(self, sql: str, params: Params = None, *, timeout: Optional[float] = None) -> _Row:
        """Run *sql* and return its first row as a tuple, or None."""
        return self._submit(sql, params, FETCH_ONE, timeout)

    def fetchval(self, sql: str, params: Params = None, *, timeout: Optional[float] = None) -> _Value:
        """Run *sql* and return the first column of its first row, or None."""
        return self._submit(sql, params, FETCH_VALUE, timeout)

    def fetchtable(self, sql: str, params: Params = None, *, timeout: Optional[float] = None) -> _Table:
        """Run *sql* and return ``(column_names, rows)``."""
        return self._submit(sql, params, FETCH_TABLE, timeout)

    def execute(self, sql: str, params: Params = None, *, timeout: Optional[float] = None) -> _Count:
        """Run *sql* and return the number of rows it affected."""
        return self._submit(sql, params, FETCH_ROWCOUNT, timeout)

    def executemany(self, sql: str, seq_of_params: Iterable[Params], *, timeout: Optional[float] = None) -> _Count:
        """Run *sql* once per parameter set, all in one transaction; return the total rowcount."""
        return self._submit(sql, list(seq_of_params), FETCH_MANY, timeout)

    def notify(self, channel: str, payload: str = "", *, timeout: Optional[float] = None) -> _Count:
        """Send *payload* on *channel* (``pg_notify()``); its listeners hear it once its transaction commits."""
        return self._submit("SELECT pg_notify(%s, %s)", [channel, payload], FETCH_ROWCOUNT, timeout)

    # The fetch mode decides what comes back.
    @overload
    def _submit(self, sql: str, params: Params, fetch: Literal["all"], timeout: Optional[float]) -> _Rows: ...
    @overload
    def _submit(self, sql: str, params: Params, fetch: Literal["one"], timeout: Optional[float]) -> _Row: ...
    @overload
    def _submit(self, sql: str, params: Params, fetch: Literal["value"], timeout: Optional[float]) -> _Value: ...
    @overload
    def _submit(self, sql: str, params: Params, fetch: Literal["table"], timeout: Optional[float]) -> _Table: ...
    @overload
    def _submit(
        self, sql: str, params: Params, fetch: Literal["rowcount", "many"], timeout: Optional[float]
    ) -> _Count: ...

    def _submit(self, sql: str, params: Params, fetch: str, timeout: Optional[float]) -> Any:
        if timeout is None:
            timeout = self.timeout
        return self._run(Job(sql, params, fetch, timeout, self._tx))

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()


class TransactionJobs(QueryMethods[_Rows, _Row, _Value, _Table, _Count]):
    """What the sync and async transactions share: their jobs carry the transaction's id."""

    def __init__(self, client: Any, options: Dict[str, Any], timeout: Optional[float]) -> None:
        self._client = client
        self._options = options
        self.timeout = timeout

    def _begin_job(self) -> Job:
        self._tx = next(self._client._tx_ids)
        return Job("", self._options, BEGIN, self.timeout, self._tx)

    def _end_job(self, fetch: str) -> Job:
        """COMMIT or ROLLBACK; the transaction is over whether or not it succeeds."""
        tx, self._tx = self._tx, None
        if tx is None:
            raise Error("the transaction is already over")
        return Job("", None, fetch, self.timeout, tx)

    def _run(self, job: Job) -> Any:
        if self._tx is None:
            raise Error("the transaction is not open: use it as a context manager")
        return self._call(job)

    def _call(self, job: Job) -> Any:
        return self._client._run(job)


# What the query methods return, with and without a transaction: the results
# themselves for the blocking clients, coroutines of them for the asyncio one.
Blocking = QueryMethods[List[Row], Optional[Row], Any, Table, int]
BlockingTransactionJobs = TransactionJobs[List[Row], Optional[Row], Any, Table, int]
Awaiting = QueryMethods[
    Coroutine[Any, Any, List[Row]], Coroutine[Any, Any, Optional[Row]], Coroutine[Any, Any, Any],
    Coroutine[Any, Any, Table], Coroutine[Any, Any, int],
]
AwaitingTransactionJobs = TransactionJobs[
    Coroutine[Any, Any, List[Row]], Coroutine[Any, Any, Optional[Row]], Coroutine[Any, Any, Any],
    Coroutine[Any, Any, Table], Coroutine[Any, Any, int],
]


_Channel = TypeVar("_Channel", bound="ThreadChannel")


class ThreadChannel(Protocol):
    """What :class:`ThreadChannels` needs of a channel."""

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...

    def forget(self) -> None: ...


class ThreadChannels(Generic[_Channel]):
    """A blocking client's channels to the daemon: one per thread, opened on its first job.

    Thread-safe: threads never share a channel. Fork-safe: a child process
    forked with the client opens channels of its own and leaves its parent's
    alone. A channel lives in its thread's local storage (the client keeps
    it weakly), so it closes when its thread ends. Subclasses say how one
    is opened (:meth:`_open_channel`).
    """

    closed = False

    def _init_channels(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._channels: "weakref.WeakSet[_Channel]" = weakref.WeakSet()
        _with_channels.add(self)

    def _open_channel(self) -> _Channel:
        raise NotImplementedError

    def _channel(self) -> _Channel:
        """This thread's channel, opened on its first use or after it was lost."""
        channel: Optional[_Channel] = getattr(self._local, "channel", None)
        if channel is None or channel.closed:
            channel = self._open_channel()
            self._local.channel = channel
            with self._lock:
                self._channels.add(channel)
        return channel

    def _drop(self, channel: _Channel) -> None:
        channel.close()
        with self._lock:
            self._channels.discard(channel)

    def close(self) -> None:
        """Close every thread's channel."""
        self.closed = True
        with self._lock:
            channels, self._channels = list(self._channels), weakref.WeakSet()
        for channel in channels:
            channel.close()

    def _after_fork(self) -> None:
        for channel in list(self._channels):
            channel.forget()  # our copy of the parent's: closed, the parent's left be
        self._channels = weakref.WeakSet()
        self._local = threading.local()
        self._lock = threading.Lock()


_with_channels: "weakref.WeakSet[ThreadChannels[Any]]" = weakref.WeakSet()


def _reset_after_fork() -> None:
    for client in list(_with_channels):
        client._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


class ChannelLost(Exception):
    """The connection to the daemon is unusable; *error* is for the caller.

    *unsent* says the job never reached the daemon, so sending it again on a
    new connection cannot run it twice.
    """

    def __init__(self, error: BaseException, unsent: bool = False) -> None:
        super().__init__(error)
        self.error = error
        self.unsent = unsent


def encode_job(job: Job) -> bytes:
    """*job*'s bytes for the daemon; JobRefused if its parameters cannot be pickled."""
    try:
        return pickle.dumps(job.to_wire(), PICKLE_PROTOCOL)
    except Exception as exc:
        raise JobRefused("the job's parameters cannot be sent: %s" % exc) from None


def check_size(payload: bytes, max_frame: int) -> None:
    """Refuse, before it is sent, a job larger than the daemon takes: it would only be refused there."""
    if len(payload) > max_frame:
        raise JobRefused(str(OversizedFrame(0, len(payload), max_frame))) from None


def reply_wait(timeout: Optional[float]) -> Optional[float]:
    """How long to wait for the reply of a job with *timeout* (None: no limit)."""
    return None if timeout is None else timeout + REPLY_GRACE


def connect_error(path: str, exc: BaseException, connect_timeout: float) -> ServiceUnavailable:
    """The ServiceUnavailable a user gets when connecting to the daemon at *path* failed with *exc*."""
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return ServiceUnavailable(
            "no dbservice daemon listens on %s (%s); start it with `dbserviced start`" % (path, exc.strerror)
        )
    if isinstance(exc, (socketlib.timeout, TimeoutError)):
        return ServiceUnavailable("the dbservice daemon on %s did not answer within %.1f s" % (path, connect_timeout))
    return ServiceUnavailable("cannot connect to the dbservice daemon on %s: %s" % (path, exc))


def resolve_address(socket: Optional[str] = None, authkey: Optional[bytes] = None) -> Tuple[str, bytes]:
    """The daemon's socket path and secret, from the arguments or the defaults.

    *socket* defaults to ``$DBSERVICE_SOCKET``, else the socket in the default
    state directory (``$DBSERVICE_HOME`` or ``~/.local/state/dbservice``);
    *authkey* to the ``secret`` file next to the socket.
    """
    if socket is None:
        socket = os.environ.get("DBSERVICE_SOCKET") or os.path.join(default_state_dir(), SOCKET_NAME)
    if authkey is None:
        authkey = read_secret(os.path.join(os.path.dirname(socket), SECRET_NAME))
    return socket, authkey


def read_secret(path: str) -> bytes:
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
