"""AsyncConnectionPool: a bounded pool of psycopg2 connections in async mode, and its queue of jobs.

The pool lends a connection to one job at a time, in order of arrival: the
jobs waiting for one are its waiters, in one queue. Among idle connections it
lends the most recently used, as PgBouncer does: the connections a load needs
stay busy and warm, and those it does not need stay idle, so that the ones
above ``min_size`` close after ``max_idle`` seconds even while jobs keep
coming. When none is free it opens another, one at a time, up to
``max_size``. When the database cannot be reached it retries with a capped,
jittered exponential backoff and never spins.
"""

import asyncio
import collections
import logging
from typing import Any, Deque, Dict, Optional, Protocol, Set

from .connection import PooledConnection

from .cancel import cancel_query
from .errors import QueryTimeout, ServiceBusy, ServiceUnavailable
from .health import one_line
from .runner import CLEANUP_GRACE
from .session import ALWAYS, AUTO, clean, in_transaction, may_change_session
from .stats import Histogram
from .supply import ConnectionSupply

logger = logging.getLogger("dbservice.pool")


class Waiter(Protocol):
    """What waits in the pool's queue for a connection: a job, or getconn()'s borrower."""

    #: on the loop's clock: when its wait began
    arrived: float

    def accept(self, conn: PooledConnection) -> bool:
        """Take *conn*, or say (False) that it waits no more."""

    def fail(self, error: BaseException) -> None:
        """No connection will come: answer with *error*."""


