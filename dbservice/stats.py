"""Counters, latency percentiles and histograms of the jobs the daemon ran, and how the log names a job."""

import bisect
import collections
import logging
import math
import re
from typing import List, Tuple

from .errors import JobCancelled, JobRefused, QueryOutcomeUnknown, QueryTimeout, ServiceBusy

logger = logging.getLogger("dbservice.engine")

#: The upper bounds, in seconds, of the histograms' buckets: from a point
#: read's fraction of a millisecond to a minute's report.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: A failed job's outcome by its error's class, the first that matches; any other error is "failed".
_OUTCOMES = (
    ((QueryTimeout, QueryOutcomeUnknown), "timed_out"),
    (JobCancelled, "cancelled"),
    (JobRefused, "refused"),
    (ServiceBusy, "busy"),
)

#: Every outcome a finished job is counted under.
OUTCOMES = ("done", "failed") + tuple(outcome for _, outcome in _OUTCOMES)


class Histogram:
    """How many observations fell at or below each bound, and their sum: what a Prometheus histogram shows.

    Observing costs a bisection and two additions; the cumulative counts are
    made only when someone reads them.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> List[Tuple[float, int]]:
        """``[(upper bound, observations at or below it), ...]``, ending with ``(inf, all of them)``."""
        total, cumulative = 0, []
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            total += count
            cumulative.append((bound, total))
        return cumulative


class JobStats:
    """Job counters by outcome since start, a histogram of their durations, and latencies of the latest."""

    WINDOW = 4096

    def __init__(self):
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.durations = Histogram()
        self._latencies = collections.deque(maxlen=self.WINDOW)

    def record(self, job, ok, value, seconds, slow_ms):
        """Count one finished job and its latency; log it if it took *slow_ms* or more (0: never)."""
        outcome = "done" if ok else outcome_of(value)
        self.outcomes[outcome] += 1
        self.durations.observe(seconds)
        self._latencies.append(seconds)
        if slow_ms and seconds * 1000.0 >= slow_ms:
            logger.warning("slow job, %.0f ms (%s): %s", seconds * 1000.0, outcome, sql_for_log(job.sql))

    def turned_away(self, error):
        """Count a job answered with *error* before it ran or was timed (see Engine.refuse)."""
        self.outcomes[outcome_of(error)] += 1

    def as_dict(self):
        ordered = sorted(self._latencies)
        return {
            **{"jobs_" + outcome: count for outcome, count in self.outcomes.items()},
            # as status always had it: every job answered with an error but a
            # timeout; the outcomes above tell them apart (the metrics do too)
            "jobs_failed": sum(count for outcome, count in self.outcomes.items() if outcome not in ("done", "timed_out")),
            "latency_ms": {
                "p50": _ms(percentile(ordered, 50)),
                "p95": _ms(percentile(ordered, 95)),
                "p99": _ms(percentile(ordered, 99)),
                "window": len(ordered),
            },
        }


def outcome_of(error):
    """The outcome a job that failed with *error* is counted under."""
    for kinds, outcome in _OUTCOMES:
        if isinstance(error, kinds):
            return outcome
    return "failed"


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
