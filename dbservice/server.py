"""The engine: one job queue, a dispatcher, and the pool the jobs run on.

Intakes (the multiprocessing queue, the Unix socket) hand jobs to
:meth:`Server.submit` with a reply callback. Jobs run in order of arrival on
the least-loaded connection, so a slow query holds one connection and nothing
else. A job that finds a connection idle starts at once; otherwise it queues,
and the next connection a job is done with starts it, while the dispatcher
has the pool open more. A one-statement job runs by callbacks alone (a
:class:`~dbservice.runner.Statement`); any other job, and a statement that
needs more than one wait, runs in a task. Every job gets exactly one reply:
its result, its error, a timeout, or word that the service is stopping.

Nothing a client sends makes the event loop do unbounded work or hold
unbounded memory. The bounds, and where each is enforced:

- a frame: ``max_frame`` bytes, checked from its header before any of it is
  buffered (``wire.FrameReader``); nothing is decoded before the handshake;
- decoding: the restricted unpickler, whose work is linear in the frame
  (``jobs.loads_job``);
- binding: what the parameters cost once psycopg2 expands them, shared
  references counted as often as they are used, at most
  ``max_params_size``; no cycles, no nesting past 32 (``jobs.check_params``);
- the SQL's session analysis reads at most 64 KiB of it, in linear time
  (``session.may_change_session``);
- waiting jobs: ``max_queue`` queued, as many again waiting for room, each
  for its timeout at most (:meth:`Server.submit`);
- one client connection: ``max_client_jobs`` jobs in the daemon,
  ``max_client_buffer`` bytes of unsent replies, one large result read at a
  time, ``client_stall_timeout`` backed up (``backpressure``);
- a result: ``max_result_bytes`` once pickled (``jobs.encode_reply``);
- time: each job's timeout, ``pool_timeout`` for a job without one, and
  ``CLEANUP_GRACE`` for a cancel or a rollback (``runner``).
"""

import asyncio
import collections
import dataclasses
import functools
import logging
import os
import re
import time

import psycopg2

from .config import reloadable_settings
from .errors import Error, JobRefused, QueryOutcomeUnknown, QueryTimeout, ServiceBusy, ServiceUnavailable
from .jobs import FETCH_BEGIN
from .pool import AsyncConnectionPool, mask_dsn, refused_for_good
from .runner import STATEMENT_FETCHES, Statement, run_job
from .stats import JobStats
from .transactions import TransactionTable

logger = logging.getLogger("dbservice.server")


class PendingJob:
    """A job between intake and reply; :meth:`finish` replies exactly once."""

    __slots__ = (
        "job", "reply", "owner", "deadline", "queued_at", "received", "done", "timer", "task", "started",
        "statement", "cancelled_with", "queued",
    )

    def __init__(self, job, reply, now, owner=None):
        self.job = job
        self.reply = reply
        self.owner = owner  # the client connection it came on, for transactions
        self.queued_at = now  # on the loop's clock, which deadlines are on
        self.received = time.perf_counter()  # for its latency: some loops tick in whole ms
        self.deadline = None if job.timeout is None else now + job.timeout
        self.done = False
        self.timer = None  # at the deadline, or the pool's timeout while it queues
        self.task = None
        self.started = False  # its task took its first step: it can be cancelled at once
        self.statement = None  # while it runs by callbacks (runner.Statement)
        self.cancelled_with = None  # the error to reply with once the task is cancelled
        self.queued = False  # in the server's queue, waiting for a connection

    def finish(self, ok, value):
        """Send the reply unless one was sent already; True if this one went."""
        if self.done:
            return False
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.reply(ok, value)
        return True


