"""The jobs' deadlines, checked on a tick of the event loop rather than with a timer each.

Nearly every job carries a timeout, and nearly every job ends before it: a
timer handle per job (created, pushed on the loop's heap, cancelled, popped)
was a few percent of the daemon's CPU, for nothing. Here a job's deadline
goes into the slot of its tick, a set, and leaves it when the job moves on;
one callback, while any deadline is set, runs every TICK seconds and tells
the jobs whose slot has passed. A deadline is kept up to TICK late, never
early.
"""

import math


class Deadlines:
    """Deadlines of objects with a ``time_is_up()`` method, and a ``due`` attribute this keeps."""

    #: Seconds between two checks: how late a deadline may be noticed.
    TICK = 0.05

    def __init__(self, loop):
        self._loop = loop
        self._slots = {}  # tick number -> the objects due in it
        self._ticking = None  # the loop's handle of the next check, while any deadline is set

    def set(self, job, when):
        """Call ``job.time_is_up()`` once *when* (on the loop's clock) has passed, unless cleared."""
        if job.due is not None:
            self.clear(job)
        slot = math.ceil(when / self.TICK)
        job.due = slot
        jobs = self._slots.get(slot)
        if jobs is None:
            jobs = self._slots[slot] = set()
        jobs.add(job)
        if self._ticking is None:
            self._ticking = self._loop.call_later(self.TICK, self._tick)

    def clear(self, job):
        """*job* has no deadline any more (it ended, or moved on to another limit)."""
        slot = job.due
        if slot is not None:
            job.due = None
            jobs = self._slots.get(slot)
            if jobs is not None:
                jobs.discard(job)
                if not jobs:
                    del self._slots[slot]

    def _tick(self):
        self._ticking = None
        now = self._loop.time() / self.TICK
        for slot in sorted(slot for slot in self._slots if slot <= now):
            for job in self._slots.pop(slot):
                job.due = None
                job.time_is_up()
        if self._slots:
            self._ticking = self._loop.call_later(self.TICK, self._tick)

    def close(self):
        if self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None
