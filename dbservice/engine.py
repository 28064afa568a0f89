"""The engine: jobs in, replies out, on the pool's connections.

Intakes (the multiprocessing queue, the Unix socket) hand jobs to
:meth:`Engine.submit` with a reply callback. A job waits in the pool's one
queue until a connection is free; the pool lends connections in order of
arrival, and a connection a job is done with goes straight to the next job
waiting, so a slow query holds one connection and nothing else. A
one-statement job runs by callbacks alone (a :class:`~dbservice.runner.Statement`);
any other job, and a statement that needs more than one wait, runs in a task.
Every job gets exactly one reply: its result, its error, a timeout, or word
that the service is stopping. Where a job stands is its own
(:class:`~dbservice.pending.PendingJob`).

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
- waiting jobs: ``max_queue``, each for its timeout at most; more are
  refused as busy at once (``pool.AsyncConnectionPool.lend``);
- one client connection: ``max_client_jobs`` jobs in the daemon,
  ``max_client_buffer`` bytes of unsent replies, one large result read at a
  time, ``client_stall_timeout`` backed up (``backpressure``);
- a result: ``max_result_bytes`` once pickled (``jobs.encode_reply``);
- a COPY: a window of its data each way, ``max_copies`` at once
  (``copying``); a client's subscriptions: their channels, and its
  notifications within ``max_client_buffer`` (``listener``);
- time: each job's timeout, ``pool_timeout`` for a job without one, and
  ``CLEANUP_GRACE`` for a cancel or a rollback (``runner``).
"""

import asyncio
import logging
import os
import time

from . import loops
from .answering import reply_error
from .config import reloaded
from .deadlines import Deadlines
from .errors import JobRefused, ServiceBusy, ServiceUnavailable
from .jobs import BEGIN
from .listener import Listener
from .maintenance import Maintenance
from .pending import PendingJob
from .health import mask_dsn, one_line, refused_for_good
from .hosts import PRIMARY, REPLICA, Host, Router, safe_to_rerun
from .pool import AsyncConnectionPool
from .runner import STATEMENT_FETCHES, Statement, run_job
from .stats import JobStats
from .transactions import TransactionTable

logger = logging.getLogger("dbservice.engine")


