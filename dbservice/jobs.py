"""What a job is, and how jobs and their replies are encoded.

A job is one SQL statement (or, for ``executemany``, one statement and a list of
parameter sets) to run in its own transaction, with how to fetch its result and
how long it may take. Its parameters always travel apart from the SQL: psycopg2
binds them on the daemon side; dbservice never builds SQL out of values.

Jobs from the Unix socket come from other processes, so they are decoded by
:func:`loads_job`, an unpickler that admits only the value types a query
parameter can be. Replies go the other way, to a client that has checked the
daemon knows the shared secret, and use plain pickle.
"""

import io
import pickle

from .errors import JobRefused

#: How a job's result is fetched, and what the client gets back.
FETCH_ALL = "all"  # list of tuples
FETCH_ONE = "one"  # tuple or None
FETCH_VALUE = "value"  # first column of the first row, or None
FETCH_ROWCOUNT = "rowcount"  # number of rows affected
FETCH_MANY = "many"  # params is a list of parameter sets; total rowcount
FETCH_TABLE = "table"  # (column names, list of tuples)
FETCH_MODES = frozenset(
    (FETCH_ALL, FETCH_ONE, FETCH_VALUE, FETCH_ROWCOUNT, FETCH_MANY, FETCH_TABLE)
)

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

# The only classes a job's pickle may name. Everything else a parameter can be
# (str, bytes, int, float, None, bool, tuple, list, dict) is a pickle opcode of
# its own and never goes through find_class.
_ALLOWED_CLASSES = frozenset(
    {
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "time"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        ("decimal", "Decimal"),
        ("uuid", "UUID"),
        ("uuid", "SafeUUID"),
    }
)


class Job:
    """One unit of work for the daemon; immutable once built."""

    __slots__ = ("sql", "params", "fetch", "timeout")

    def __init__(self, sql, params=None, fetch=FETCH_ALL, timeout=None):
        self.sql = sql
        self.params = params
        self.fetch = fetch
        self.timeout = timeout

    def __repr__(self):
        return "<Job %s %.60r timeout=%s>" % (self.fetch, self.sql, self.timeout)

    def to_wire(self):
        return (self.sql, self.params, self.fetch, self.timeout)

    @classmethod
    def from_wire(cls, message):
        """Build a job from a decoded message, or raise JobRefused saying why."""
        if not (isinstance(message, tuple) and len(message) == 4):
            raise JobRefused("a job must be a tuple (sql, params, fetch, timeout)")
        sql, params, fetch, timeout = message
        if not isinstance(sql, str) or not sql.strip():
            raise JobRefused("the job's SQL must be a non-empty string")
        if fetch not in FETCH_MODES:
            raise JobRefused(
                "unknown fetch mode %r; use one of %s" % (fetch, ", ".join(sorted(FETCH_MODES)))
            )
        _check_params(params, many=fetch == FETCH_MANY)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise JobRefused("the job's timeout must be a positive number of seconds, not %r" % (timeout,))
        return cls(sql, params, fetch, timeout)


def _check_params(params, many):
    if many:
        if not isinstance(params, (list, tuple)):
            raise JobRefused("executemany needs a list of parameter sets, not %s" % type(params).__name__)
        for each in params:
            _check_params(each, many=False)
    elif params is not None and not isinstance(params, (tuple, list, dict)):
        raise JobRefused(
            "query parameters must be a tuple, a list or a dict, not %s" % type(params).__name__
        )


class _JobUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_CLASSES:
            return super().find_class(module, name)
        raise JobRefused(
            "a job may not carry %s.%s; parameters may be str, bytes, numbers, None, bool, "
            "tuple, list, dict, date/time types, Decimal or UUID" % (module, name)
        )

    def persistent_load(self, pid):
        raise JobRefused("a job may not carry persistent references")


def dumps_job(job):
    return pickle.dumps(job.to_wire(), PICKLE_PROTOCOL)


def loads_job(data):
    """Decode a job from untrusted bytes; raise JobRefused for anything else."""
    try:
        message = _JobUnpickler(io.BytesIO(data)).load()
    except JobRefused:
        raise
    except Exception as exc:
        # A truncated or garbled pickle can raise almost anything.
        raise JobRefused("the job could not be decoded: %s" % (exc,)) from None
    return Job.from_wire(message)


def dumps_reply(value):
    return pickle.dumps(value, PICKLE_PROTOCOL)


loads_reply = pickle.loads

