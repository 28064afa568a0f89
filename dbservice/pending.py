"""A job between its arrival and its one reply: where it stands, its timer, its reply.

A job is *queued* once it waits in the pool for a connection, *running* once
it has one (by callbacks, a ``runner.Statement``, or in a task), and *done*
once its reply went. Its state changes here and nowhere else: the engine and
the pool ask it where it stands rather than keep lists of their own.
"""

import asyncio
import time

QUEUED = "queued"  # waiting in the pool for a connection
RUNNING = "running"  # on a connection, or on its transaction's
DONE = "done"  # replied


class PendingJob:
    """One job in the daemon. It is the pool's waiter while it queues (:meth:`accept`, :meth:`fail`)."""

    __slots__ = (
        "job", "reply", "reply_id", "owner", "engine", "arrived", "received", "deadline", "state", "due",
        "statement", "task", "started", "cancelled_with", "pool", "host", "rerun",
    )

    def __init__(self, engine, job, reply, reply_id, owner, now):
        self.job = job
        self.reply = reply  # reply(reply_id, ok, value), called once; returns the (ok, value) it sent
        self.reply_id = reply_id  # the job's id for its intake
        self.owner = owner  # the client connection it came on, for transactions
        self.engine = engine
        self.arrived = now  # on the loop's clock, which deadlines are on
        self.received = time.perf_counter()  # for its latency: some loops tick in whole ms
        self.deadline = None if job.timeout is None else now + job.timeout
        self.state = None  # until it queues or runs
        self.due = None  # its deadline, or the pool's timeout while it queues, as engine.deadlines keeps it
        self.statement = None  # while it runs by callbacks (runner.Statement)
        self.task = None  # while it runs in a task
        self.started = False  # its task took its first step: it can be cancelled at once
        self.cancelled_with = None  # the error to reply with once its query is cancelled
        self.pool = engine.pool  # the pool it waits in and runs on: its host's
        self.host = None  # with replicas: the hosts.Host it runs on (None: in a transaction)
        self.rerun = False  # a replica refused or lost it, and it runs again on the primary

    @property
    def done(self):
        return self.state is DONE

    def queue(self):
        self.state = QUEUED

    def run(self):
        self.state = RUNNING

    def accept(self, conn):
        """The pool lends *conn*: run on it, unless the job waits no more (then False)."""
        if self.state is not QUEUED and self.state is not None:
            return False
        self.state = RUNNING
        self.engine.run_on(self, conn)
        return True

    def fail(self, error):
        """The pool gives up on the job (it is closing): reply with *error*."""
        self.engine.fail(self, error)

    def requeue(self):
        """A replica refused or lost the job: it waits again, for a connection of the primary."""
        if self.state is QUEUED:
            self.pool.withdraw(self)  # from the replica's queue
        self.clear_deadline()
        self.state = None
        self.statement = None
        self.task = None
        self.started = False
        self.rerun = True

    def finish(self, ok, value):
        """Send the reply unless one was sent already: the ``(ok, value)`` that went, or None."""
        if self.state is DONE:
            return None
        if self.state is QUEUED:
            self.pool.withdraw(self)
        self.state = DONE
        if self.due is not None:
            self.engine.deadlines.clear(self)
        return self.reply(self.reply_id, ok, value)

    def statement_done(self, ok, value):
        self.engine.statement_done(self, ok, value)

    def statement_needs_task(self):
        self.engine.statement_to_task(self)

    def time_is_up(self):
        """Its one deadline passed: its own, or the pool's timeout while it queued."""
        if self.statement is not None:
            self.statement.interrupt()  # run_job cancels the query, the deadline being past
        elif self.state is QUEUED:
            loop = asyncio.get_running_loop()
            self.engine.fail(self, self.pool.wait_error(loop.time() - self.arrived))

    def cancel(self, error):
        """Take it out of the queue, or cancel its query on the server; done, it is left alone.

        Its reply is *error*, unless the query ends first.
        """
        if self.state is DONE:
            return
        self.cancelled_with = error
        if self.statement is not None:
            self.deadline = asyncio.get_running_loop().time()  # run_job takes over and cancels at once
            self.statement.interrupt()
        elif self.task is not None:
            self.cancel_task()
        else:
            self.engine.finish(self, False, error)  # queued: the pool skips it

    def cancel_task(self):
        """Cancel its task, once the task has taken its first step.

        Cancelled before it, the coroutine would die without running a line,
        so without replying or giving back its connection. That step is
        queued already, so a cancel queued now comes after it.
        """
        if self.started:
            self.task.cancel()
        else:
            asyncio.get_running_loop().call_soon(self.task.cancel)

    def clear_deadline(self):
        if self.due is not None:
            self.engine.deadlines.clear(self)
