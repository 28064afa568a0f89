"""The pool's connections: opening them one at a time, replacing broken ones, closing idle ones.

:class:`ConnectionSupply` keeps the set of open connections between
``min_size`` and ``max_size``: it opens one more when a job waits (or the
set is below ``min_size``), retries with :mod:`health`'s backoff when the
database cannot be reached, drops a connection the server ended, closes
the ones idle for longer than ``max_idle`` down to ``min_size``, and
retires each connection once it is ``max_lifetime`` old (when it is next
idle), so that a backend's memory does not grow for ever and a DNS change
or a failover reaches the pool. What it lends and to whom is
:class:`~dbservice.pool.AsyncConnectionPool`'s.
"""

import asyncio
import collections
import logging
import math
import random
from typing import Deque, Optional, Set

from .connection import PooledConnection
from .errors import ServiceUnavailable
from .health import Backoff, Reachability, mask_dsn, one_line

logger = logging.getLogger("dbservice.pool")


class ConnectionSupply:
    """The open connections of a pool, and their coming and going; see the module's docstring.

    A subclass says how many jobs wait (:attr:`waiting`) and passes a new or
    returned connection on (:meth:`_pass_on`).
    """

    #: A connection's lifetime is max_lifetime shortened by up to this
    #: fraction, drawn for each (psycopg_pool's jitter): those opened together
    #: do not all close together.
    LIFETIME_JITTER = 0.05

    def __init__(
        self,
        dsn: str,
        min_size: int,
        max_size: int,
        max_idle: float,
        connect_timeout: float,
        name: str,
        max_prepared: int = 0,
        max_lifetime: float = 0.0,
    ) -> None:
        check_sizes(min_size, max_size)
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.max_idle = max_idle
        self.max_lifetime = max_lifetime  # 0: no limit
        self.connect_timeout = connect_timeout
        self.name = name
        self.max_prepared = max_prepared  # statements each connection keeps prepared (prepared.py)
        self.health = Reachability(mask_dsn(dsn))
        self.connections_num = 0
        self.connections_lost = 0
        self.connections_expired = 0
        self._connections: Set[PooledConnection] = set()
        #: the closed connections whose server has not hung up yet (PooledConnection.close)
        self._closing: "Set[asyncio.Future[None]]" = set()
        # least recently used first: lent from the right, closed from the left
        self._idle: Deque[PooledConnection] = collections.deque()
        self._opening: "Optional[asyncio.Task[None]]" = None  # the task opening a connection, if one is
        self._retry_handle: Optional[asyncio.TimerHandle] = None
        self._maintenance: "Optional[asyncio.Task[None]]" = None
        self._numbers = 0
        self._closed = True
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # open()'s, before any use
        self._opened: "asyncio.Future[None]" = None  # type: ignore[assignment]  # open()'s: set once the first fill succeeded or failed
        #: paused (see suspend): no connection is lent or opened, each closes as it comes back
        self.suspended = False
        self._emptied: "asyncio.Future[None]" = None  # type: ignore[assignment]  # suspend()'s: done once no connection is open

    async def open(self, wait: bool = True) -> None:
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

    async def _stop_supplying(self) -> None:
        """No more connections: stop opening and closing them, then close the idle ones."""
        self._closed = True
        if self._retry_handle:
            self._retry_handle.cancel()
        tasks = [task for task in (self._maintenance, self._opening) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _close_all_idle(self) -> None:
        while self._idle:
            self._discard(self._idle.popleft())

    def _stop_waiting_for_hang_ups(self) -> None:
        """The pool is closed: wait for no server to hang up (their sockets close now)."""
        for gone in list(self._closing):
            gone.cancel()

    def suspend(self) -> "asyncio.Future[None]":
        """Open no connection and close every one: the idle now, the lent as they come back.

        What a pause is made of (see maintenance.py): a job waits, without
        being told the database is unreachable, until :meth:`resume`. Returns
        a future done once no connection is open and the server has hung up
        each one (:attr:`server_connections` is 0); cancelled if the pool
        resumes first.
        """
        if not self.suspended:
            self.suspended = True
            self._emptied = self._loop.create_future()
            self._close_all_idle()
            self._check_emptied()
        return self._emptied

    def resume(self) -> None:
        """Open connections again, for the jobs that waited first."""
        if self.suspended:
            self.suspended = False
            self._emptied.cancel()  # a no-op once it is done
            self._maybe_grow()

    @property
    def paused(self) -> bool:
        """True once suspended with no connection open: the pause is complete."""
        return self.suspended and self._emptied.done()

    def _check_emptied(self) -> None:
        if self.suspended and not self.server_connections and self._opening is None and not self._emptied.done():
            self._emptied.set_result(None)

    def resize(self, min_size: int, max_size: int) -> None:
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

    @property
    def size(self) -> int:
        return len(self._connections)

    @property
    def server_connections(self) -> int:
        """The pool's connections the server still has: those open, and those closed it has not hung up yet."""
        return len(self._connections) + len(self._closing)

    @property
    def last_error(self) -> Optional[BaseException]:
        return self.health.last_error

    @property
    def unreachable(self) -> bool:
        """True while no connection is open and the latest attempt to open one failed."""
        return self.health.down(not self._connections)

    def outage_error(self) -> Optional[ServiceUnavailable]:
        """ServiceUnavailable for a job that should not wait for a connection now, else None.

        See :meth:`Reachability.outage_error`; jobs turned away also make the
        pool try again soon.
        """
        if self.health.last_error is None or self.suspended:  # every job asks: the usual answer, at once
            return None
        error = self.health.outage_error(self._loop.time(), not self._connections, self.patience)
        if error is not None:
            self._retry_soon()
        return error

    def _lost(self, conn: PooledConnection) -> None:
        """The server ended *conn* while it was idle: drop it now."""
        try:
            self._idle.remove(conn)
        except ValueError:
            return  # lent out: its job finds out, and putconn drops it
        self._discard(conn)
        self._maybe_grow()

    def _maybe_grow(self) -> None:
        """Open one more connection if a job waits or we are below min_size."""
        if self._closed or self._opening or self._retry_handle is not None or self.suspended:
            return
        size = len(self._connections)
        # Unreachable, it goes on trying even with min_size 0: that is how it
        # learns that the database is back.
        floor = self.min_size or (1 if self.unreachable else 0)
        wanted = size < floor or self.waiting > 0
        if wanted and size < self.max_size:
            self._opening = self._loop.create_task(self._open_one())

    async def _open_one(self) -> None:
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
        self.health.connected()
        if self._closed:
            conn.close()
            return
        conn.expires_at = self._expiry()
        self.connections_num += 1
        conn.statements.max_prepared = self.max_prepared
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

    async def check(self) -> None:
        """Open a connection now unless one is open: can the pool reach its database?

        For a pool with min_size 0, which opens nothing until a job comes.
        The outcome is in :attr:`last_error`; a failure is retried as usual.
        """
        if not self._connections and self._opening is None:
            self._opening = self._loop.create_task(self._open_one())
            await asyncio.shield(self._opening)

    def _connect_failed(self, exc: BaseException) -> None:
        delay = self.health.failed(exc, self._loop.time(), not self._connections)
        logger.warning("cannot connect to the database (%s); retrying in %.2f s", one_line(exc), delay)
        if not self._opened.done():
            self._opened.set_result(None)
        self._retry_handle = self._loop.call_later(delay, self._retry)
        self._check_emptied()

    def _retry_soon(self) -> None:
        """Jobs are being turned away: try again within the backoff's first delay, not its longest.

        Without jobs, the attempts space out to MAX_DELAY; with jobs coming,
        the pool notices a database that came back within INITIAL_DELAY.
        """
        soon = self._loop.time() + Backoff.INITIAL_DELAY
        if self._retry_handle is not None and self._retry_handle.when() > soon:
            self._retry_handle.cancel()
            self.health.backoff.reset()
            self._retry_handle = self._loop.call_at(soon, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        self._maybe_grow()

    def _expiry(self) -> float:
        """When a connection opened now has lived its max_lifetime, on the loop's clock."""
        if not self.max_lifetime:
            return math.inf
        return self._loop.time() + self.max_lifetime * (1.0 - random.uniform(0.0, self.LIFETIME_JITTER))

    def _retire(self, conn: PooledConnection) -> None:
        """Close *conn*, idle and past its lifetime; a new one replaces it if the pool needs one."""
        self.connections_expired += 1
        self._discard(conn)
        logger.info(
            "closed connection #%d: it reached max_lifetime (%g s); pool %r has %d",
            conn.number, self.max_lifetime, self.name, len(self._connections),
        )
        self._maybe_grow()

    def _discard(self, conn: PooledConnection) -> None:
        self._connections.discard(conn)
        if conn.pgconn.closed and not conn.dropped and not self._closed:
            self.connections_lost += 1
            logger.warning(
                "connection #%d was closed by the server (terminated, the server restarted, or "
                "the network failed); replacing it", conn.number,
            )
        gone = conn.close()
        if not gone.done():
            self._closing.add(gone)
            gone.add_done_callback(self._hung_up)
        self._check_emptied()

    def _hung_up(self, gone: "asyncio.Future[None]") -> None:
        self._closing.discard(gone)
        self._check_emptied()

    async def _maintain(self) -> None:
        """Close connections idle for longer than max_idle, down to min_size, and those past their lifetime."""
        interval = max(0.05, min(self.max_idle / 4, (self.max_lifetime or math.inf) / 4, 10.0))
        while True:
            await asyncio.sleep(interval)
            try:
                self._close_idle()
                self._retire_expired()
                self._maybe_grow()
            except Exception:  # a background loop logs its failure and goes on
                logger.exception("pool maintenance failed")

    def _retire_expired(self) -> None:
        now = self._loop.time()
        for conn in [conn for conn in self._idle if conn.expires_at <= now]:
            self._idle.remove(conn)
            self._retire(conn)

    def _close_idle(self) -> None:
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



def check_sizes(min_size: int, max_size: int) -> None:
    """Raise ValueError, saying what is wrong, unless the pool bounds make sense."""
    if not 0 <= min_size <= max_size or max_size < 1:
        raise ValueError(
            "need 0 <= min_size <= max_size and max_size >= 1, got min_size=%r max_size=%r"
            % (min_size, max_size)
        )
