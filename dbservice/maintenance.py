"""Pausing the daemon so that its database can be restarted or failed over: ``dbserviced pause`` and ``resume``.

As PgBouncer's PAUSE: the pool lends no more connections, so new jobs wait
(each up to its own timeout, or ``pool_timeout`` without one), and closes
each connection as it comes back; the listening connection of LISTEN/NOTIFY
subscribers closes at once (listener.py). Jobs running go on to their end, and so do
the transactions open: their statements are not held, since holding them
would make the pause wait for itself; a new transaction's BEGIN is held like
any job. Once no connection is open, and the server has hung up each one
(its backend has exited, see ``PooledConnection.close``), the daemon is
*paused*: nothing of it touches the database, which can go down and come back, or be replaced by a
standby behind the same DSN. ``resume`` opens connections again, by the DSN
anew, and the held jobs run in the order they came; the daemon listens again
and tells each subscriber, by a ``NotificationsLost`` marker, that what was
sent meanwhile was missed. With replicas, only the primary is paused: the
listening connection is the primary's, and the pause is complete once the
poller of the primary's WAL position has hung up too (hosts.py).
"""

import asyncio
import logging

from .errors import Error

logger = logging.getLogger("dbservice.maintenance")


class Maintenance:
    """The pause and resume of *engine*'s pool and listener, as its operator asks for them."""

    def __init__(self, engine):
        self.engine = engine
        self.pool = engine.pool
        self.listener = engine.listener
        self._emptied = None  # while paused: done once the server has none of the connections a pause closes
        self._answering = set()  # the tasks that answer a pause command

    def pause(self, timeout, reply):
        """Pause; ``reply(ok, figures)`` once no connection is open, or after *timeout* seconds.

        Answered early, the pause still goes on: the figures say how many
        connections its jobs and transactions still hold.
        """
        if self._emptied is None:
            logger.info("pausing: new jobs wait; %d connections close as their jobs end", self.connections_open)
            closing = asyncio.gather(self.pool.suspend(), self.listener.pause())  # both begin now
            self._emptied = asyncio.ensure_future(self._empty(closing))  # a resume cancels it
            self._emptied.add_done_callback(self._paused)
        task = asyncio.ensure_future(self._answer(timeout, reply))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _empty(self, closing):
        await closing
        if self.engine.router is not None:  # it samples the primary until the pool is paused, then hangs up
            await self.engine.router.let_go_of_primary()

    async def _answer(self, timeout, reply):
        try:
            await asyncio.wait_for(asyncio.shield(self._emptied), timeout)
        except asyncio.TimeoutError:
            pass  # still pausing: the figures say what it waits for
        except asyncio.CancelledError:
            reply(False, Error("the daemon was resumed before every connection had closed"))
            return
        reply(True, self.figures())

    def _paused(self, emptied):
        if _complete(emptied):
            logger.info("paused: no connection to the database is open; %d jobs wait", self.pool.waiting)

    def resume(self):
        """Resume; return the figures as they were, with the jobs the pause held."""
        figures = self.figures()
        if self._emptied is not None:
            self._emptied.cancel()  # a no-op once it is done
            self._emptied = None
            self.pool.resume()
            self.listener.resume()
            logger.info("resumed: %d jobs that waited go on", figures["held"])
        return figures

    @property
    def state(self):
        """None, "pausing" while connections are open, or "paused" once none is: ``status``'s ``pause``."""
        if self._emptied is None:
            return None
        return "paused" if _complete(self._emptied) else "pausing"

    @property
    def connections_open(self):
        """The connections a pause closes that the server still has: the pool's, the listener's, the primary's poller's.

        Each counts from its opening until the server has hung up, its
        backend gone: an operator who waits for 0 may restart the database.
        """
        router = self.engine.router
        return self.pool.server_connections + self.listener.server_connections + (
            0 if router is None else router.primary_connections
        )

    def figures(self):
        return {
            "pause": self.state,
            "connections_open": self.connections_open,
            "held": self.pool.waiting,
            "transactions_open": len(self.engine.transactions),
        }


def _complete(emptied):
    """True once every connection closed, *emptied* says; False while they close, or if a resume came first."""
    return emptied.done() and not emptied.cancelled() and emptied.exception() is None
