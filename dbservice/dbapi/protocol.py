"""What a DB-API connection sends the daemon, written once for the blocking and the asyncio drivers.

An operation (running a statement, committing, fetching a named cursor's next
rows) is a generator: it yields the jobs to send, one at a time, is sent each
reply back (or has its error thrown in), and returns the operation's result.
:func:`drive` runs one over a blocking channel, :func:`drive_async` over the
asyncio client; the transaction bookkeeping lives here, so both keep it alike.

With autocommit off, the first statement after a commit or rollback sends a
BEGIN job and the later ones carry its transaction id, as
:class:`dbservice.client.Transaction` does: the daemon pins one pooled
connection to the transaction until COMMIT or ROLLBACK. The daemon keys a
transaction by the socket connection that began it, so when that socket is
lost the transactions on it are lost too (the daemon rolls them back); their
statements then raise until the application rolls back.
"""

import itertools
from typing import Any, Awaitable, Callable, Generator, Optional, Set, TypeVar

from psycopg2 import ProgrammingError

from ..errors import Error, ServiceUnavailable
from ..jobs import BEGIN, COMMIT, FETCH_MANY, ROLLBACK, Job, Params, transaction_options
from .values import isolation_name, plain_params

_T = TypeVar("_T")
#: An operation: a generator that yields the jobs to send, is sent each one's
#: reply, and returns the operation's result.
Operation = Generator[Job, Any, _T]


class Transaction:
    """One daemon transaction of a DB-API connection (its own, or a named cursor's)."""

    __slots__ = ("id", "begun", "lost")

    def __init__(self, tx_id: int) -> None:
        self.id = tx_id
        self.begun = False  # its BEGIN was answered
        self.lost: Optional[BaseException] = None  # the error its statements raise once its socket is gone


class Session:
    """A DB-API connection's options and transactions, apart from any I/O."""

    def __init__(
        self, timeout: Optional[float] = None, autocommit: bool = False, isolation_level: object = None,
        readonly: Optional[bool] = None, deferrable: Optional[bool] = None,
    ) -> None:
        self.timeout = timeout
        self.tx: Optional[Transaction] = None  # the connection's transaction, once a statement began it
        self.closed = False
        self._open: Set[Transaction] = set()  # the transactions begun on the current socket
        self._ids = itertools.count(1)
        self.autocommit: bool = False
        self.isolation_level: Optional[str] = None
        self.readonly: Optional[bool] = None
        self.deferrable: Optional[bool] = None
        for name, value in (("autocommit", autocommit), ("isolation_level", isolation_level),
                            ("readonly", readonly), ("deferrable", deferrable)):
            self.change(name, value)

    def change(self, name: str, value: object) -> None:
        """Set one of autocommit, isolation_level, readonly, deferrable: between transactions only."""
        if self.tx is not None:
            raise ProgrammingError(
                "%s cannot be changed inside a transaction: commit() or rollback() first" % name
            )
        if name == "isolation_level":
            value = isolation_name(value)
        elif name == "autocommit":
            value = bool(value)
        elif value is not None and not isinstance(value, bool):
            raise ProgrammingError("%s must be True, False or None, not %r" % (name, value))
        setattr(self, name, value)

    def new_transaction(self) -> Transaction:
        return Transaction(next(self._ids))

    # -- operations: generators of jobs -----------------------------------------

    def statement(self, sql: str, params: Params, fetch: str) -> Operation[Any]:
        """Run one statement (FETCH_MANY: once per parameter set, as one job).

        It runs in the connection's transaction, begun first if need be, or
        as a transaction of its own in autocommit.
        """
        params = plain_params(params, many=fetch == FETCH_MANY)
        tx_id = None if self.autocommit else (yield from self.current()).id
        return (yield Job(sql, params, fetch, self.timeout, tx_id))

    def current(self) -> Operation[Transaction]:
        """The connection's open transaction, begun now if there is none."""
        tx = self.tx
        if tx is None:
            tx = self.tx = self.new_transaction()
            try:
                yield from self.begin(tx)
            except Exception:
                self.tx = None
                raise
        elif tx.lost is not None:
            raise tx.lost
        return tx

    def begin(self, tx: Transaction) -> Operation[None]:
        """Send *tx*'s BEGIN, with the connection's options.

        Interrupted (a cancelled task) before its reply, it may have begun
        on the daemon all the same: *tx* then stays open, for a ROLLBACK.
        """
        self._open.add(tx)
        options = transaction_options(self.isolation_level, self.readonly, self.deferrable)
        try:
            yield Job("", options, BEGIN, self.timeout, tx.id)
        except Exception:
            self._open.discard(tx)
            raise
        tx.begun = True

    def end(self, fetch: str) -> Operation[None]:
        """COMMIT or ROLLBACK the connection's transaction, if it has one; it is over either way."""
        tx, self.tx = self.tx, None
        if tx is not None:
            yield from self.finish(tx, fetch)

    def finish(self, tx: Transaction, fetch: str) -> Operation[None]:
        """COMMIT or ROLLBACK *tx*. A lost one cannot commit: its work is gone."""
        self._open.discard(tx)
        if tx.lost is not None:
            if fetch == COMMIT:
                raise tx.lost
            return
        try:
            yield Job("", None, fetch, self.timeout, tx.id)
        except Error:
            if tx.begun or fetch == COMMIT:
                raise
            # Its BEGIN never answered, so the daemon may hold nothing to roll back.

    def close(self) -> Operation[None]:
        """Roll back the connection's transaction before the socket closes."""
        self.closed = True
        try:
            yield from self.end(ROLLBACK)
        except Error:
            pass  # the socket is closing anyway: the daemon rolls back what is left

    # -- what the drivers report ------------------------------------------------

    def channel_lost(self, why: object, spare: Optional[int] = None) -> None:
        """The socket to the daemon is gone, and every transaction begun on it with it.

        *spare* is the id of a transaction whose BEGIN never left, and is
        about to be sent again on a new socket.
        """
        for tx in self._open:
            if tx.id != spare:
                tx.lost = ServiceUnavailable(
                    "the connection to the dbservice daemon was lost inside a transaction, which the "
                    "daemon rolled back (%s); roll back, then run the transaction again" % (why,)
                )
        self._open = {tx for tx in self._open if tx.id == spare}


def drive(operation: Operation[_T], send: Callable[[Job], Any]) -> _T:
    """Run *operation*, sending each job it yields with ``send(job)``; return its result."""
    ok = True
    value: Any = None
    while True:
        try:
            job = operation.send(value) if ok else operation.throw(value)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]  # the operation's own
        try:
            ok, value = True, send(job)
        except BaseException as exc:  # a KeyboardInterrupt too: the operation records what it must
            ok, value = False, exc


async def drive_async(operation: Operation[_T], send: Callable[[Job], Awaitable[Any]]) -> _T:
    """:func:`drive` with ``await send(job)``."""
    ok = True
    value: Any = None
    while True:
        try:
            job = operation.send(value) if ok else operation.throw(value)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]  # the operation's own
        try:
            ok, value = True, await send(job)
        except BaseException as exc:  # a cancelled task too: the operation records what it must
            ok, value = False, exc

