"""The asyncio DB-API connection: the blocking module's operations, awaited, over an AsyncClient of its own.

It is what SQLAlchemy's asyncio extension drives (``create_async_engine(
"postgresql+dbservice://")``): every method that sends a job is a coroutine
(``await cursor.execute(...)``, ``await connection.commit()``); the rest is
as in :mod:`dbservice.dbapi`. Cancelling the task that awaits a job cancels
the job on the daemon, as with the AsyncClient; the transaction it belongs
to stays open, failed, for the caller to roll back.
"""

import asyncio
from types import TracebackType
from typing import Any, Iterable, List, Optional, Type, TypeVar

from psycopg2 import InterfaceError

from ..async_client import AsyncClient
from ..queries import resolve_address
from ..errors import ServiceUnavailable
from ..copy_client import table_form
from ..jobs import BEGIN, COMMIT, COPY, ROLLBACK, Job, Params, Row
from ..wire import COPY_IN, COPY_OUT
from .connection import CONNECT_TIMEOUT, ConnectionBase
from .cursor import CursorCore
from .protocol import Operation, Session, drive_async

_T = TypeVar("_T")


class AsyncConnection(ConnectionBase):
    """An asyncio DB-API connection; get one from :func:`dbservice.dbapi.connect_async`.

    Use it from the event loop it was connected on.
    """

    def __init__(self, client: AsyncClient, session: Session) -> None:
        super().__init__(client.socket, session)
        self._client = client
        self._lock = asyncio.Lock()
        self._socket = client.connection  # the client's socket, on which the open transactions began

    def __repr__(self) -> str:
        return "<dbservice.dbapi.AsyncConnection %s%s>" % (self.socket, " closed" if self.closed else "")

    def cursor(
        self, name: Optional[str] = None, *, withhold: bool = False, scrollable: Optional[bool] = None
    ) -> "AsyncCursor":
        """A new cursor; with *name*, a server-side one that streams its rows."""
        self._check_open()
        return AsyncCursor(self, name, withhold, scrollable)

    async def commit(self) -> None:
        if self._ends_something():
            await self._run(self._session.end(COMMIT))

    async def rollback(self) -> None:
        if self._ends_something():
            await self._run(self._session.end(ROLLBACK))

    async def close(self) -> None:
        """Roll back what is open and hang up; closing twice raises InterfaceError."""
        await self._run(self._session.close())
        await self._client.close()

    def terminate(self) -> None:
        """Hang up at once, without waiting: for a connection given up on outside the event loop."""
        self._session.closed = True
        self._client.abort()

    async def __aenter__(self) -> "AsyncConnection":
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if self.closed:
            return
        try:
            if exc_type is None:
                await self.commit()
            else:
                await self.rollback()
        finally:
            await self.close()

    async def _run(self, operation: Operation[_T]) -> _T:
        async with self._lock:
            if self._session.closed and self._client.closed:
                operation.close()
                raise InterfaceError("connection already closed")
            return await drive_async(operation, self._send)

    async def _send(self, job: Job) -> Any:
        if self._socket_changed(job) and job.tx is not None and job.kind != BEGIN:
            # Its transaction began on the socket that is gone, and went with it.
            if job.kind == ROLLBACK:
                return None
            raise ServiceUnavailable(_TRANSACTION_LOST)
        try:
            return await self._client.run(job)
        finally:
            self._socket_changed(None)

    async def _copy(self, operation: Operation[None], file: Any, size: int) -> None:
        """Run a cursor's COPY operation: its COPY job streams *file* on the client's connection."""
        async with self._lock:
            if self._session.closed:
                operation.close()
                raise InterfaceError("connection already closed")
            send = self._send

            async def send_copy(job: Job) -> Any:
                if job.kind != COPY:
                    return await send(job)
                if self._socket_changed(job) and job.tx is not None:
                    raise ServiceUnavailable(_TRANSACTION_LOST)
                try:
                    return await self._client.run_copy(job, file, size)
                finally:
                    self._socket_changed(None)

            return await drive_async(operation, send_copy)

    def _socket_changed(self, job: Optional[Job]) -> bool:
        """True if the client's socket is no longer the one the open transactions began on.

        The AsyncClient opens a new socket by itself when the old one ends:
        the transactions on the old one are then lost (*job*'s own spared,
        if it is a BEGIN).
        """
        socket = self._client.connection
        if socket is self._socket:
            return False
        changed = self._socket is not None
        self._socket = socket
        if changed:
            spare = job.tx if job is not None and job.kind == BEGIN else None
            self._session.channel_lost("lost the connection to the dbservice daemon", spare)
        return changed