class AsyncConnectionPool(ConnectionSupply):
    """A pool of async psycopg2 connections for one event loop, and the jobs waiting for them.

    Jobs wait with :meth:`lend`. Or borrow a connection with :meth:`getconn`,
    and you *must* give it back with :meth:`putconn`, also when the job
    failed or was cancelled.
    """

    def __init__(
        self,
        dsn: str,
        min_size: int = 2,
        max_size: int = 10,
        max_idle: float = 300.0,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        name: str = "pool",
        session_reset: str = AUTO,
        max_waiting: int = 0,
        max_prepared: int = 0,
        max_lifetime: float = 0.0,
    ) -> None:
        super().__init__(dsn, min_size, max_size, max_idle, connect_timeout, name, max_prepared, max_lifetime)
        self.timeout = timeout
        self.session_reset = session_reset
        self.max_waiting = max_waiting
        self.requests_waits = 0
        self.requests_immediate = 0  # lent a connection at once: a wait of 0
        self.waits = Histogram()  # how long each waiter that queued waited, whether it got a connection or not
        self.sessions_reset = 0
        self._waiting: Deque[Waiter] = collections.deque()  # waiters for a connection, oldest first (see lend)
        self._waiting_count = 0  # of which still waiting
        self._resets: "Set[asyncio.Task[None]]" = set()  # the tasks resetting sessions, under way

    @property
    def patience(self) -> float:
        """How long the database may stay down before jobs stop waiting for it (see outage_error)."""
        return self.timeout

    async def close(self) -> None:
        """Close every idle connection now and the busy ones as they return."""
        if self._closed:
            return
        await self._stop_supplying()
        await asyncio.gather(*self._resets, return_exceptions=True)
        self.fail_waiting(ServiceUnavailable("the pool %r is closed" % self.name))
        self._close_all_idle()
        self._stop_waiting_for_hang_ups()
        logger.info("pool %r closed", self.name)

    # -- lending ---------------------------------------------------------------
    #
    # One queue of waiters: the jobs waiting for a connection, oldest first.
    # A waiter is anything with accept(conn), which takes the connection or
    # says it waits no more (False), and fail(error): the engine's PendingJob,
    # or getconn()'s _Borrower. A waiter that gives up withdraws, and is
    # skipped when its turn comes. A waiter's wait began at its ``arrived``,
    # on the loop's clock.

    def lend(self, waiter: Waiter) -> bool:
        """Lend *waiter* a connection: now if one is idle, else the next that is free.

        Returns False, with nothing done, when ``max_waiting`` waiters wait
        already (0: no limit).
        """
        if self._closed:
            raise ServiceUnavailable("the pool %r is closed" % self.name)
        if not self._waiting_count:  # nobody ahead of it
            conn = self._pop_idle()
            if conn is not None:
                self.requests_immediate += 1
                if not waiter.accept(conn):
                    self._pass_on(conn)
                return True
        if self.max_waiting and self._waiting_count >= self.max_waiting:
            return False
        self._waiting.append(waiter)
        self._waiting_count += 1
        self.requests_waits += 1
        self._maybe_grow()
        return True

    def fail_waiting(self, error: BaseException) -> None:
        """Answer every waiter with *error*: none will get a connection."""
        waiting, self._waiting = self._waiting, collections.deque()
        for waiter in waiting:  # each that still waits withdraws
            waiter.fail(error)

    def withdraw(self, waiter: Waiter) -> None:
        """*waiter*, queued by :meth:`lend`, waits no more (its timeout passed, it was cancelled)."""
        self._waiting_count -= 1
        self.waits.observe(self._loop.time() - waiter.arrived)

    @property
    def waiting(self) -> int:
        """How many waiters wait for a connection."""
        return self._waiting_count

    async def getconn(self, deadline: Optional[float] = None) -> PooledConnection:
        """Borrow a connection, waiting for one up to *deadline*; give it back with :meth:`putconn`.

        *deadline* is on the loop's clock; without one the pool's ``timeout``
        applies. Raises QueryTimeout when no connection became free in time,
        ServiceUnavailable when the database could not be reached meanwhile.
        """
        borrower = _Borrower(self, deadline or self._loop.time() + self.timeout)
        if not self.lend(borrower):
            raise ServiceBusy("%d jobs wait for a connection of pool %r already" % (self.waiting, self.name))
        return await borrower.connection()

    def putconn(self, conn: PooledConnection) -> None:
        """Give back a lent connection: to the next waiter, or to the idle ones.

        A connection that broke is closed and replaced as needed; one left
        inside a transaction is rolled back, and one whose session a job may
        have changed is reset, before anybody else gets it.
        """
        conn.jobs_done += 1
        conn.last_used = self._loop.time()
        if not self._closed and not conn.pgconn.closed and (conn.needs_reset or in_transaction(conn)):
            self._reset_soon(conn)
        else:
            self._pass_on(conn)

    def note_job(self, conn: PooledConnection, sql: str) -> None:
        """A job runs *sql* on *conn*: if it may change the session, reset it when it comes back."""
        if self.session_reset == ALWAYS or may_change_session(sql):
            conn.needs_reset = True

    def _pass_on(self, conn: PooledConnection) -> None:
        """Pass *conn* on to the first waiter that takes it, otherwise put it back among the idle."""
        conn.lent = False
        if self._closed or self.suspended or not conn.usable or len(self._connections) > self.max_size:
            self._discard(conn)
            self._maybe_grow()
            return
        if conn.last_used >= conn.expires_at:  # back from its job past its lifetime
            self._retire(conn)
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            conn.lent = True
            if waiter.accept(conn):
                self._waiting_count -= 1
                self.waits.observe(self._loop.time() - waiter.arrived)
                return
            conn.lent = False  # it gave up and withdrew already
        self._idle.append(conn)

    def _reset_soon(self, conn: PooledConnection) -> None:
        task = self._loop.create_task(self._reset(conn))
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)

    async def _reset(self, conn: PooledConnection) -> None:
        try:
            if await clean(conn, self._loop.time() + CLEANUP_GRACE):
                self.sessions_reset += 1
        except Exception as exc:
            logger.warning("could not reset the session of connection #%d (%s); closing it", conn.number, exc)
            conn.close()
        self._pass_on(conn)

    def _pop_idle(self) -> Optional[PooledConnection]:
        while self._idle:
            conn = self._idle.pop()
            if conn.pgconn.closed:
                self._discard(conn)
                continue
            conn.lent = True
            return conn
        return None

    async def cancel(self, conn: PooledConnection) -> None:
        """Ask the server to cancel the query running on *conn*, one of this pool's connections.

        By a cancel request, which needs no free connection slot, bounded by
        ``connect_timeout``; OperationalError if it could not be sent.
        """
        await cancel_query(conn.pgconn, self.connect_timeout)

    def wait_error(self, waited: float) -> BaseException:
        """The error for a job that waited *waited* seconds and got no connection."""
        if self.suspended:
            return QueryTimeout(
                "the job waited %.2f s, its timeout, while the dbservice daemon was paused; it did not run" % waited
            )
        return self.health.wait_error(waited) or QueryTimeout(
            "no connection of pool %r became free within %.2f s (%d of max_size %d busy)"
            % (self.name, waited, len(self._connections) - len(self._idle), self.max_size)
        )

    # -- growing and shrinking -------------------------------------------------

    # -- introspection ---------------------------------------------------------

    def get_stats(self) -> Dict[str, Any]:
        now = self._loop.time() if self._loop else 0.0
        return {
            "pool_min": self.min_size,
            "pool_max": self.max_size,
            "pool_size": len(self._connections),
            "pool_available": len(self._idle),
            "requests_waiting": self._waiting_count,
            "requests_waits": self.requests_waits,
            "connections_num": self.connections_num,
            "connections_errors": self.health.errors,
            "reconnects": self.health.reconnects,
            "connections_lost": self.connections_lost,
            "connections_expired": self.connections_expired,
            "sessions_reset": self.sessions_reset,
            "statements_prepared": sum(len(c.statements) for c in self._connections),
            "database_reachable": not self.unreachable,
            "last_error": one_line(self.last_error) if self.last_error else None,
            "connections": [
                {
                    "number": c.number,
                    "busy": c.lent,
                    "jobs_done": c.jobs_done,
                    "idle_s": 0.0 if c.lent else round(now - c.last_used, 3),
                }
                for c in sorted(self._connections, key=lambda c: c.number)
            ],
        }


class _Borrower:
    """getconn()'s waiter: a future the pool's connection goes to, and a timer."""

    __slots__ = ("pool", "future", "timer", "arrived")

    def __init__(self, pool: AsyncConnectionPool, deadline: float) -> None:
        loop = pool._loop
        self.pool = pool
        self.future: "asyncio.Future[PooledConnection]" = loop.create_future()
        self.arrived = loop.time()
        self.timer = loop.call_at(deadline, self._expire)

    def accept(self, conn: PooledConnection) -> bool:
        if self.future.done():
            return False
        self.timer.cancel()
        self.future.set_result(conn)
        return True

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
            self.pool.withdraw(self)

    def _expire(self) -> None:
        self.fail(self.pool.wait_error(self.pool._loop.time() - self.arrived))

    async def connection(self) -> PooledConnection:
        try:
            return await self.future
        except asyncio.CancelledError:
            if self.future.cancelled():  # cancelled while it waited: it waits no more
                self.timer.cancel()
                self.pool.withdraw(self)
            else:  # cancelled just as it was handed a connection: pass it on
                self.pool.putconn(self.future.result())
            raise
