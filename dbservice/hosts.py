"""Streaming replicas: a pool per host, which host a job runs on, and how far each replica has replayed.

Only a job that can only read goes to a replica: the one with the fewest
jobs in flight (ties to the fewest recently failed), among those that have
replayed everything its client may have written. Everything else runs on
the primary. A replica refuses a write without effect
(``ReadOnlySqlTransaction``), and no job on a replica can have written, so
a job a replica refused or lost is rerun on the primary, once.

Read-your-writes costs nothing per write. The daemon samples the primary's
WAL position (``pg_current_wal_lsn()``) every ``POLL_INTERVAL``, and each
replica's replay position (``pg_last_wal_replay_lsn()``) as often. A replica
that has replayed a sample sent at loop time *t* has every transaction
committed before *t*; a client whose last write was answered at *w* reads
from a replica only if it has replayed a sample sent after *w*. A replica
whose last such sample is older than ``max_replica_lag`` seconds gets no
reads at all.
"""

import asyncio
import logging
import re
import weakref

import psycopg2
import psycopg2.errors

from .connection import PooledConnection
from .errors import JobCancelled, QueryOutcomeUnknown, QueryTimeout, ResultTooLarge, ServiceUnavailable
from .health import mask_dsn, one_line
from .jobs import BEGIN, COMMIT, FETCH_VALUE, Job
from .runner import STATEMENT_FETCHES, run_job
from .session import may_change_session

logger = logging.getLogger("dbservice.hosts")

PRIMARY = "primary"
REPLICA = "replica"

#: The first words of statements that may run on a replica; anything else runs on the primary.
_READ_WORDS = frozenset(("select", "with", "values", "table", "show"))
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)")
_verdicts = {}  # sql -> reads_only(sql), for the statements clients repeat
_CACHE_SIZE = 4096
_CACHED_LENGTH = 4096


def reads_only(sql):
    """True if *sql* may go to a replica: it starts as a plain read and leaves its session alone.

    Conservative and cheap: the first word alone. A read that writes after
    all (``SELECT nextval(...)``, a writing function, ``FOR UPDATE``) is
    refused by the replica without effect, and rerun on the primary.
    """
    verdict = _verdicts.get(sql)
    if verdict is None:
        first = _FIRST_WORD.match(sql)
        verdict = first is not None and first.group(1).lower() in _READ_WORDS and not may_change_session(sql)
        if len(sql) <= _CACHED_LENGTH:
            if len(_verdicts) >= _CACHE_SIZE:
                _verdicts.clear()
            _verdicts[sql] = verdict
    return verdict


def safe_to_rerun(exc):
    """True if a job a replica answered with *exc* may run again, on the primary.

    Nothing on a replica writes, so what it refused (a write, a conflict with
    recovery) or lost (the server or the connection went) can run again;
    what the job itself ran out of (its time, its size) cannot.
    """
    if isinstance(exc, (QueryTimeout, JobCancelled, ResultTooLarge, psycopg2.errors.QueryCanceled)):
        return False
    return isinstance(exc, (
        psycopg2.errors.ReadOnlySqlTransaction, psycopg2.errors.SerializationFailure,
        psycopg2.OperationalError, psycopg2.InterfaceError, QueryOutcomeUnknown,
    ))


#: The errors of a job that may have committed all the same.
_MAY_HAVE_COMMITTED = (QueryOutcomeUnknown, ResultTooLarge)


