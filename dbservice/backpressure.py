"""What one client connection may make the daemon hold: backpressure on its jobs and results.

A client that sends jobs and does not read their replies would have the
daemon buffer every reply (10 jobs of 150 MB each held 1.5 GB). So for each
client connection (see ``socket_intake``):

- at most ``max_client_jobs`` of its jobs are in the daemon at once; its
  further frames wait unread, in the socket;
- once ``max_client_buffer`` bytes of its replies wait to be sent, it is
  *backed up*: no new job of its is read, and its running jobs read no more
  of their results from the server, which then waits on its socket, as it
  does for a slow client of its own;
- of its results that take more than one read from the server (the large
  ones), one is read at a time (:class:`ResultGate`), so that what the daemon
  holds for it is the bound plus one reply, however many such jobs it runs;
- a client that stays backed up for ``client_stall_timeout`` seconds is
  dropped, and its jobs are cancelled. A connection in the middle of one of
  its large results is closed rather than drained: nobody will read it.
"""

import asyncio
import collections

import psycopg2

from .wait import until


class GateClosed(psycopg2.OperationalError):
    """The client went away while its job's result was being read: close, do not drain."""


class ResultGate:
    """One client's turn to read large results: one at a time, none while it is backed up.

    A connection whose job's result did not arrive in one read asks
    :meth:`may_read` (callback drivers) or awaits :meth:`turn` (tasks) before
    each further read; :meth:`done` ends its turn when the job lets go of it.
    """

    __slots__ = ("backed_up", "closed", "_reading", "_parked")

    def __init__(self):
        self.backed_up = False
        self.closed = False
        self._reading = None  # the connection whose turn it is
        self._parked = collections.deque()  # (connection, resume) waiting for a turn, in order

    def may_read(self, conn, resume):
        """True if *conn* may read on now; else False, and ``resume()`` is called at its turn.

        Raises GateClosed once the client is gone.
        """
        if self.closed:
            raise GateClosed("its client went away in the middle of a large result")
        if not self.backed_up and self._reading in (None, conn):
            self._reading = conn
            return True
        if self._reading is conn:  # its turn, but backed up: first again once it drains
            self._reading = None
            self._parked.appendleft((conn, resume))
        else:
            self._parked.append((conn, resume))
        return False

    async def turn(self, conn, deadline):
        """Wait for *conn*'s turn; QueryTimeout at *deadline* (on the loop's clock)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        if not self.may_read(conn, lambda: ready.done() or ready.set_result(None)):
            await until(loop, ready, deadline)

    def done(self, conn):
        """*conn*'s job is done with its result: the next one waiting reads."""
        if any(parked is conn for parked, _ in self._parked):
            self._parked = collections.deque(item for item in self._parked if item[0] is not conn)
        if self._reading is conn:
            self._reading = None
            self._wake()

    def close(self):
        """The client went away: return the connections in the middle of its large results.

        Their caller closes them, which ends the server's sending too; asking
        for a turn from now on raises GateClosed.
        """
        self.closed = True
        conns = [conn for conn, _ in self._parked]
        if self._reading is not None:
            conns.append(self._reading)
        self._parked = collections.deque()
        self._reading = None
        return conns

    def set_backed_up(self, backed_up):
        self.backed_up = backed_up
        self._wake()

    def _wake(self):
        if self._parked and self._reading is None and not self.backed_up:
            conn, resume = self._parked.popleft()
            self._reading = conn
            resume()
