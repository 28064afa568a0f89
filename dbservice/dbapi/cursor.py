"""DB-API cursors: the result in hand, and named cursors that stream from the server.

A cursor's statement is one job, and its reply carries the whole result, so
fetching is local. A named cursor (``connection.cursor(name=...)``, as in
psycopg2) streams instead: its query is DECLAREd as a server-side cursor, and
the rows come as fetchmany() asks for them, or ``itersize`` at a time for
fetchone(), iteration and fetchall(). A server-side cursor lives inside a
transaction on one pooled connection, so in autocommit mode a named cursor
gets a daemon transaction of its own, from its DECLARE until its last row or
its close(); otherwise it lives in the connection's transaction. Either way
no more than a batch is held in memory, here or in the daemon.

:class:`CursorCore` is what the blocking :class:`Cursor` and the asyncio
cursor share: their state, and their operations as generators of jobs
(:mod:`dbservice.dbapi.protocol`).
"""

from typing import TYPE_CHECKING, Any, Iterable, List, NamedTuple, Optional, Tuple

import psycopg2.errors
from psycopg2 import InterfaceError, NotSupportedError, ProgrammingError

from ..copy_client import table_form
from ..jobs import COMMIT, COPY, FETCH_CURSOR, FETCH_MANY, ROLLBACK, FETCH_ROWCOUNT, Job, Params, Row
from ..wire import COPY_IN, COPY_OUT
from .protocol import Operation, Transaction
from .values import plain_params

if TYPE_CHECKING:
    from .connection import Connection, ConnectionBase


class Column(NamedTuple):
    """One column of cursor.description, as psycopg2 gives it: a 7-item tuple with names."""

    name: str
    type_code: int  # the OID of the column's type
    display_size: Optional[int]
    internal_size: Optional[int]
    precision: Optional[int]
    scale: Optional[int]
    null_ok: Optional[bool]