def lsn(text):
    """A pg_lsn's text (``16/B374D848``) as an integer, to compare."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class Host:
    """One PostgreSQL server of the daemon: its role, its pool, and what the router knows of it."""

    def __init__(self, role, dsn, pool, pid=None):
        self.role = role
        self.dsn = dsn
        self.pool = pool
        self.pid = pid  # its postmaster's, for an embedded one
        self.jobs_in_flight = 0
        self.jobs_done = 0
        self.failures = 0  # jobs it lost or refused, halved at each poll: "recently"
        self.jobs_rerun = 0  # jobs it refused or lost, which ran again on the primary
        self.healthy = True  # the latest poll reached it
        self.caught_up_at = float("-inf")  # loop time of the latest primary sample it has replayed
        self.poll_conn = None  # the poller's own connection to it, outside the pool
        self.poll_gone = None  # the poller's last connection closed: done once the server hung up
        self.last_error = None

    def status(self, now):
        lag = now - self.caught_up_at
        return {
            "role": self.role,
            "dsn": mask_dsn(self.dsn),
            "healthy": self.healthy and not self.pool.unreachable,
            "lag_s": 0.0 if self.role == PRIMARY else (round(lag, 3) if lag != float("inf") else None),
            "jobs_in_flight": self.jobs_in_flight,
            "jobs_done": self.jobs_done,
            "jobs_rerun": self.jobs_rerun,
            "pid": self.pid,
            "last_error": self.last_error,
        }


class Router:
    """The hosts of one daemon, and the choice of a host for each job.

    *primary* and *replicas* are Hosts; ``max_lag`` seconds is how far
    behind a replica may be and still serve reads.
    """

    #: Seconds between two samples of the primary's WAL and the replicas' replay.
    POLL_INTERVAL = 0.02
    #: Seconds a poll's query, or opening its connection, may take.
    POLL_TIMEOUT = 1.0

    def __init__(self, primary, replicas, max_lag):
        self.primary = primary
        self.replicas = replicas
        self.max_lag = max_lag
        self._written_at = weakref.WeakKeyDictionary()  # client -> loop time its last write was answered
        self._sample = (float("-inf"), None)  # the latest sample of the primary: (loop time sent, its WAL position)
        self._turn = 0
        self._loop = None
        self._pollers = []
        self._let_go = asyncio.Event()  # set by each poll that finds the primary paused, once it hung up

    @property
    def hosts(self):
        return [self.primary] + self.replicas

    def start(self, loop):
        self._loop = loop
        self._pollers = [loop.create_task(self._poll_forever(host)) for host in self.hosts]

    async def stop(self):
        for poller in self._pollers:
            poller.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        for host in self.hosts:
            self._hang_up(host)

    async def let_go_of_primary(self):
        """Once the poller, finding the primary's pause complete, has closed its connection and the server hung up.

        It samples the primary until then (host_for counts on the samples
        while open transactions may still write), and hangs up at its next poll.
        """
        while self.primary.poll_conn is not None:  # none opens while the primary is paused
            self._let_go.clear()
            await self._let_go.wait()
        if self.primary.poll_gone is not None:
            await self.primary.poll_gone

    @property
    def primary_connections(self):
        """1 while the server has the poller's connection to the primary (open, or closed but not hung up), else 0."""
        host = self.primary
        return int(host.poll_conn is not None or (host.poll_gone is not None and not host.poll_gone.done()))

    # -- choosing --------------------------------------------------------------

    def host_for(self, pending):
        """The host *pending* runs on: the least-loaded replica that may serve it, else the primary."""
        job = pending.job
        if job.primary or not self._reads(job):
            return self.primary
        written = self._written_at.get(self._client(pending.owner), float("-inf"))
        # With the primary down or paused nothing more is written: a replica
        # that has replayed its last sample falls no further behind.
        writable = self.primary.healthy and not self.primary.pool.paused
        oldest = self._loop.time() - self.max_lag if writable else self._sample[0]
        best = None
        self._turn = (self._turn + 1) % len(self.replicas)  # among equals, each in turn
        for host in self.replicas[self._turn:] + self.replicas[:self._turn]:
            if host.healthy and host.caught_up_at > written and host.caught_up_at >= oldest \
                    and host.pool.last_error is None:
                if best is None or (host.jobs_in_flight, host.failures) < (best.jobs_in_flight, best.failures):
                    best = host
        return best or self.primary

    def _reads(self, job):
        if job.kind == BEGIN:
            return " READ ONLY" in job.sql  # our own SQL, from BEGIN's options
        return job.kind in STATEMENT_FETCHES and reads_only(job.sql)

    def _client(self, owner):
        return self if owner is None else owner  # the queue's clients share one history

    def finished(self, pending, host, ok, value):
        """*pending*'s reply (*ok*, *value*) went; it ran on *host*, or (None) in a transaction."""
        job = pending.job
        if host is not None:
            host.jobs_in_flight -= 1
            host.jobs_done += 1
            if host is not self.primary:
                return
            if (job.kind == BEGIN or self._reads(job)) and not (pending.rerun or job.primary):
                return  # a read (the client's primary=True may mean it writes)
        elif job.kind != COMMIT:
            return
        if not ok and not isinstance(value, _MAY_HAVE_COMMITTED):
            return  # it rolled back
        # It may have written: its client's next reads must see it.
        self._written_at[self._client(pending.owner)] = self._loop.time()

    def moved(self, pending, host):
        """*pending* runs on *host* from now on (it is routed, or rerun on the primary)."""
        if pending.host is not None:
            pending.host.jobs_in_flight -= 1
            pending.host.failures += 1
            pending.host.jobs_rerun += 1
        pending.host = host
        pending.pool = host.pool
        host.jobs_in_flight += 1

    # -- polling ---------------------------------------------------------------

    # Each host is polled on its own, so that one that is slow to answer (or
    # to refuse) holds up no other. A replica is measured against the latest
    # sample of the primary taken before its own query was sent; with the
    # primary down, that stays its last one.

    async def _poll_forever(self, host):
        while True:
            try:
                await self._poll(host)
            except Exception:  # a bug: say so and keep polling
                logger.exception("polling %s %s failed", host.role, mask_dsn(host.dsn))
            host.failures //= 2
            await asyncio.sleep(self.POLL_INTERVAL)

    async def _poll(self, host):
        if host is self.primary and host.pool.paused:
            self._hang_up(host)  # nothing of the daemon stays connected to a paused primary (maintenance.py)
            self._let_go.set()
            return
        if host is self.primary:
            sent = self._loop.time()
            position = await self._position(host, "select pg_current_wal_lsn()::text")
            if position is not None:
                self._sample = (sent, position)
            return
        sent, primary = self._sample
        position = await self._position(host, "select pg_last_wal_replay_lsn()::text")
        if position is not None and primary is not None and position >= primary:
            host.caught_up_at = max(host.caught_up_at, sent)

    async def _position(self, host, sql):
        """The WAL position *sql* reads on *host*, on the poller's connection; None, unhealthy, if it fails."""
        deadline = self._loop.time() + self.POLL_TIMEOUT
        try:
            if host.poll_conn is None or host.poll_conn.pgconn.closed:
                host.poll_conn = await PooledConnection.connect(host.dsn, 0, self._loop, _ignore, deadline)
            text = await run_job(host.poll_conn, Job(sql, kind=FETCH_VALUE), deadline, _abandon)
        except Exception as exc:
            if host.healthy:
                logger.warning("%s %s is unreachable: %s", host.role, mask_dsn(host.dsn), one_line(exc))
            host.healthy = False
            if host.role == REPLICA:  # the jobs waiting for it run on the primary instead
                host.pool.fail_waiting(ServiceUnavailable("the replica %s is unreachable" % mask_dsn(host.dsn)))
            host.last_error = one_line(exc)
            self._hang_up(host)
            return None
        if not host.healthy:
            logger.info("%s %s is reachable again", host.role, mask_dsn(host.dsn))
        host.healthy = True
        host.last_error = None
        return None if text is None else lsn(text)

    def _hang_up(self, host):
        """Close the poller's connection to *host*, if open; the next poll opens another."""
        if host.poll_conn is not None:
            host.poll_gone = host.poll_conn.close()
            host.poll_conn = None


def _ignore(conn):
    """A poller's connection the server ended: the next poll finds it closed and opens another."""


async def _abandon(conn):
    """A poll that outlived POLL_TIMEOUT: run_job closes its connection instead of cancelling the query.

    A host that slow (partitioned) is down, and a cancel request would wait
    ``connect_timeout`` for it.
    """
    raise psycopg2.OperationalError("the poll got no answer in time")

