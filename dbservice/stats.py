"""Counters and latency percentiles of the jobs the daemon ran, and how the log names a job."""

import collections
import logging
import math
import re

from .errors import QueryOutcomeUnknown, QueryTimeout

logger = logging.getLogger("dbservice.engine")


class JobStats:
    """Job counters since start and latencies of the most recent jobs."""

    WINDOW = 4096

    def __init__(self):
        self.jobs_done = 0
        self.jobs_failed = 0
        self.jobs_timed_out = 0
        self._latencies = collections.deque(maxlen=self.WINDOW)

    def record(self, job, ok, value, seconds, slow_ms):
        """Count one finished job and its latency; log it if it took *slow_ms* or more (0: never)."""
        if ok:
            outcome = "done"
            self.jobs_done += 1
        elif isinstance(value, (QueryTimeout, QueryOutcomeUnknown)):
            outcome = "timed_out"
            self.jobs_timed_out += 1
        else:
            outcome = "failed"
            self.jobs_failed += 1
        self._latencies.append(seconds)
        if slow_ms and seconds * 1000.0 >= slow_ms:
            logger.warning("slow job, %.0f ms (%s): %s", seconds * 1000.0, outcome, sql_for_log(job.sql))

    def refused(self):
        """Count a job refused before it ran or was timed (see Engine.refuse)."""
        self.jobs_failed += 1

    def as_dict(self):
        ordered = sorted(self._latencies)
        return {
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
            "jobs_timed_out": self.jobs_timed_out,
            "latency_ms": {
                "p50": _ms(percentile(ordered, 50)),
                "p95": _ms(percentile(ordered, 95)),
                "p99": _ms(percentile(ordered, 99)),
                "window": len(ordered),
            },
        }


def percentile(ordered, pct):
    """The nearest-rank percentile of an already sorted sequence (None if empty)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


_PASSWORD_LITERAL = re.compile(r"(password\s+)'(?:[^']|'')*'", re.IGNORECASE)


def sql_for_log(sql, limit=200):
    """*sql* on one line, cut at *limit* characters, any ``PASSWORD '...'`` masked."""
    text = _PASSWORD_LITERAL.sub(r"\1'***'", " ".join(sql.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
