"""The blocking DB-API connection: one authenticated socket to the daemon, guarded by a lock.

Unlike :class:`dbservice.Client`, whose threads each get a socket of their
own, a DB-API connection owns one: connection pools (SQLAlchemy's, Django's
persistent connections) hand a connection from thread to thread, and the
daemon keys a transaction by the socket it began on. Its jobs therefore go
one operation at a time, under a lock; threads that want to run at once
open a connection each, as with psycopg2.

A socket the daemon dropped (it restarted, say) is replaced on the next job
that has not left yet; the transactions begun on it are lost with it, and say
so (:mod:`dbservice.dbapi.protocol`). Fork-safe: a process forked from the
one that connected opens a socket of its own on its first job.
"""

import os
import threading
import weakref
from types import TracebackType
from typing import Any, List, Optional, Type, TypeVar

import psycopg2
import psycopg2.extensions
from psycopg2 import InterfaceError

from ..channel import Channel
from ..copy_client import copy_on_channel
from ..queries import ChannelLost, encode_job, resolve_address
from ..jobs import BEGIN, COMMIT, COPY, ROLLBACK, Job
from ..subscriptions import Subscription
from .cursor import Cursor
from .protocol import Operation, Session, drive

_T = TypeVar("_T")

#: Seconds to open and authenticate the socket to the daemon.
CONNECT_TIMEOUT = 10.0


class ConnectionBase:
    """What the blocking and the asyncio connections share: the PEP's attributes and options."""

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

    def __init__(self, socket: str, session: Session) -> None:
        self.socket = socket
        self._session = session

    @property
    def closed(self) -> bool:
        return self._session.closed

    @property
    def in_transaction(self) -> bool:
        """True from the statement that began a transaction until its commit() or rollback()."""
        return self._session.tx is not None

    @property
    def timeout(self) -> Optional[float]:
        """Seconds each job may take (its wait in the daemon's queue included); None: no limit."""
        return self._session.timeout

    @timeout.setter
    def timeout(self, value: Optional[float]) -> None:
        self._session.timeout = value

    @property
    def autocommit(self) -> bool:
        """False (the default): statements run in a transaction until commit() or rollback()."""
        return self._session.autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._session.change("autocommit", value)

    @property
    def isolation_level(self) -> Optional[str]:
        """The isolation level of the transactions begun from now: "REPEATABLE READ", ..., or None.

        Settable by name, by psycopg2's ISOLATION_LEVEL_* number, or as an
        IsolationLevel enum member; None leaves the server's default.
        """
        return self._session.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: object) -> None:
        self._session.change("isolation_level", value)

    @property
    def readonly(self) -> Optional[bool]:
        return self._session.readonly

    @readonly.setter
    def readonly(self, value: Optional[bool]) -> None:
        self._session.change("readonly", value)

    @property
    def deferrable(self) -> Optional[bool]:
        return self._session.deferrable

    @deferrable.setter
    def deferrable(self, value: Optional[bool]) -> None:
        self._session.change("deferrable", value)

    def set_session(
        self, isolation_level: object = None, readonly: Optional[bool] = None, deferrable: Optional[bool] = None,
        autocommit: Optional[bool] = None,
    ) -> None:
        """Set the options of the transactions to come, as psycopg2's ``set_session()``."""
        for name, value in (("isolation_level", isolation_level), ("readonly", readonly),
                            ("deferrable", deferrable), ("autocommit", autocommit)):
            if value is not None:
                self._session.change(name, value)

    def _check_open(self) -> None:
        if self._session.closed:
            raise InterfaceError("connection already closed")

    def _ends_something(self) -> bool:
        """False when commit() or rollback() has nothing to send: pools call them at every checkin."""
        return self._session.tx is not None or self._session.closed


_live_connections: "weakref.WeakSet[Connection]" = weakref.WeakSet()