class Engine:
    """The job queue, the pool and the open transactions of one daemon, on the running event loop."""

    #: Seconds between two warnings that jobs wait because every connection is busy.
    FULL_POOL_WARNING_INTERVAL = 10.0

    def __init__(self, settings):
        self.settings = settings
        self.pool = self._pool(settings.dsn, "pool")
        #: with replicas: the hosts, and which one each job runs on; None: the one database
        self.router = None
        if settings.replicas:
            replicas = [
                Host(REPLICA, dsn, self._pool(dsn, "replica%d" % number))
                for number, dsn in enumerate(settings.replicas, 1)
            ]
            self.router = Router(Host(PRIMARY, settings.dsn, self.pool), replicas, settings.max_replica_lag)
            for host in self.router.hosts:
                host.pid = settings.embedded_pids.get(host.dsn)
        self.stats = JobStats()
        self.transactions = TransactionTable(settings.idle_in_transaction_timeout, self.finish)
        #: LISTEN/NOTIFY's connection to the primary, outside the pool (listener.py)
        self.listener = Listener(settings)
        self.maintenance = Maintenance(self)  # dbserviced pause and resume: the primary's pool and listener
        self.started_at = time.time()
        self.accepting = False
        self.reloads = 0
        self.reload_error = None
        self.metrics_address = None  # HOST:PORT of the Prometheus endpoint, once it serves
        self._running = set()  # the PendingJobs on a connection
        self._tasks = set()  # the tasks of those that run in one
        self._quiet = asyncio.Event()  # set while no job waits or runs: what a stop waits for
        self._hurry = asyncio.Event()  # set: a stop waits for no job any more
        self._loop = None
        self.deadlines = None  # once started: the jobs' deadlines (deadlines.py)
        self._quiet_until = 0.0  # no warning of a full pool before then, on the loop's clock

    def _pool(self, dsn, name):
        settings = self.settings
        return AsyncConnectionPool(
            dsn,
            name=name,
            min_size=settings.min_size,
            max_size=settings.max_size,
            max_idle=settings.max_idle,
            timeout=settings.pool_timeout,
            connect_timeout=settings.connect_timeout,
            session_reset=settings.session_reset,
            max_waiting=settings.max_queue,
            max_lifetime=settings.max_lifetime,
            max_prepared=settings.max_prepared,
        )

    async def start(self):
        """Open the pool and start serving; raise ServiceUnavailable if the database refuses us for good.

        A database that is merely down does not stop the start: the pool
        keeps trying, as PgBouncer does, while jobs fail fast saying why.
        """
        self._loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(self._loop)
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
        if self.router is not None:
            for host in self.router.replicas:
                await host.pool.open(wait=False)  # a replica down does not stop the start
            self.router.start(self._loop)
        self._quiet.set()
        self.accepting = True

    # -- a job's way in --------------------------------------------------------

    def cancel(self, pending, error):
        """Cancel *pending* (see :meth:`PendingJob.cancel`): its reply is *error*, unless it ends first."""
        pending.cancel(error)

    def submit(self, job, reply, reply_id=0, owner=None):
        """Take *job*; ``reply(reply_id, ok, value)`` is called exactly once, later or now.

        *reply* returns the ``(ok, value)`` it sent, which the job is counted
        by: an InternalError if it failed to encode the reply (a bug of ours).

        Should the daemon fail on it here (a bug of ours), that reply is an
        InternalError, and the job's client goes on.

        *owner* identifies the client connection, which transactions need: a
        job of an open transaction skips the queue and runs on its pinned
        connection.
        """
        pending = PendingJob(self, job, reply, reply_id, owner, self._loop.time())
        try:
            if not self.accepting:
                self.finish(pending, False, ServiceUnavailable("the dbservice daemon is stopping"))
            elif job.tx is not None and owner is None:
                self.finish(pending, False, JobRefused("transactions need a connection of their own: use the socket"))
            elif job.tx is not None and job.kind != BEGIN:
                self._start_task(pending, self.transactions.run(pending, owner))
            else:
                self._queue(pending)
        except Exception as exc:  # a bug of ours: this job's error, not its client's lost connection
            self.fail(pending, exc)
        return pending

    def _queue(self, pending):
        if pending.job.kind == BEGIN:
            try:
                self.transactions.begin(pending)
            except JobRefused as exc:
                self.finish(pending, False, exc)
                return
        if self.router is not None:
            self.router.moved(pending, self.router.host_for(pending))
        self._lend(pending)

    def _lend(self, pending):
        """*pending* runs on a connection of its pool now, or waits in its queue for one."""
        pool = pending.pool
        outage = pool.outage_error()
        if outage is not None:
            self.fail(pending, outage)
            return
        self._quiet.clear()
        if not pool.lend(pending):  # it runs now, or waits for a connection
            self.finish(pending, False, ServiceBusy(
                "the dbservice job queue is full (max_queue %d): the database cannot keep up; "
                "try again later, or raise max_queue or max_size" % self.settings.max_queue
            ))
        elif pending.state is None:
            pending.queue()
            self._warn_if_pool_full(pool)
            # A job without a timeout still waits for a connection no longer
            # than the pool's timeout: if the database stays unreachable, it is told.
            wait_until = pending.deadline or pending.arrived + self.settings.pool_timeout
            self.deadlines.set(pending, wait_until)

    def _warn_if_pool_full(self, pool):
        """Say, at most every FULL_POOL_WARNING_INTERVAL, that jobs wait for want of connections.

        Jobs that arrive together all queue before the pool has grown: they
        wait for want of connections once more of them wait than the pool may
        still open.
        """
        now = self._loop.time()
        if now < self._quiet_until or pool.waiting <= pool.max_size - pool.size:
            return
        self._quiet_until = now + self.FULL_POOL_WARNING_INTERVAL
        logger.warning(
            "%d jobs wait for a connection of pool %r: all %d connections (max_size) are busy; "
            "if the database can take more, raise --max-size",
            pool.waiting, pool.name, pool.max_size,
        )

    def refuse(self, reply, reply_id, error):
        """Answer with *error* a job refused before it became one (too large, not decodable, or failed on).

        It never reaches :meth:`submit`, but status counts it as failed all
        the same: an operator must see the jobs the daemon turns away.
        """
        _, sent = reply(reply_id, False, error)
        self.stats.turned_away(sent)

    # -- running ---------------------------------------------------------------

    def run_on(self, pending, conn):
        """Start *pending*, which the pool just lent *conn*: by callbacks if it is one statement, else in a task."""
        job = pending.job
        pending.pool.note_job(conn, job.sql)
        conn.gate = None if pending.owner is None else pending.owner.gate
        self._running.add(pending)
        if job.tx is not None or job.kind not in STATEMENT_FETCHES:
            pending.clear_deadline()  # run_job keeps the deadline
            self._start_task(pending, self._execute(pending, conn))
            return
        if pending.deadline is None:
            pending.clear_deadline()  # the queue's, and a running job has no limit
        elif pending.due is None:  # else it is the deadline already, set as it queued
            self.deadlines.set(pending, pending.deadline)
        pending.statement = Statement(conn, job, pending)
        pending.statement.start()

    def statement_done(self, pending, ok, value):
        """*pending*'s Statement ended, its connection idle (or closed): the next job first, then the reply."""
        self._release(pending.pool, pending.statement.conn)  # the next job first: the server works while we reply
        if ok:
            self.finish(pending, True, value)
        else:
            self.fail(pending, value)

    def statement_to_task(self, pending):
        """*pending*'s Statement needs more than callbacks: run_job goes on with it, in a task."""
        statement, pending.statement = pending.statement, None
        pending.clear_deadline()
        self._start_task(pending, self._execute(pending, statement.conn, statement))

    def _release(self, pool, conn):
        """Give back a connection a job is done with: *pool* passes it to the next job waiting."""
        conn.release_gate()
        pool.putconn(conn)

    def _start_task(self, pending, coroutine):
        pending.run()
        self._running.add(pending)
        self._quiet.clear()
        task = pending.task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, pending, conn, statement=None):
        pending.started = True
        job = pending.job
        pool = pending.pool  # a rerun of the job moves it to another
        begins = job.kind == BEGIN
        try:
            result = await run_job(conn, job, pending.deadline, pool.cancel, begins, statement)
            if begins and pending.cancelled_with is None:
                conn.release_gate()
                self.transactions.begun(pending, conn)
                conn = None  # the transaction gives it back
            elif begins:  # its client gave up on it meanwhile: the pool rolls it back
                raise pending.cancelled_with
        except asyncio.CancelledError:
            stopped = ServiceUnavailable("the dbservice daemon stopped before the job ended")
            self.finish(pending, False, pending.cancelled_with or stopped)
            raise
        except Exception as exc:
            self.fail(pending, pending.cancelled_with or exc)
        else:
            self.finish(pending, True, result)
        finally:
            if conn is not None:
                self._release(pool, conn)

    def fail(self, pending, exc):
        """Reply with *exc*: the database's errors and ours as they are, anything else as a bug.

        A job a replica refused or lost runs again on the primary instead, once.
        """
        if pending.host is not None and self._rerun(pending, exc):
            return
        self.finish(pending, False, reply_error(exc, "job %r", pending.job))

    def _rerun(self, pending, exc):
        """Run *pending* again on the primary if a replica refused or lost it, and time is left; True if so."""
        router = self.router
        if pending.done or pending.host is router.primary or pending.job.tx is not None \
                or pending.cancelled_with is not None:
            return False
        if not self.accepting or not safe_to_rerun(exc):
            return False
        if pending.deadline is not None and self._loop.time() >= pending.deadline:
            return False
        logger.debug("rerunning a job on the primary: %s %s", pending.host.pool.name, one_line(exc))
        pending.requeue()
        router.moved(pending, router.primary)
        self._lend(pending)
        return True

    def finish(self, pending, ok, value):
        """Send *pending*'s one reply, count it as it went and log it if it was slow; nothing if it was sent."""
        sent = pending.finish(ok, value)
        if sent is None:
            return
        if self.router is not None:
            self.router.finished(pending, pending.host, ok, value)
        self._running.discard(pending)
        if not self._running and not (self.pool.waiting if self.router is None else self.queue_depth):
            self._quiet.set()
        if not ok and pending.job.kind == BEGIN:
            self.transactions.begun(pending)  # it opened no transaction
        self.stats.record(pending.job, *sent, time.perf_counter() - pending.received, self.settings.slow_ms)

    # -- stopping --------------------------------------------------------------

    async def stop(self, timeout=None, force=False):
        """Stop taking jobs; let queued and running ones finish up to *timeout*.

        Whatever is left then (everything, with *force* or after
        :meth:`hurry`) is answered with ServiceUnavailable, so no client is
        left waiting.
        """
        self.accepting = False
        if self.pool.suspended:  # paused: the jobs it holds would wait for nothing
            self.pool.fail_waiting(ServiceUnavailable("the dbservice daemon stopped while paused, before the job ran"))
        if force:
            self.hurry()
        timeout = self.settings.stop_timeout if timeout is None else timeout
        quiet = self._loop.create_task(self._quiet.wait())
        hurry = self._loop.create_task(self._hurry.wait())
        await asyncio.wait([quiet, hurry], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        quiet.cancel()
        hurry.cancel()
        for pool in self.pools:
            pool.fail_waiting(ServiceUnavailable("the dbservice daemon stopped before the job ran"))
        stopped = ServiceUnavailable("the dbservice daemon stopped before the job ended")
        for pending in list(self._running):
            pending.cancel(stopped)  # a query running is cancelled on the server
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transactions.close()
        if self.router is not None:
            await self.router.stop()
            for host in self.router.replicas:
                await host.pool.close()
        await self.pool.close()  # answers the jobs still waiting for a connection
        self.deadlines.close()

    def hurry(self):
        """Make a graceful stop under way, or the next one, a fast one."""
        self._hurry.set()

    # -- while serving ---------------------------------------------------------

    @property
    def pools(self):
        """The primary's pool, then each replica's."""
        if self.router is None:
            return [self.pool]
        return [host.pool for host in self.router.hosts]

    def pools_status(self):
        """Each pool's figures, the primary's first: its name, role and DSN (password masked), and its stats."""
        roles = [PRIMARY] if self.router is None else [host.role for host in self.router.hosts]
        return [
            dict(name=pool.name, role=role, dsn=mask_dsn(pool.dsn), **pool.get_stats())
            for pool, role in zip(self.pools, roles)
        ]

    @property
    def queue_depth(self):
        """Jobs waiting for a connection."""
        return sum(pool.waiting for pool in self.pools)

    @property
    def running(self):
        return len(self._running)

    def reload(self, settings):
        """Apply the reloadable fields of *settings* (see config.reloaded) without dropping a job.

        The pool grows or shrinks to its new bounds (busy connections above
        the new maximum close as their jobs end). Other changed fields keep
        their old values, with a warning to restart.
        """
        old = self.settings
        new = self.settings = reloaded(old, settings)
        for pool in self.pools:
            if (new.min_size, new.max_size) != (old.min_size, old.max_size):
                pool.resize(new.min_size, new.max_size)
            pool.max_idle = new.max_idle
            pool.max_lifetime = new.max_lifetime
            pool.timeout = new.pool_timeout
            pool.connect_timeout = new.connect_timeout
            pool.session_reset = new.session_reset
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
        """What ``dbserviced status`` shows: pool, queue and job figures.

        The pool's figures at the top level are the primary's; ``pools`` has
        every pool's, each replica's too.
        """
        status = {
            "pid": os.getpid(),
            "dsn": mask_dsn(self.settings.dsn),
            "uptime_s": round(time.time() - self.started_at, 3),
            "event_loop": loops.resolve(self.settings.selector),
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "queue_depth": self.queue_depth,
            "jobs_running": self.running,
            "transactions_open": len(self.transactions),
            "metrics": self.metrics_address,
            "pause": self.maintenance.state,  # the pool's and the listener's
            "connections_open": self.maintenance.connections_open,  # what a pause closes, until each is hung up
        }
        pools = self.pools_status()
        status.update((key, value) for key, value in pools[0].items() if key not in ("name", "role", "dsn"))
        status["pools"] = pools
        status.update(self.stats.as_dict())
        if self.router is not None:
            now = self._loop.time()
            status["hosts"] = [host.status(now) for host in self.router.hosts]
        return status
