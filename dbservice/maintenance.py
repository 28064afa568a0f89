"""Pausing the daemon so that its database can be restarted or failed over: ``dbserviced pause`` and ``resume``.

As PgBouncer's PAUSE: the pool lends no more connections, so new jobs wait
(each up to its own timeout, or ``pool_timeout`` without one), and closes
each connection as it comes back. Jobs running go on to their end, and so do
the transactions open: their statements are not held, since holding them
would make the pause wait for itself; a new transaction's BEGIN is held like
any job. Once no connection is open the daemon is *paused*: nothing of it
touches the database, which can go down and come back, or be replaced by a
standby behind the same DSN. ``resume`` opens connections again, by the DSN
anew, and the held jobs run in the order they came.
"""

import asyncio
import logging

from .errors import Error

logger = logging.getLogger("dbservice.maintenance")


class Maintenance:
    """The pause and resume of *engine*'s pool, as its operator asks for them."""

    def __init__(self, engine):
        self.engine = engine
        self.pool = engine.pool
        self._answering = set()  # the tasks that answer a pause command

    def pause(self, timeout, reply):
        """Pause; ``reply(ok, figures)`` once no connection is open, or after *timeout* seconds.

        Answered early, the pause still goes on: the figures say how many
        connections its jobs and transactions still hold.
        """
        if not self.pool.suspended:
            logger.info("pausing: new jobs wait; %d connections close as their jobs end", self.pool.size)
            self.pool.suspend().add_done_callback(self._paused)
        task = asyncio.ensure_future(self._answer(timeout, reply))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, timeout, reply):
        try:
            await asyncio.wait_for(asyncio.shield(self.pool.suspend()), timeout)
        except asyncio.TimeoutError:
            pass  # still pausing: the figures say what it waits for
        except asyncio.CancelledError:
            reply(False, Error("the daemon was resumed before every connection had closed"))
            return
        reply(True, self.figures())

    def _paused(self, emptied):
        if not emptied.cancelled():
            logger.info("paused: the pool holds no connection to the database; %d jobs wait", self.pool.waiting)

    def resume(self):
        """Resume; return the figures as they were, with the jobs the pause held."""
        figures = self.figures()
        if self.pool.suspended:
            self.pool.resume()
            logger.info("resumed: %d jobs that waited go on", figures["held"])
        return figures

    def figures(self):
        return {
            "pause": self.pool.get_stats()["pause"],
            "connections_open": self.pool.size,
            "held": self.pool.waiting,
            "transactions_open": len(self.engine.transactions),
        }
