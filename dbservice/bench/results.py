"""What one cell of the comparison measured, and how it is summed up.

A cell is one strategy running one workload. Its :class:`Samples` are the
latencies of the queries that completed inside the measured window, kept apart
by kind (fast, slow), and the errors; :func:`summarize` turns them into the
row the report prints: queries per second, p50 and p99 latency, errors.
"""

import array

from ..stats import percentile
from .workloads import FAST


class Samples:
    """Latencies in seconds per query kind, and the errors, of one cell (or part of one)."""

    def __init__(self):
        self.latencies = {}
        self.errors = 0
        self.first_error = None

    def add(self, kind, seconds):
        try:
            self.latencies[kind].append(seconds)
        except KeyError:
            self.latencies[kind] = array.array("d", [seconds])

    def error(self, message):
        self.errors += 1
        if self.first_error is None:
            self.first_error = message

    def merge(self, other):
        for kind, values in other.latencies.items():
            self.latencies.setdefault(kind, array.array("d")).extend(values)
        self.errors += other.errors
        if self.first_error is None:
            self.first_error = other.first_error

    @property
    def count(self):
        return sum(len(values) for values in self.latencies.values())


def describe(exc):
    """One line naming an exception, for the report's notes."""
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0] if text else "")


def summarize(samples, duration, mixed=False):
    """The report's figures for one cell measured over *duration* seconds.

    Percentiles are nearest-rank, in milliseconds; None when nothing completed.
    A *mixed* workload's row also carries its fast queries' own percentiles
    (``fast_p50_ms``, ``fast_p99_ms``): the slow ones must not hide them.
    """
    everything = sorted(value for values in samples.latencies.values() for value in values)
    row = {
        "qps": round(len(everything) / duration, 1),
        "p50_ms": _percentile_ms(everything, 50),
        "p99_ms": _percentile_ms(everything, 99),
        "errors": samples.errors,
    }
    if mixed:
        fast = sorted(samples.latencies.get(FAST, ()))
        row["fast_p50_ms"] = _percentile_ms(fast, 50)
        row["fast_p99_ms"] = _percentile_ms(fast, 99)
    return row


def _percentile_ms(ordered, pct):
    seconds = percentile(ordered, pct)
    return None if seconds is None else round(seconds * 1000.0, 3)


class NotMeasured(Exception):
    """A strategy or a cell produced no figures (a client hung, a tool failed); the message says why."""