class Server:
    """Queue, dispatcher and pool of one daemon, on the running event loop."""

    #: Seconds between two warnings that jobs wait because every connection is busy.
    FULL_POOL_WARNING_INTERVAL = 10.0

    def __init__(self, settings):
        self.settings = settings
        self.pool = AsyncConnectionPool(
            settings.dsn,
            min_size=settings.min_size,
            max_size=settings.max_size,
            max_idle=settings.max_idle,
            timeout=settings.pool_timeout,
            connect_timeout=settings.connect_timeout,
            session_reset=settings.session_reset,
        )
        self.stats = JobStats()
        self.transactions = TransactionTable(self.pool, settings.idle_in_transaction_timeout, self._finish)
        self.started_at = time.time()
        self.accepting = False
        self.reloads = 0
        self.reload_error = None
        self._hurry = asyncio.Event()  # set: a stop waits for no job any more
        self._queue = collections.deque()  # jobs waiting for a connection, oldest first
        self._queued = 0  # of which not answered yet (timed out or cancelled ones stay till popped)
        self._queued_event = None  # set while the queue holds jobs: the dispatcher's cue
        self._overflow = collections.deque()  # jobs waiting for room in the queue
        self._running = {}  # the tasks of jobs, and their PendingJobs
        self._statements = set()  # the PendingJobs running as a Statement
        self._dispatcher = None
        self._loop = None
        self._quiet_until = 0.0  # no warning of a full pool before then, on the loop's clock

    async def start(self):
        """Open the pool and start serving; raise ServiceUnavailable if the database refuses us for good.

        A database that is merely down does not stop the start: the pool
        keeps trying, as PgBouncer does, while jobs fail fast saying why.
        """
        self._loop = asyncio.get_running_loop()
        self._queued_event = asyncio.Event()
        await self.pool.open(wait=True)
        if not self.pool.min_size:
            await self.pool.check()
        error = self.pool.last_error
        if error is not None and refused_for_good(error):
            await self.pool.close()
            raise ServiceUnavailable(
                "the database refuses the daemon's connections (%s): check the DSN (--dsn)"
                % " ".join(str(error).split())
            )
        self._dispatcher = self._loop.create_task(self._dispatch())
        self.accepting = True

    def submit(self, job, reply, owner=None):
        """Queue *job*; ``reply(ok, value)`` is called exactly once, later or now.

        *owner* identifies the client connection, which transactions need: a
        job of an open transaction skips the queue and runs on its pinned
        connection.
        """
        pending = PendingJob(job, reply, self._loop.time(), owner)
        if not self.accepting:
            pending.finish(False, ServiceUnavailable("the dbservice daemon is stopping"))
            return pending
        if job.tx is not None and owner is None:
            self._finish(pending, False, JobRefused("transactions need a connection of their own: use the socket"))
            return pending
        if job.tx is not None and job.fetch != FETCH_BEGIN:
            self._start(pending, self.transactions.run(pending, owner))
            return pending
        if job.fetch == FETCH_BEGIN:
            try:
                self.transactions.begin(pending)
            except JobRefused as exc:
                self._finish(pending, False, exc)
                return pending
        if not self._queued and not self._overflow:
            # Nobody ahead of it: straight onto an idle connection, if one is.
            conn = self.pool.lend_idle()
            if conn is not None:
                self._run_on(pending, conn)
                return pending
        outage = self.pool.outage_error()
        if outage is not None:
            self._finish(pending, False, outage)
        elif self._queued < self.settings.max_queue:
            self._enqueue(pending)
        elif len(self._overflow) < self.settings.max_queue:
            # Wait for room in the queue, up to the job's timeout (the pool's
            # timeout for a job without one): backpressure with a bound.
            self._overflow.append(pending)
            wait_until = pending.deadline or pending.queued_at + self.settings.pool_timeout
            pending.timer = self._loop.call_at(wait_until, self._busy, pending)
        else:
            self._busy(pending)
        return pending

    def _enqueue(self, pending, first=False):
        if first:
            self._queue.appendleft(pending)
        else:
            self._queue.append(pending)
            self._warn_if_pool_full()
        pending.queued = True
        self._queued += 1
        self._queued_event.set()
        # A job without a timeout still waits for a connection no longer than
        # the pool's timeout: if the database stays unreachable, it is told.
        wait_until = pending.deadline or pending.queued_at + self.settings.pool_timeout
        pending.timer = self._loop.call_at(wait_until, self._timer_fired, pending)

    def _warn_if_pool_full(self):
        """Say, at most every FULL_POOL_WARNING_INTERVAL, that jobs wait for want of connections."""
        now = self._loop.time()
        if now < self._quiet_until or self.pool.size < self.pool.max_size:
            return
        self._quiet_until = now + self.FULL_POOL_WARNING_INTERVAL
        logger.warning(
            "%d jobs wait for a connection: all %d connections (max_size) are busy; "
            "if the database can take more, raise --max-size",
            self._queued + 1, self.pool.max_size,
        )

    def _timer_fired(self, pending):
        """The one timer of a job: its deadline, or the pool's timeout while it queued."""
        pending.timer = None
        if pending.statement is None:
            self._finish(pending, False, self.pool.wait_error(self._loop.time() - pending.queued_at))
        else:
            pending.statement.interrupt()  # run_job cancels the query, the deadline being past

    def _next_queued(self):
        """The oldest queued job still waiting, taken off the queue; None if none."""
        found = None
        while self._queue and found is None:
            pending = self._queue.popleft()
            if pending.queued:  # not timed out or cancelled while queued
                pending.queued = False
                self._queued -= 1
                found = pending
        if not self._queue:
            self._queued_event.clear()
        self._admit_overflow()
        return found

    def _admit_overflow(self):
        """Move jobs waiting for room into the queue, oldest first."""
        while self._overflow and self._queued < self.settings.max_queue:
            pending = self._overflow.popleft()
            if not pending.done:
                pending.timer.cancel()
                self._enqueue(pending)

    def _busy(self, pending):
        self._finish(
            pending,
            False,
            ServiceBusy(
                "the dbservice job queue stayed full (max_queue %d, %d more waiting) for %.2f s; "
                "the database cannot keep up: try again later, or raise max_queue or max_size"
                % (self.settings.max_queue, len(self._overflow), self._loop.time() - pending.queued_at)
            ),
        )

    async def _dispatch(self):
        """Start queued jobs on connections the pool lends, opening more as needed.

        A connection freed by a job goes straight to the next queued job
        (:meth:`_release`); the dispatcher serves the queue when none is
        freed: while the pool grows, or after a wait on the database.
        """
        while True:
            await self._queued_event.wait()
            if not self._queued:
                self._next_queued()  # only jobs already answered: drop them
                continue
            try:
                conn = await self.pool.getconn()
            except Error:
                continue  # jobs time out by their own deadlines
            pending = self._next_queued()
            if pending is None:
                self.pool.putconn(conn)
            else:
                self._run_on(pending, conn)

    def _run_on(self, pending, conn):
        """Start *pending* on *conn*: by callbacks if it is one statement, else in a task."""
        if conn.pgconn.closed:
            # The server ended it after it was lent (a restart): nothing was
            # sent on it yet, so the job goes back to the head of the queue.
            self._cancel_timer(pending)
            self.pool.putconn(conn)
            self._enqueue(pending, first=True)
            return
        job = pending.job
        self.pool.note_job(conn, job.sql)
        conn.gate = None if pending.owner is None else pending.owner.gate
        if job.tx is not None or job.fetch not in STATEMENT_FETCHES:
            self._cancel_timer(pending)  # run_job keeps the deadline
            self._start(pending, self._execute(pending, conn))
            return
        if pending.deadline is None:
            self._cancel_timer(pending)  # the queue's, and a running job has no limit
        elif pending.timer is None:
            pending.timer = self._loop.call_at(pending.deadline, self._timer_fired, pending)
        pending.statement = Statement(
            conn, job, functools.partial(self._statement_done, pending), functools.partial(self._hand_over, pending)
        )
        self._statements.add(pending)
        pending.statement.start()

    def _statement_done(self, pending, ok, value):
        self._statements.discard(pending)
        self._release(pending.statement.conn)  # the next job first: the server works while we reply
        if ok:
            self._finish(pending, True, value)
        else:
            self._fail(pending, value)

    def _hand_over(self, pending):
        """A Statement needs more than callbacks: run_job goes on with it, in a task."""
        self._statements.discard(pending)
        self._cancel_timer(pending)
        self._start(pending, self._execute(pending, pending.statement.conn, pending.statement))

    @staticmethod
    def _cancel_timer(pending):
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None

    def _release(self, conn):
        """Give back a connection a job is done with: to the next queued job, or to the pool."""
        conn.release_gate()
        if self._queue and conn.usable and self.pool.lendable and not conn.needs_reset:
            pending = self._next_queued()
            if pending is not None:
                self.pool.pass_on(conn)
                self._run_on(pending, conn)
                return
        self.pool.putconn(conn)

    def _start(self, pending, coroutine):
        task = self._loop.create_task(coroutine)
        pending.task = task
        self._running[task] = pending
        task.add_done_callback(self._running.pop)

    async def _execute(self, pending, conn, statement=None):
        pending.started = True
        job = pending.job
        begins = job.fetch == FETCH_BEGIN
        try:
            result = await run_job(conn, job, pending.deadline, self.pool.cancel, begins, statement)
            if begins and pending.cancelled_with is None:
                conn.release_gate()
                self.transactions.begun(pending, conn)
                conn = None  # the transaction gives it back
            elif begins:  # its client gave up on it meanwhile: the pool rolls it back
                raise pending.cancelled_with
        except asyncio.CancelledError:
            stopped = ServiceUnavailable("the dbservice daemon stopped before the job ended")
            self._finish(pending, False, pending.cancelled_with or stopped)
            raise
        except Exception as exc:
            self._fail(pending, pending.cancelled_with or exc)
        else:
            self._finish(pending, True, result)
        finally:
            if conn is not None:
                self._release(conn)

    def _fail(self, pending, exc):
        """Reply with *exc*: the database's errors and ours as they are, anything else as a bug."""
        if not isinstance(exc, (psycopg2.Error, Error)):
            logger.error("job %r failed inside the daemon", pending.job, exc_info=exc)
            exc = Error("dbservice internal error: %s: %s" % (type(exc).__name__, exc))
        self._finish(pending, False, exc)

    def cancel(self, pending, error):
        """Cancel a job: drop it from the queue, or cancel its query on the server.

        Its reply is *error*, unless the query ends first. A job that already
        ended is left alone.
        """
        if pending.done:
            return
        pending.cancelled_with = error
        if pending in self._statements:
            pending.deadline = self._loop.time()  # run_job takes over and cancels at once
            pending.statement.interrupt()
        elif pending.task is not None:
            self._cancel_task(pending)
        else:
            self._finish(pending, False, error)  # queued: the dispatcher skips it

    def _cancel_task(self, pending):
        """Cancel the task of *pending*, once it has taken its first step.

        Cancelled before it, the coroutine would die without running a line,
        so without replying or giving back its connection. That step is
        queued already, so a cancel queued now comes after it.
        """
        if pending.started:
            pending.task.cancel()
        else:
            self._loop.call_soon(pending.task.cancel)

    def _finish(self, pending, ok, value):
        if not pending.finish(ok, value):
            return
        if not ok and pending.job.fetch == FETCH_BEGIN:
            self.transactions.begun(pending)  # it opened no transaction
        if pending.queued:  # answered while it waited: it no longer counts
            pending.queued = False
            self._queued -= 1
        if ok:
            outcome = "done"
        elif isinstance(value, (QueryTimeout, QueryOutcomeUnknown)):
            outcome = "timed_out"
        else:
            outcome = "failed"
        seconds = time.perf_counter() - pending.received
        self.stats.record(outcome, seconds)
        if self.settings.slow_ms and seconds * 1000.0 >= self.settings.slow_ms:
            logger.warning("slow job, %.0f ms (%s): %s", seconds * 1000.0, outcome, sql_for_log(pending.job.sql))

    @property
    def queue_depth(self):
        """Jobs waiting to run: in the queue, and waiting for room in it."""
        return self._queued + len(self._overflow)

    @property
    def running(self):
        return len(self._running) + len(self._statements)

    async def stop(self, timeout=None, force=False):
        """Stop taking jobs; let queued and running ones finish up to *timeout*.

        Whatever is left then (everything, with *force* or after
        :meth:`hurry`) is answered with ServiceUnavailable, so no client is
        left waiting.
        """
        self.accepting = False
        if force:
            self.hurry()
        timeout = self.settings.stop_timeout if timeout is None else timeout
        await self._drain(self._loop.time() + timeout)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        stopped = ServiceUnavailable("the dbservice daemon stopped before the job ran")
        while self._queue:
            self._finish(self._queue.popleft(), False, stopped)
        while self._overflow:
            self._finish(self._overflow.popleft(), False, stopped)
        for pending in list(self._running.values()):
            self._cancel_task(pending)
        for pending in list(self._statements):
            # Handed to a task that cancels the query on the server.
            self.cancel(pending, ServiceUnavailable("the dbservice daemon stopped before the job ended"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await self.transactions.close()
        await self.pool.close()

    def hurry(self):
        """Make a graceful stop under way, or the next one, a fast one."""
        self._hurry.set()

    async def _drain(self, deadline):
        hurry = self._loop.create_task(self._hurry.wait())
        try:
            while (self.queue_depth or self.running) and not self._hurry.is_set() and self._loop.time() < deadline:
                waits = list(self._running) or [self._loop.create_task(asyncio.sleep(0.01))]
                await asyncio.wait(
                    waits + [hurry],
                    timeout=max(0.0, deadline - self._loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            hurry.cancel()

    def reload(self, settings):
        """Apply the reloadable fields of *settings* (config.reloadable_settings) without dropping a job.

        The pool grows or shrinks to its new bounds (busy connections above
        the new maximum close as their jobs end). Other changed fields keep
        their old values, with a warning to restart.
        """
        old = self.settings
        reloadable = reloadable_settings()
        for field in dataclasses.fields(settings):
            if field.name not in reloadable and getattr(settings, field.name) != getattr(old, field.name):
                logger.warning("%s changed in the configuration; restart the daemon to apply it", field.name)
        new = self.settings = dataclasses.replace(old, **{name: getattr(settings, name) for name in reloadable})
        if (new.min_size, new.max_size) != (old.min_size, old.max_size):
            self.pool.resize(new.min_size, new.max_size)
        self.pool.max_idle = new.max_idle
        self.pool.timeout = new.pool_timeout
        self.pool.connect_timeout = new.connect_timeout
        self.pool.session_reset = new.session_reset
        self.reloads += 1
        self.reload_error = None
        logger.info(
            "configuration reloaded: pool %d-%d, slow_ms %g, stop_timeout %g s",
            new.min_size, new.max_size, new.slow_ms, new.stop_timeout,
        )

    def reload_failed(self, error):
        """Record a reload whose configuration could not be read; the settings stay."""
        self.reloads += 1
        self.reload_error = str(error)

    def status(self):
        """What ``dbserviced status`` shows: pool, queue and job figures."""
        status = {
            "pid": os.getpid(),
            "dsn": mask_dsn(self.settings.dsn),
            "uptime_s": round(time.time() - self.started_at, 3),
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "queue_depth": self.queue_depth,
            "jobs_running": self.running,
            "transactions_open": len(self.transactions),
        }
        status.update(self.pool.get_stats())
        status.update(self.stats.as_dict())
        return status


_PASSWORD_LITERAL = re.compile(r"(password\s+)'(?:[^']|'')*'", re.IGNORECASE)


def sql_for_log(sql, limit=200):
    """*sql* on one line, cut at *limit* characters, any ``PASSWORD '...'`` masked."""
    text = _PASSWORD_LITERAL.sub(r"\1'***'", " ".join(sql.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