class Connection(ConnectionBase):
    """A DB-API 2.0 connection to a dbservice daemon; get one from :func:`dbservice.dbapi.connect`.

    With autocommit off (the default) the first statement begins a
    transaction on a pooled connection, pinned to this one until commit() or
    rollback(); with it on, each statement is its own job and pins nothing.
    ``with connection:`` commits (or rolls back, if the block raised), then
    closes the connection.
    """

    def __init__(self, socket: str, authkey: bytes, session: Session, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        super().__init__(socket, session)
        self.connect_timeout = connect_timeout
        self._authkey = authkey
        self._lock = threading.Lock()
        self._channel: Optional[Channel] = None
        self._subscription: Optional[Subscription] = None  # once listen() was called
        #: Notifications poll() read, oldest first, as psycopg2's (a list you may replace).
        self.notifies: List[Any] = []
        _live_connections.add(self)

    def __repr__(self) -> str:
        return "<dbservice.dbapi.Connection %s%s>" % (self.socket, " closed" if self.closed else "")

    def cursor(self, name: Optional[str] = None, *, withhold: bool = False, scrollable: Optional[bool] = None) -> Cursor:
        """A new cursor; with *name*, a server-side one that streams its rows, as psycopg2's."""
        self._check_open()
        return Cursor(self, name, withhold, scrollable)

    def commit(self) -> None:
        if self._ends_something():
            self._run(self._session.end(COMMIT))

    def rollback(self) -> None:
        if self._ends_something():
            self._run(self._session.end(ROLLBACK))

    def close(self) -> None:
        """Roll back what is open and hang up; closing twice raises InterfaceError, as the PEP's suite wants."""
        self._run(self._session.close())
        with self._lock:
            self._hang_up()
            self.unlisten()

    # psycopg2 listens with cursor.execute("LISTEN ...") on its own session;
    # here a LISTEN statement would be reset with its job, so listen() does it.

    def listen(self, *channels: str) -> None:
        """Listen to *channels*: from when this returns, poll() puts their notifications in :attr:`notifies`.

        They travel on a socket of their own (:meth:`fileno`, for select()),
        whatever the connection's transactions do; see
        :class:`dbservice.subscriptions.Subscription` for what a daemon
        restart or a slow reader costs (a NotificationsLost marker among them).
        """
        self._check_open()
        if self._subscription is None:
            self._subscription = Subscription(self.socket, self._authkey, self.connect_timeout, channels)
        else:
            self._subscription.add(*channels)

    def unlisten(self) -> None:
        """Listen to nothing any more."""
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def poll(self) -> int:
        """Put the notifications that arrived in :attr:`notifies`, without waiting; psycopg2's POLL_OK."""
        self._check_open()
        if self._subscription is not None:
            while True:
                item = self._subscription.receive(0)
                if item is None:
                    break
                self.notifies.append(item)
        return psycopg2.extensions.POLL_OK

    def fileno(self) -> int:
        """The descriptor that turns readable when a notification arrives (after listen()): select() it, then poll()."""
        self._check_open()
        if self._subscription is None:
            raise InterfaceError("listen() to a channel first: notifications come on a socket of their own")
        return self._subscription.fileno()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if self.closed:
            return
        try:
            if exc_type is None:
                self.commit()
            else:
                self.rollback()
        finally:
            self.close()

    def open_channel(self) -> None:
        """Connect to the daemon now, rather than on the first job: fail here if nobody is there."""
        with self._lock:
            if self._channel is None:
                self._channel = Channel(self.socket, self._authkey, self.connect_timeout)

    def _run(self, operation: Operation[_T]) -> _T:
        with self._lock:
            if self._session.closed and self._channel is None:
                operation.close()
                raise InterfaceError("connection already closed")
            return drive(operation, self._send)

    def _copy(self, operation: Operation[None], file: Any, size: int) -> None:
        """Run a cursor's COPY operation: its COPY job streams *file* on this connection's socket."""
        with self._lock:
            if self._session.closed:
                operation.close()
                raise InterfaceError("connection already closed")
            send = self._send
            return drive(operation, lambda job: self._send_copy(job, file, size) if job.kind == COPY else send(job))

    def _send_copy(self, job: Job, file: Any, size: int) -> Any:
        if self._channel is None:
            self._channel = Channel(self.socket, self._authkey, self.connect_timeout)
        try:
            return copy_on_channel(self._channel, job, file, size)
        except ChannelLost as lost:
            self._hang_up()
            self._session.channel_lost(lost.error)
            raise lost.error from None

    def _send(self, job: Job) -> Any:
        payload = encode_job(job)
        for attempt in (1, 2):
            if self._channel is None:
                self._channel = Channel(self.socket, self._authkey, self.connect_timeout)
            try:
                return self._channel.call(payload, job.timeout)
            except ChannelLost as lost:
                self._hang_up()
                # A job that never left (the daemon restarted since the last
                # one) goes again on a new socket, unless its transaction
                # began on the old one.
                again = lost.unsent and attempt == 1 and (job.tx is None or job.kind == BEGIN)
                self._session.channel_lost(lost.error, spare=job.tx if again else None)
                if again:
                    continue
                if job.kind == ROLLBACK and job.tx is not None:
                    return None  # the daemon rolls back what a lost socket began
                raise lost.error from None

    def _hang_up(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _after_fork(self) -> None:
        # The parent's socket, and its transactions, belong to the parent.
        self._lock = threading.Lock()
        if self._channel is not None:
            self._channel.close()  # our copy of the descriptor; the parent's stays open
            self._channel = None
        self._session.channel_lost("the process forked; the transaction belongs to the parent")
        # (Its subscription, if any, subscribes again on its first poll(): subscriptions.py.)


def _reset_after_fork() -> None:
    for connection in list(_live_connections):
        connection._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def connect(
    socket: Optional[str] = None, authkey: Optional[bytes] = None, timeout: Optional[float] = None, *,
    connect_timeout: float = CONNECT_TIMEOUT, autocommit: bool = False, isolation_level: object = None,
    readonly: Optional[bool] = None, deferrable: Optional[bool] = None,
) -> Connection:
    """Connect to a dbservice daemon and return a DB-API :class:`Connection`.

    *socket* and *authkey* are found as :func:`dbservice.connect` finds them
    (``$DBSERVICE_SOCKET``, then the default state directory, and the secret
    next to the socket). *timeout* is each job's limit in seconds. The
    transaction options are those of psycopg2's ``set_session()``.

    Raises ServiceUnavailable (an OperationalError) if no daemon answers there.
    """
    socket, authkey = resolve_address(socket, authkey)
    session = Session(timeout, autocommit, isolation_level, readonly, deferrable)
    connection = Connection(socket, authkey, session, connect_timeout)
    connection.open_channel()
    return connection

