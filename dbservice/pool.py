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
import random

import psycopg2
import psycopg2.extensions as ext
from psycopg2.extensions import make_dsn, parse_dsn

from .cancel import cancel_query
from .connection import PooledConnection
from .errors import QueryTimeout, ServiceBusy, ServiceUnavailable
from .runner import CLEANUP_GRACE
from .session import ALWAYS, AUTO, RESET, may_change_session

logger = logging.getLogger("dbservice.pool")


class Backoff:
    """Delays between reconnection attempts: doubling, capped, jittered.

    The constants live on the class so tests can shorten them.
    """

    INITIAL_DELAY = 0.1
    MAX_DELAY = 5.0
    MULTIPLIER = 2.0
    JITTER = 0.1  # each delay is randomly up to 10% shorter or longer

    def __init__(self):
        self._base = 0.0

    def next_delay(self):
        self._base = min(
            self.MAX_DELAY, self._base * self.MULTIPLIER if self._base else self.INITIAL_DELAY
        )
        return self._base * (1 + random.uniform(-self.JITTER, self.JITTER))

    def reset(self):
        self._base = 0.0


class AsyncConnectionPool:
    """A pool of async psycopg2 connections for one event loop.

    Use :meth:`getconn` to borrow a connection and you *must* give it back with
    :meth:`putconn`, also when the job failed or was cancelled.
    """

    def __init__(
        self,
        dsn,
        min_size=2,
        max_size=10,
        max_idle=300.0,
        timeout=30.0,
        connect_timeout=10.0,
        name="pool",
        session_reset=AUTO,
        max_waiting=0,
    ):
        check_sizes(min_size, max_size)
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.max_idle = max_idle
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self.session_reset = session_reset
        self.max_waiting = max_waiting

        self._connections = set()
        self._idle = collections.deque()  # least recently used first: lent from the right, closed from the left
        self._waiting = collections.deque()  # waiters for a connection, oldest first (see lend)
        self._waiting_count = 0  # of which still waiting
        self._opening = None  # the task opening a connection, if one is
        self._resets = set()  # the tasks resetting sessions, under way
        self._closed = True
        self._backoff = Backoff()
        self._retry_handle = None
        self._maintenance = None
        self._numbers = 0
        self._loop = None
        self._opened = None  # set once the first fill succeeded or failed

        self.last_error = None
        self.ever_connected = False
        self._unreachable_since = None  # on the loop's clock: no connection open, attempts failing
        self.connections_num = 0
        self.connections_errors = 0
        self.connections_lost = 0
        self.requests_waits = 0
        self.sessions_reset = 0

    # -- lifecycle -------------------------------------------------------------

    async def open(self, wait=True):
        """Start filling the pool to ``min_size``.

        With *wait*, return once ``min_size`` connections are open or the
        first attempt failed (the pool then keeps retrying in the background).
        """
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._opened = self._loop.create_future()
        self._maintenance = self._loop.create_task(self._maintain())
        self._maybe_grow()
        if wait and self.min_size:
            await asyncio.shield(self._opened)
        elif not self._opened.done():
            self._opened.set_result(None)

    async def close(self):
        """Close every idle connection now and the busy ones as they return."""
        if self._closed:
            return
        self._closed = True
        if self._retry_handle:
            self._retry_handle.cancel()
        tasks = [task for task in (self._maintenance, self._opening) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._resets, return_exceptions=True)
        self.fail_waiting(ServiceUnavailable("the pool %r is closed" % self.name))
        while self._idle:
            self._discard(self._idle.popleft())
        logger.info("pool %r closed", self.name)

    def resize(self, min_size, max_size):
        """Change the bounds; excess idle connections close now, busy ones on return."""
        check_sizes(min_size, max_size)
        logger.info(
            "resizing pool %r from %d-%d to %d-%d",
            self.name, self.min_size, self.max_size, min_size, max_size,
        )
        self.min_size, self.max_size = min_size, max_size
        while self._idle and len(self._connections) > max_size:
            self._discard(self._idle.popleft())
        self._maybe_grow()

    # -- lending ---------------------------------------------------------------
    #
    # One queue of waiters: the jobs waiting for a connection, oldest first.
    # A waiter is anything with accept(conn), which takes the connection or
    # says it waits no more (False), and fail(error): the engine's PendingJob,
    # or getconn()'s _Borrower. A waiter that gives up withdraws, and is
    # skipped when its turn comes.

    def lend(self, waiter):
        """Lend *waiter* a connection: now if one is idle, else the next that is free.

        Returns False, with nothing done, when ``max_waiting`` waiters wait
        already (0: no limit).
        """
        if self._closed:
            raise ServiceUnavailable("the pool %r is closed" % self.name)
        if not self._waiting_count:  # nobody ahead of it
            conn = self._pop_idle()
            if conn is not None:
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

    def fail_waiting(self, error):
        """Answer every waiter with *error*: none will get a connection."""
        waiting, self._waiting = self._waiting, collections.deque()
        for waiter in waiting:  # each that still waits withdraws
            waiter.fail(error)

    def withdraw(self, waiter):
        """*waiter*, queued by :meth:`lend`, waits no more (its timeout passed, it was cancelled)."""
        self._waiting_count -= 1

    @property
    def waiting(self):
        """How many waiters wait for a connection."""
        return self._waiting_count

    async def getconn(self, deadline=None):
        """Borrow a connection, waiting for one up to *deadline*; give it back with :meth:`putconn`.

        *deadline* is on the loop's clock; without one the pool's ``timeout``
        applies. Raises QueryTimeout when no connection became free in time,
        ServiceUnavailable when the database could not be reached meanwhile.
        """
        borrower = _Borrower(self, deadline or self._loop.time() + self.timeout)
        if not self.lend(borrower):
            raise ServiceBusy("%d jobs wait for a connection of pool %r already" % (self.waiting, self.name))
        return await borrower.connection()

    def putconn(self, conn):
        """Give back a lent connection: to the next waiter, or to the idle ones.

        A connection that broke is closed and replaced as needed; one left
        inside a transaction is rolled back, and one whose session a job may
        have changed is reset, before anybody else gets it.
        """
        conn.jobs_done += 1
        conn.last_used = self._loop.time()
        if not self._closed and not conn.pgconn.closed and (conn.needs_reset or _in_transaction(conn)):
            self._reset_soon(conn)
        else:
            self._pass_on(conn)

    def note_job(self, conn, sql):
        """A job runs *sql* on *conn*: if it may change the session, reset it when it comes back."""
        if self.session_reset == ALWAYS or may_change_session(sql):
            conn.needs_reset = True

    def _pass_on(self, conn):
        """Pass *conn* on to the first waiter that takes it, otherwise put it back among the idle."""
        conn.lent = False
        if self._closed or not conn.usable or len(self._connections) > self.max_size:
            self._discard(conn)
            self._maybe_grow()
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            conn.lent = True
            if waiter.accept(conn):
                self._waiting_count -= 1
                return
            conn.lent = False  # it gave up and withdrew already
        self._idle.append(conn)

    def _reset_soon(self, conn):
        task = self._loop.create_task(self._reset(conn))
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)

    async def _reset(self, conn):
        """Roll back what a job left open, clear what it left in the session (session.py), pass it on.

        A transaction is left open when the BEGIN of a client's transaction
        ran but the client gave up on it (its task was cancelled meanwhile).
        """
        cursor = conn.pgconn.cursor()
        try:
            if _in_transaction(conn):
                conn.execute(cursor, "ROLLBACK")
                await conn.wait(self._loop.time() + CLEANUP_GRACE)
            if conn.needs_reset:
                conn.execute(cursor, RESET)
                await conn.wait(self._loop.time() + CLEANUP_GRACE)
                conn.needs_reset = False
                self.sessions_reset += 1
        except Exception as exc:
            logger.warning("could not reset the session of connection #%d (%s); closing it", conn.number, exc)
            conn.close()
        finally:
            cursor.close()
            del conn.pgconn.notifies[:]  # what arrived before UNLISTEN: nobody will read it
        self._pass_on(conn)

    def _pop_idle(self):
        while self._idle:
            conn = self._idle.pop()
            if conn.pgconn.closed:
                self._discard(conn)
                continue
            conn.lent = True
            return conn
        return None

    def _lost(self, conn):
        """The server ended *conn* while it was idle: drop it now."""
        try:
            self._idle.remove(conn)
        except ValueError:
            return  # lent out: its job finds out, and putconn drops it
        self._discard(conn)
        self._maybe_grow()

    def wait_error(self, waited):
        """The error for a job that waited *waited* seconds and got no connection."""
        if self.last_error is not None:
            return ServiceUnavailable(
                "the database is unreachable (waited %.2f s): %s" % (waited, _one_line(self.last_error))
            )
        return QueryTimeout(
            "no connection of pool %r became free within %.2f s (%d of max_size %d busy)"
            % (self.name, waited, len(self._connections) - len(self._idle), self.max_size)
        )

    @property
    def unreachable(self):
        """True while no connection is open and the latest attempt to open one failed."""
        return self.last_error is not None and not self._connections

    def outage_error(self):
        """ServiceUnavailable for a job that should not wait for a connection now, else None.

        Waiting makes sense during a short outage (a restart, a failover),
        which the pool rides out by reconnecting. It only delays the same
        error when the database has not been reached since the pool opened,
        refused us for good (a password, a database that does not exist), or
        has been unreachable for longer than the pool's timeout.
        """
        if not self.unreachable:
            return None
        lasted = self._loop.time() - self._unreachable_since
        if self.ever_connected and lasted <= self.timeout and not refused_for_good(self.last_error):
            return None
        self._retry_soon()
        return ServiceUnavailable(
            "the database is unreachable (for %.1f s, %s): %s" % (lasted, mask_dsn(self.dsn), _one_line(self.last_error))
        )

    # -- growing and shrinking -------------------------------------------------

    def _maybe_grow(self):
        """Open one more connection if a job waits or we are below min_size."""
        if self._closed or self._opening or self._retry_handle is not None:
            return
        size = len(self._connections)
        # Unreachable, it goes on trying even with min_size 0: that is how it
        # learns that the database is back.
        floor = self.min_size or (1 if self.unreachable else 0)
        wanted = size < floor or self._waiting_count > 0
        if wanted and size < self.max_size:
            self._opening = self._loop.create_task(self._open_one())

    async def _open_one(self):
        self._numbers += 1
        try:
            conn = await PooledConnection.connect(
                self.dsn, self._numbers, self._loop, self._lost, self._loop.time() + self.connect_timeout
            )
        except Exception as exc:
            self._opening = None
            self._connect_failed(exc)
            return
        self._opening = None
        self._backoff.reset()
        self.last_error = None
        self.ever_connected = True
        self._unreachable_since = None
        if self._closed:
            conn.close()
            return
        self.connections_num += 1
        self._connections.add(conn)
        logger.info(
            "opened connection #%d; pool %r has %d (min %d, max %d)",
            conn.number, self.name, len(self._connections), self.min_size, self.max_size,
        )
        conn.lent = True
        self._pass_on(conn)
        if len(self._connections) >= self.min_size and not self._opened.done():
            self._opened.set_result(None)
        self._maybe_grow()

    async def check(self):
        """Open a connection now unless one is open: can the pool reach its database?

        For a pool with min_size 0, which opens nothing until a job comes.
        The outcome is in :attr:`last_error`; a failure is retried as usual.
        """
        if not self._connections and self._opening is None:
            self._opening = self._loop.create_task(self._open_one())
            await asyncio.shield(self._opening)

    async def cancel(self, conn):
        """Ask the server to cancel the query running on *conn*, one of this pool's connections.

        By a cancel request, which needs no free connection slot, bounded by
        ``connect_timeout``; OperationalError if it could not be sent.
        """
        await cancel_query(conn.pgconn, self.connect_timeout)

    def _connect_failed(self, exc):
        self.connections_errors += 1
        self.last_error = exc
        if not self._connections and self._unreachable_since is None:
            self._unreachable_since = self._loop.time()
        delay = self._backoff.next_delay()
        logger.warning(
            "cannot connect to the database (%s); retrying in %.2f s", _one_line(exc), delay
        )
        if not self._opened.done():
            self._opened.set_result(None)
        self._retry_handle = self._loop.call_later(delay, self._retry)

    def _retry_soon(self):
        """Jobs are being turned away: try again within the backoff's first delay, not its longest.

        Without jobs, the attempts space out to MAX_DELAY; with jobs coming,
        the pool notices a database that came back within INITIAL_DELAY.
        """
        soon = self._loop.time() + Backoff.INITIAL_DELAY
        if self._retry_handle is not None and self._retry_handle.when() > soon:
            self._retry_handle.cancel()
            self._backoff.reset()
            self._retry_handle = self._loop.call_at(soon, self._retry)

    def _retry(self):
        self._retry_handle = None
        self._maybe_grow()

    def _discard(self, conn):
        self._connections.discard(conn)
        if conn.pgconn.closed and not conn.dropped and not self._closed:
            self.connections_lost += 1
            logger.warning(
                "connection #%d was closed by the server (terminated, the server restarted, or "
                "the network failed); replacing it", conn.number,
            )
        conn.close()

    async def _maintain(self):
        """Close connections idle for longer than max_idle, down to min_size."""
        interval = max(0.05, min(self.max_idle / 4, 10.0))
        while True:
            await asyncio.sleep(interval)
            try:
                self._close_idle()
                self._maybe_grow()
            except Exception:  # a background loop logs its failure and goes on
                logger.exception("pool maintenance failed")

    def _close_idle(self):
        now = self._loop.time()
        while (
            self._idle
            and len(self._connections) > self.min_size
            and now - self._idle[0].last_used >= self.max_idle
        ):
            conn = self._idle.popleft()
            self._discard(conn)
            logger.info(
                "closed connection #%d, idle %.0f s; pool %r has %d",
                conn.number, now - conn.last_used, self.name, len(self._connections),
            )

    # -- introspection ---------------------------------------------------------

    @property
    def size(self):
        return len(self._connections)

    def get_stats(self):
        now = self._loop.time() if self._loop else 0.0
        return {
            "pool_min": self.min_size,
            "pool_max": self.max_size,
            "pool_size": len(self._connections),
            "pool_available": len(self._idle),
            "requests_waiting": self._waiting_count,
            "requests_waits": self.requests_waits,
            "connections_num": self.connections_num,
            "connections_errors": self.connections_errors,
            "connections_lost": self.connections_lost,
            "sessions_reset": self.sessions_reset,
            "database_reachable": not self.unreachable,
            "last_error": _one_line(self.last_error) if self.last_error else None,
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


def _in_transaction(conn):
    status = conn.pgconn.get_transaction_status()
    return status in (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR)


def check_sizes(min_size, max_size):
    """Raise ValueError, saying what is wrong, unless the pool bounds make sense."""
    if not 0 <= min_size <= max_size or max_size < 1:
        raise ValueError(
            "need 0 <= min_size <= max_size and max_size >= 1, got min_size=%r max_size=%r"
            % (min_size, max_size)
        )


#: What libpq says when the server refuses us for a reason that waiting will
#: not change (in English, the server's default lc_messages).
_REFUSALS_FOR_GOOD = (
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "permission denied for database",
    "invalid connection option",
    "invalid sslmode",
)


def refused_for_good(exc):
    """True if connecting failed for a reason that retrying will not change.

    A DSN that does not parse (psycopg2 raises ProgrammingError), a wrong
    password, a role or database that does not exist: the daemon must not
    start on these. A server that is down or starting up may yet come.
    """
    if isinstance(exc, psycopg2.ProgrammingError):
        return True
    text = str(exc).lower()
    return any(refusal in text for refusal in _REFUSALS_FOR_GOOD)


def mask_dsn(dsn):
    """*dsn* with its password replaced by ``***``, fit for logs and status."""
    try:
        params = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "(a connection string that does not parse)"
    if "password" in params:
        params["password"] = "***"
    return make_dsn(**params)


def _one_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


class _Borrower:
    """getconn()'s waiter: a future the pool's connection goes to, and a timer."""

    __slots__ = ("pool", "future", "timer", "since")

    def __init__(self, pool, deadline):
        loop = pool._loop
        self.pool = pool
        self.future = loop.create_future()
        self.since = loop.time()
        self.timer = loop.call_at(deadline, self._expire)

    def accept(self, conn):
        if self.future.done():
            return False
        self.timer.cancel()
        self.future.set_result(conn)
        return True

    def fail(self, error):
        if not self.future.done():
            self.future.set_exception(error)
            self.pool.withdraw(self)

    def _expire(self):
        self.fail(self.pool.wait_error(self.pool._loop.time() - self.since))

    async def connection(self):
        try:
            return await self.future
        except asyncio.CancelledError:
            if self.future.cancelled():  # cancelled while it waited: it waits no more
                self.timer.cancel()
                self.pool.withdraw(self)
            else:  # cancelled just as it was handed a connection: pass it on
                self.pool.putconn(self.future.result())
            raise