def quote_name(name: object) -> str:
    """A cursor's name as an SQL identifier."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ProgrammingError("a cursor's name must be a non-empty string, not %r" % (name,))
    return '"%s"' % name.replace('"', '""')


class CursorCore:
    """The state and the operations of a cursor, apart from any I/O."""

    #: Rows fetchmany() returns when not told how many.
    arraysize = 1
    #: Rows a named cursor fetches from the server at a time.
    itersize = 2000

    def __init__(
        self, connection: "ConnectionBase", name: Optional[str] = None, withhold: bool = False,
        scrollable: Optional[bool] = None,
    ) -> None:
        if scrollable:
            raise NotSupportedError("scrollable cursors are not supported: fetch the rows forward only")
        self.connection = connection
        self.name = name
        self.withhold = withhold
        self.rowcount = -1
        self.statusmessage: Optional[str] = None
        self.lastrowid: None = None  # PostgreSQL tables have no row ids: use RETURNING
        self.closed = False
        self._session = connection._session
        self._description: Optional[List[Tuple[Any, ...]]] = None  # as the daemon sent it; description makes Columns of it
        self._columns: Optional[Tuple[Column, ...]] = None
        # The rows in hand; None: the statement returned none. Read only after
        # _check_results(), which raises then.
        self._rows: List[Row] = None  # type: ignore[assignment]
        self._next = 0  # the next of them to fetch
        self._more = False  # a named cursor has rows left on the server
        self._quoted = None if name is None else quote_name(name)
        self._tx: Transaction = None  # type: ignore[assignment]  # the transaction a named cursor was declared in
        self._owns_tx = False  # ... one of its own, which it ends

    @property
    def description(self) -> Optional[Tuple[Column, ...]]:
        """A Column (name, type_code: the type's OID, ...) per column; None without a result."""
        if self._columns is None and self._description is not None:
            self._columns = tuple(map(Column._make, self._description))
        return self._columns

    @property
    def rownumber(self) -> Optional[int]:
        """The index of the next row in the result, or None without one."""
        return None if self._rows is None else self._next

    def setinputsizes(self, sizes: object) -> None:
        """Nothing to do: psycopg2 on the daemon sizes the parameters."""

    def setoutputsize(self, size: int, column: Optional[int] = None) -> None:
        """Nothing to do: the rows come whole."""

    # -- the result in hand -----------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise InterfaceError("cursor already closed")
        if self._session.closed:
            raise InterfaceError("connection already closed")

    def _check_results(self) -> None:
        self._check_open()
        if self._rows is None:
            raise ProgrammingError(
                "no results to fetch: execute() a statement that returns rows first"
            )

    def _received(self, result: Tuple[Any, int, Any, Optional[str]]) -> None:
        """Take a statement's reply: (description, rowcount, rows, status message)."""
        self._description, self.rowcount, self._rows, self.statusmessage = result
        self._columns = None
        self._next = 0

    def _wants(self, count: int) -> bool:
        """True if a named cursor must fetch before *count* rows are in hand."""
        return self._more and len(self._rows) - self._next < count

    def _missing(self, count: int) -> int:
        return count - (len(self._rows) - self._next)

    def _one(self) -> Optional[Row]:
        rows, index = self._rows, self._next
        if index < len(rows):
            self._next = index + 1
            return rows[index]
        return None

    def _take(self, count: Optional[int] = None) -> List[Row]:
        start = self._next
        rows = self._rows[start:] if count is None else self._rows[start : start + count]
        self._next = start + len(rows)
        return rows

    # -- operations: generators of jobs -----------------------------------------

    def _execute_op(self, operation: str, parameters: Params) -> Operation[None]:
        if self._quoted is not None:
            yield from self._declare(operation, parameters)
        else:
            self._received((yield from self._session.statement(operation, parameters, FETCH_CURSOR)))

    def _executemany_op(self, operation: str, seq_of_parameters: Iterable[Params]) -> Operation[None]:
        if self._quoted is not None:
            raise ProgrammingError("can't call .executemany() on named cursors")
        seq_of_parameters = list(seq_of_parameters)
        rowcount = 0
        if seq_of_parameters:  # nothing to run, and no transaction to begin for it
            rowcount = yield from self._session.statement(operation, seq_of_parameters, FETCH_MANY)
        self._received((None, rowcount, None, None))

    def _copy_op(self, sql: str, form: Optional[Tuple[Any, ...]]) -> Operation[None]:
        """A COPY, in the connection's transaction (begun first if need be) or in one of its own in autocommit."""
        if self._quoted is not None:
            raise ProgrammingError("can't COPY on a named cursor")
        session = self._session
        tx_id = None if session.autocommit else (yield from session.current()).id
        rowcount = yield Job(sql, form, COPY, session.timeout, tx_id)
        self._received((None, rowcount, None, "COPY %d" % rowcount))

    def _declare(self, operation: str, parameters: Params) -> Operation[None]:
        if self._tx is not None:
            raise ProgrammingError("can't call .execute() on named cursors more than once")
        session = self._session
        params = plain_params(parameters, many=False)
        if session.autocommit:
            tx = session.new_transaction()
            yield from session.begin(tx)
            self._owns_tx = True
        elif self.withhold:
            raise NotSupportedError(
                "a WITH HOLD cursor would outlive its transaction, and commit() gives the transaction's "
                "pooled connection back: open the named cursor in autocommit mode, where it gets a "
                "transaction of its own for as long as it has rows"
            )
        else:
            tx = yield from session.current()
        self._tx = tx
        try:
            yield Job(
                "DECLARE %s NO SCROLL CURSOR FOR %s" % (self._quoted, operation),
                params, FETCH_ROWCOUNT, session.timeout, tx.id,
            )
            # No rows yet, nor a description, as with psycopg2: the first fetch
            # brings as many as it asks for, so a caller's batch bounds memory.
            self._rows, self._more = [], True
        except Exception:
            yield from self._end_own_tx(ROLLBACK, quietly=True)
            raise

    def _fetch_op(self, count: int) -> Operation[None]:
        """Fetch the next *count* rows of a named cursor into hand."""
        tx = self._tx
        if tx.lost is not None:
            raise tx.lost
        if not self._owns_tx and tx is not self._session.tx:
            raise ProgrammingError("named cursor %r isn't valid anymore: its transaction ended" % self.name)
        sql = "FETCH FORWARD %%s FROM %s" % self._quoted
        try:
            description, _, rows, status = yield Job(sql, [count], FETCH_CURSOR, self._session.timeout, tx.id)
        except Exception:
            # The query failed as it ran: a transaction of its own is of no more use.
            self._more = False
            yield from self._end_own_tx(ROLLBACK, quietly=True)
            raise
        self._description, self._columns, self.statusmessage = description, None, status
        self._rows = self._rows[self._next :] + rows
        self._next = 0
        self.rowcount = max(self.rowcount, 0) + len(rows)
        if len(rows) < count:
            self._more = False
            yield from self._end_own_tx(COMMIT)

    def _close_op(self) -> Operation[None]:
        """End what a named cursor holds on the server, before its last row if need be."""
        if not self._more:
            return
        self._more = False
        tx = self._tx
        if self._owns_tx:
            yield from self._end_own_tx(COMMIT, quietly=True)
        elif tx is self._session.tx and tx.lost is None:
            try:
                yield Job("CLOSE %s" % self._quoted, None, FETCH_ROWCOUNT, self._session.timeout, tx.id)
            except psycopg2.errors.InFailedSqlTransaction:
                pass  # the transaction failed, and the cursor with it

    def _end_own_tx(self, fetch: str, quietly: bool = False) -> Operation[None]:
        """COMMIT or ROLLBACK the named cursor's own transaction, if it has one.

        *quietly* when the cursor is done with it either way (closed early,
        or failed): its caller has seen the rows, or the error.
        """
        if not self._owns_tx:
            return
        self._owns_tx = False
        try:
            yield from self._session.finish(self._tx, fetch)
        except psycopg2.Error:
            if not quietly:
                raise


class Cursor(CursorCore):
    """A DB-API cursor; get one from :meth:`Connection.cursor`.

    Not thread-safe, as psycopg2's are not: each thread its own cursor.
    """

    connection: "Connection"

    def execute(self, operation: str, parameters: Params = None) -> None:
        """Run *operation*, binding *parameters* (``%s`` or ``%(name)s``) on the daemon."""
        self._check_open()
        self.connection._run(self._execute_op(operation, parameters))

    def executemany(self, operation: str, seq_of_parameters: Iterable[Params]) -> None:
        """Run *operation* once per parameter set, all in one job; rowcount is their total."""
        self._check_open()
        self.connection._run(self._executemany_op(operation, seq_of_parameters))

    def copy_expert(self, sql: str, file: Any, size: int = 8192) -> None:
        """Run *sql*, a ``COPY ... FROM STDIN`` reading *file* or ``COPY ... TO STDOUT`` writing it, as psycopg2's."""
        self._check_open()
        self.connection._copy(self._copy_op(sql, None), file, size)

    def copy_from(
        self, file: Any, table: str, sep: str = "\t", null: str = "\\N", size: int = 8192,
        columns: Optional[Iterable[str]] = None,
    ) -> None:
        """Copy *file*'s lines into *table*, as psycopg2's (the name is quoted: no schema; use copy_expert())."""
        self._check_open()
        form = table_form(COPY_IN, file, table, sep, null, columns)
        self.connection._copy(self._copy_op("", form), file, size)

    def copy_to(
        self, file: Any, table: str, sep: str = "\t", null: str = "\\N", columns: Optional[Iterable[str]] = None
    ) -> None:
        """Write *table*'s rows to *file*, as psycopg2's."""
        self._check_open()
        form = table_form(COPY_OUT, file, table, sep, null, columns)
        self.connection._copy(self._copy_op("", form), file, 8192)

    def fetchone(self) -> Optional[Row]:
        self._check_results()
        if self._wants(1):
            self.connection._run(self._fetch_op(self.itersize))
        return self._one()

    def fetchmany(self, size: Optional[int] = None) -> List[Row]:
        self._check_results()
        size = self.arraysize if size is None else size
        while self._wants(size):
            self.connection._run(self._fetch_op(self._missing(size)))
        return self._take(size)

    def fetchall(self) -> List[Row]:
        self._check_results()
        while self._more:
            self.connection._run(self._fetch_op(self.itersize))
        return self._take()

    def close(self) -> None:
        """Close the cursor (a named one ends what it holds on the server); closing twice is harmless."""
        if self.closed:
            return
        if self._more and not self._session.closed:
            self.connection._run(self._close_op())
        self.closed = True

    def __iter__(self) -> "Cursor":
        return self

    def __next__(self) -> Row:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def __enter__(self) -> "Cursor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
