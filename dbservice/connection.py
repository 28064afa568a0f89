"""PooledConnection: one psycopg2 async connection, watched on the event loop.

It is the one driver of its socket, for connecting, running a job and
cancelling one alike. The socket stays registered for reading from open to
close, instead of being added to the selector and removed again around
every wait: that pair of epoll_ctl calls was the event loop's largest cost
per job. A writer is added only while libpq asks to write. The
registration also notices, at no cost, when the server ends an idle
connection (a restart, pg_terminate_backend): the socket turns readable, and
the pool drops the connection before a job is lost on it.
"""

import functools
import math
import os
import socket

import psycopg2
import psycopg2.extensions as ext

from . import types
from .loops import at_its_end, unwatches_after_error
from .prepared import ConnectionStatements
from .wait import hung_up, set_done, until, wait_writable


class PooledConnection:
    """A psycopg2 async connection, the pool's bookkeeping for it, and its waits.

    Close it with :meth:`close`, never ``pgconn.close()``: its socket must
    leave the selector first, or a later socket given the same number would
    find it taken.
    """

    #: Seconds the server has, once a connection is closed, to hang up too (its backend exits).
    HANG_UP_TIMEOUT = 5.0

    __slots__ = (
        "pgconn", "number", "lent", "last_used", "jobs_done", "needs_reset", "gate", "dropped", "expires_at",
        "statements", "_gone",
        "_loop", "_fd", "_watching", "_busy", "_connecting", "_on_readable", "_on_lost",
        "_unwatches_after_error", "_woken",
    )

    @classmethod
    async def connect(cls, dsn, number, loop, on_lost, deadline):
        """Open a connection to *dsn*, without blocking the loop; QueryTimeout or the server's error at *deadline*."""
        conn = cls(psycopg2.connect(dsn, async_=True), number, loop, on_lost)
        conn._busy = conn._connecting = True  # what the socket says is for wait()
        try:
            await conn.wait(deadline)
            types.register(conn.pgconn)
        except BaseException:
            conn.close()
            raise
        conn._connecting = False
        conn._watch()
        return conn

    def __init__(self, pgconn, number, loop, on_lost):
        self.pgconn = pgconn
        self.number = number
        #: lent to a job (or being reset for the next), not idle in the pool
        self.lent = False
        self.last_used = loop.time()
        self.jobs_done = 0
        #: a job on it may have changed its session: reset before it serves another
        self.needs_reset = False
        #: the ResultGate of the client whose job runs on it (backpressure.py), if any
        self.gate = None
        self.dropped = False  # closed by us, not by the server
        self.expires_at = math.inf  # on the loop's clock: when the pool retires it (max_lifetime)
        #: what it prepared on the server (prepared.ConnectionStatements)
        self.statements = ConnectionStatements(0)
        #: once closed: a future done when the server has hung up too, its backend gone (see close)
        self._gone = None
        self._loop = loop
        self._on_readable = None  # who waits for the reply: called once, when it arrives
        self._busy = False  # an operation is under way: what comes is its reply
        self._on_lost = on_lost  # called when the server ends it while idle
        self._fd = pgconn.fileno()
        self._watching = False
        self._connecting = False
        #: the loop may have stopped watching the socket when it called us (loops.unwatches_after_error)
        self._unwatches_after_error = unwatches_after_error(loop)
        self._woken = False  # on such a loop: the socket spoke in error since the last poll() or wait
        self._watch()

    def __repr__(self):
        return "<PooledConnection #%d%s>" % (self.number, " lent" if self.lent else "")

    @property
    def usable(self):
        return not self.pgconn.closed and (
            self.pgconn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
        )

    async def wait(self, deadline=None, gated=False):
        """Drive ``poll()`` until the operation under way is done.

        Raises the operation's own error, or QueryTimeout when the loop's
        clock passes *deadline*: the operation then still runs on the server,
        and the caller must cancel it or close the connection. *gated*: a
        job's result, whose reading waits for its client's turn once it takes
        more than one read (see backpressure.py).
        """
        loop = self._loop
        arrived = False  # some of the reply was read: reading on is reading a large result
        while True:
            state = self.poll()
            if state == ext.POLL_OK:
                return
            if self._connecting:
                self._follow_socket()
            if state == ext.POLL_READ:
                if gated and arrived and self.gate is not None:
                    await self.gate.turn(self, deadline)
                arrived = True
                readable = loop.create_future()
                self.when_readable(functools.partial(set_done, readable))
                try:
                    await until(loop, readable, deadline)
                finally:
                    self._on_readable = None
            elif state == ext.POLL_WRITE:
                await wait_writable(loop, self._fd, deadline)
            else:  # pragma: no cover - psycopg2 documents no other state
                raise ext.OperationalError("unexpected poll() state %r" % (state,))

    def _follow_socket(self):
        """Watch the socket libpq uses now: connecting to several hosts, or retrying, it opens new ones.

        Registered anew at each step, since a new socket can take the number
        of the one closed before it.
        """
        self._unwatch()
        self._fd = self.pgconn.fileno()

    def when_readable(self, callback):
        """Call ``callback()`` once, when the reply to the operation under way arrives.

        The fast path's wait (see :class:`dbservice.runner.Statement`): no
        future, no task. None takes back a callback that is still pending.
        """
        self._on_readable = callback
        if callback is not None:
            if self._woken:  # what read since did not poll(): libpq's own functions, a COPY's
                self._woken = False
                self._rewatch()
            self._watch()

    def poll(self):
        woken, self._woken = self._woken, False
        try:
            state = self.pgconn.poll()
        except BaseException:
            self._busy = False
            if not self._forget_if_closed() and not self._connecting:  # a failed connect has no socket left
                self._watch()  # again, if the error came while nobody waited
                if woken:
                    self._rewatch()
            raise
        if state == ext.POLL_OK:
            self._busy = False
            self._watch()  # again, if the reply came while nobody waited
        if woken and not self._connecting:  # connecting, wait() watches each step's socket anew anyway
            # Whatever it read (part of a reply, all of it), the socket, open
            # still, must be watched for what follows: the end of the connection.
            self._rewatch()
        return state

    def execute(self, cursor, sql, params=None):
        """``cursor.execute()``, noticing if it found the connection gone."""
        try:
            cursor.execute(sql, params)
        except BaseException:
            self._forget_if_closed()
            raise
        self._busy = True

    def driven_by_libpq(self):
        """libpq's own functions run what follows, unseen by psycopg2 (a COPY: see copying.py).

        Until the next :meth:`poll`, what the socket says is for whoever waits
        on it (:meth:`when_readable`), never read by ``poll()``, which would
        take the operation's results for its own; that ``poll()``, once the
        operation is over, hands the connection back to psycopg2.
        """
        self._busy = True

    def release_gate(self):
        """The job on it is over: its client's turn to read a large result, if it had it, ends."""
        if self.gate is not None:
            self.gate.done(self)
            self.gate = None

    def close(self):
        """Close it now; return a future done once the server has hung up too (and the same one ever after).

        A backend keeps its socket open until its process has exited, so
        that a client may wait for that (PostgreSQL's "synchronous close"):
        once the future is done no backend of this connection is left, in
        ``pg_stat_activity`` or anywhere. At most ``HANG_UP_TIMEOUT`` seconds.
        """
        if self._gone is None:
            self.dropped = not self.pgconn.closed
            self._unwatch()
            kept = self._keep_socket()
            self._fd = None
            self.pgconn.close()  # libpq says goodbye (Terminate) and closes its descriptor; ours stays open
            self._gone = hung_up(self._loop, kept, self.HANG_UP_TIMEOUT)
        return self._gone

    def _keep_socket(self):
        """A socket of our own on the connection's, to see the server hang up; None if it is closed."""
        if self.pgconn.closed or self._fd is None:
            return None
        try:
            return socket.socket(fileno=os.dup(self._fd))
        except OSError:  # out of descriptors: the close just cannot be waited for
            return None

    def _readable(self):
        callback = self._on_readable
        if callback is not None:
            self._on_readable = None
            self._woken = self._unwatches_after_error and at_its_end(self._fd)
            callback()
            return
        if self._busy:
            # The reply to the operation under way, before anyone waits for
            # it (a cancel is on its way, say): it is theirs to read, so stop
            # watching until they wait, or the selector reports it again and
            # again.
            self._unwatch()
            return
        # Nobody waits, so the server spoke unasked: a notice, a notification,
        # or the end of the connection. Read it, or the selector reports it
        # again and again; nobody reads notifications here, so drop them.
        try:
            self.pgconn.poll()
        except psycopg2.Error:
            pass
        if self.pgconn.notifies:
            del self.pgconn.notifies[:]
        if self._forget_if_closed():
            self._on_lost(self)
        elif self._unwatches_after_error and at_its_end(self._fd):
            self._rewatch()  # the end of the connection came with what it read: to be read next

    def _forget_if_closed(self):
        """Unregister a socket libpq has closed, before its number is reused."""
        if not self.pgconn.closed:
            return False
        self._unwatch()
        self._fd = None
        return True

    def _watch(self):
        if not self._watching and self._fd is not None:
            self._loop.add_reader(self._fd, self._readable)
            self._watching = True

    def _unwatch(self):
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False

    def _rewatch(self):
        """Watch the socket anew, on a loop that may have stopped without a word (loops.unwatches_after_error)."""
        if self._watching:
            self._unwatch()
            self._watch()
