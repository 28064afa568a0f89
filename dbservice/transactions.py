"""Transactions that span several jobs: a pooled connection pinned to one client.

A client's BEGIN job borrows a connection like any job, then keeps it: the
jobs of that transaction run on it, one at a time and in order, until COMMIT
or ROLLBACK gives it back to the pool. A transaction left idle for longer
than ``idle_in_transaction_timeout``, or whose client goes away, is rolled
back and its connection returned; the client hears of it on its next
statement, and a COMMIT then fails rather than pretend.
"""

import asyncio
import logging

import psycopg2

from .errors import Error, JobRefused, ServiceUnavailable
from .jobs import COMMIT, ROLLBACK, Job
from .runner import CLEANUP_GRACE, run_job

logger = logging.getLogger("dbservice.transactions")


class Transaction:
    """One open transaction and the connection pinned to it."""

    __slots__ = ("key", "conn", "pool", "lock", "idle_timer", "ended")

    def __init__(self, key, conn, pool):
        self.key = key  # (owner, transaction id)
        self.conn = conn
        self.pool = pool  # conn's: the primary's, or a replica's for a read-only transaction
        self.lock = asyncio.Lock()  # one statement at a time
        self.idle_timer = None
        self.ended = None  # the error for the client once we rolled it back


class TransactionTable:
    """The open transactions of one daemon, by owner and transaction id.

    *finish(pending, ok, value)* sends a job's reply (the server's, so that
    its figures count these jobs too).
    """

    def __init__(self, idle_timeout, finish):
        self.idle_timeout = idle_timeout
        self._finish = finish
        self._table = {}
        self._beginning = {}  # (owner, transaction id) -> the PendingJob of its BEGIN, in the daemon
        self._rolling_back = set()  # rollbacks of abandoned or idle transactions, under way

    def __len__(self):
        return sum(1 for tx in self._table.values() if tx.ended is None)

    def holds(self, owner):
        """True while *owner* has a transaction open (and not rolled back by us) or beginning."""
        return any(key[0] is owner for key in self._beginning) or any(
            key[0] is owner and tx.ended is None for key, tx in self._table.items()
        )

    def begin(self, pending):
        """*pending*, a BEGIN, arrived; JobRefused if its transaction id is open or beginning already."""
        key = (pending.owner, pending.job.tx)
        if key in self._table or key in self._beginning:
            raise JobRefused(
                "transaction %d is already open on this connection; a BEGIN needs an id of its own" % key[1]
            )
        self._beginning[key] = pending

    def begun(self, pending, conn=None):
        """The BEGIN *pending* ended: on *conn*, which its transaction keeps from now on; or it failed."""
        key = (pending.owner, pending.job.tx)
        if self._beginning.get(key) is pending:
            del self._beginning[key]
            if conn is not None:
                tx = Transaction(key, conn, pending.pool)
                self._table[key] = tx
                self._arm(tx)

    async def run(self, pending, owner):
        """Run a job of an open transaction on that transaction's connection."""
        pending.started = True
        job = pending.job
        tx = self._table.get((owner, job.tx))
        if tx is None:
            self._finish(pending, False, Error("there is no transaction %d on this connection" % job.tx))
            return
        try:
            async with tx.lock:  # behind the transaction's job before it, if any
                if tx.ended is not None:
                    self._after_end(tx, pending)
                    return
                self._disarm(tx)
                tx.pool.note_job(tx.conn, job.sql)
                tx.conn.gate = owner.gate
                try:
                    result = await run_job(tx.conn, job, pending.deadline, tx.pool.cancel, in_transaction=True)
                except (psycopg2.Error, Error) as exc:
                    self._finish(pending, False, exc)
                else:
                    self._finish(pending, True, result)
                finally:
                    tx.conn.release_gate()
                    if job.kind in (COMMIT, ROLLBACK) or tx.conn.pgconn.closed:
                        self._release(tx)
                    else:
                        self._arm(tx)
        except asyncio.CancelledError:
            # While it ran, or while it waited for the lock: a reply either way.
            self._finish(pending, False, pending.cancelled_with or ServiceUnavailable("the daemon is stopping"))
            raise

    def _after_end(self, tx, pending):
        """Answer a job of a transaction we already rolled back."""
        if pending.job.kind == ROLLBACK:
            self._finish(pending, True, None)  # what the client wanted
        else:
            self._finish(pending, False, tx.ended)
        if pending.job.kind in (COMMIT, ROLLBACK):
            del self._table[tx.key]

    def abandon(self, owner):
        """Roll back every transaction of an owner that went away."""
        for key, tx in list(self._table.items()):
            if key[0] is owner:
                del self._table[key]
                if tx.ended is None:
                    self._roll_back_soon(tx, "its client went away")

    async def close(self):
        """Roll back every open transaction (the daemon is stopping)."""
        txs = [tx for tx in self._table.values() if tx.ended is None]
        self._table.clear()
        # With the rollbacks already under way: the loop must not close on them.
        await asyncio.gather(*(self._roll_back(tx, "the daemon is stopping") for tx in txs), *self._rolling_back)

    def _arm(self, tx):
        tx.idle_timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, tx)

    def _disarm(self, tx):
        if tx.idle_timer is not None:
            tx.idle_timer.cancel()
            tx.idle_timer = None

    def _expire(self, tx):
        tx.idle_timer = None
        tx.ended = Error(
            "the transaction was rolled back: idle for more than %.1f s (idle_in_transaction_timeout)"
            % self.idle_timeout
        )
        self._roll_back_soon(tx, "idle for more than %.1f s" % self.idle_timeout)

    def _roll_back_soon(self, tx, why):
        task = asyncio.ensure_future(self._roll_back(tx, why))
        self._rolling_back.add(task)
        task.add_done_callback(self._rolling_back.discard)

    async def _roll_back(self, tx, why):
        async with tx.lock:
            if tx.conn is None:  # its COMMIT or ROLLBACK got there first
                return
            self._disarm(tx)
            logger.warning("rolling back a transaction on connection #%d: %s", tx.conn.number, why)
            deadline = asyncio.get_running_loop().time() + CLEANUP_GRACE
            try:
                await run_job(tx.conn, Job("ROLLBACK", kind=ROLLBACK), deadline, tx.pool.cancel)
            except Exception as exc:
                logger.warning("rollback failed (%s); closing the connection", exc)
                tx.conn.close()
            self._give_back(tx)

    def _release(self, tx):
        self._disarm(tx)
        self._table.pop(tx.key, None)
        self._give_back(tx)

    def _give_back(self, tx):
        conn, tx.conn = tx.conn, None
        tx.pool.putconn(conn)