_TRANSACTION_LOST = (
    "the connection to the dbservice daemon was lost inside a transaction, which the daemon "
    "rolled back; roll back, then run the transaction again"
)


class AsyncCursor(CursorCore):
    """A cursor of an :class:`AsyncConnection`: ``await cursor.execute(...)``, ``await cursor.fetchall()``."""

    connection: AsyncConnection

    async def execute(self, operation: str, parameters: Params = None) -> None:
        self._check_open()
        await self.connection._run(self._execute_op(operation, parameters))

    async def executemany(self, operation: str, seq_of_parameters: Iterable[Params]) -> None:
        self._check_open()
        await self.connection._run(self._executemany_op(operation, seq_of_parameters))

    async def copy_expert(self, sql: str, file: Any, size: int = 8192) -> None:
        """As the blocking cursor's; the file's read() and write() may be coroutines."""
        self._check_open()
        await self.connection._copy(self._copy_op(sql, None), file, size)

    async def copy_from(
        self, file: Any, table: str, sep: str = "\t", null: str = "\\N", size: int = 8192,
        columns: Optional[Iterable[str]] = None,
    ) -> None:
        self._check_open()
        form = table_form(COPY_IN, file, table, sep, null, columns)
        await self.connection._copy(self._copy_op("", form), file, size)

    async def copy_to(
        self, file: Any, table: str, sep: str = "\t", null: str = "\\N", columns: Optional[Iterable[str]] = None
    ) -> None:
        self._check_open()
        form = table_form(COPY_OUT, file, table, sep, null, columns)
        await self.connection._copy(self._copy_op("", form), file, 8192)

    async def fetchone(self) -> Optional[Row]:
        self._check_results()
        if self._wants(1):
            await self.connection._run(self._fetch_op(self.itersize))
        return self._one()

    async def fetchmany(self, size: Optional[int] = None) -> List[Row]:
        self._check_results()
        size = self.arraysize if size is None else size
        while self._wants(size):
            await self.connection._run(self._fetch_op(self._missing(size)))
        return self._take(size)

    async def fetchall(self) -> List[Row]:
        self._check_results()
        while self._more:
            await self.connection._run(self._fetch_op(self.itersize))
        return self._take()

    async def setinputsizes(self, *sizes: object) -> None:  # type: ignore[override]  # awaited, unlike the PEP's
        """Nothing to do: psycopg2 on the daemon sizes the parameters."""

    async def close(self) -> None:
        if self.closed:
            return
        if self._more and not self._session.closed:
            await self.connection._run(self._close_op())
        self.closed = True

    def __aiter__(self) -> "AsyncCursor":
        return self

    async def __anext__(self) -> Row:
        row = await self.fetchone()
        if row is None:
            raise StopAsyncIteration
        return row

    async def __aenter__(self) -> "AsyncCursor":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def connect_async(
    socket: Optional[str] = None, authkey: Optional[bytes] = None, timeout: Optional[float] = None, *,
    connect_timeout: float = CONNECT_TIMEOUT, autocommit: bool = False, isolation_level: object = None,
    readonly: Optional[bool] = None, deferrable: Optional[bool] = None,
) -> AsyncConnection:
    """Connect to a dbservice daemon and return an :class:`AsyncConnection`.

    The arguments are those of :func:`dbservice.dbapi.connect`.
    """
    socket, authkey = resolve_address(socket, authkey)
    session = Session(timeout, autocommit, isolation_level, readonly, deferrable)
    client = AsyncClient(socket, authkey, connect_timeout=connect_timeout)
    await client.connect()
    return AsyncConnection(client, session)
