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
import itertools
import pickle
from typing import Any, Dict, Final, Iterable, List, Mapping, NoReturn, Optional, Sequence, Tuple, Union

from .errors import JobRefused, ResultTooLarge

#: A statement's parameters: a sequence for ``%s`` placeholders, a mapping for
#: ``%(name)s`` ones, or None (executemany's: a sequence of them).
Params = Union[Sequence[Any], Mapping[str, Any], None]
#: One row of a result.
Row = Tuple[Any, ...]
#: What fetchtable() returns: the column names, and the rows.
Table = Tuple[List[str], List[Row]]

#: A job is of one kind: a statement, with how its result is fetched (what
#: the client gets back), or the control of a client's transaction.
FETCH_ALL: Final = "all"  # list of tuples
FETCH_ONE: Final = "one"  # tuple or None
FETCH_VALUE: Final = "value"  # first column of the first row, or None
FETCH_ROWCOUNT: Final = "rowcount"  # number of rows affected
FETCH_MANY: Final = "many"  # params is a list of parameter sets; total rowcount
FETCH_TABLE: Final = "table"  # (column names, list of tuples)
#: What a DB-API cursor needs: (description, rowcount, rows, status message), where
#: description is a list of psycopg2's 7-item column tuples (type_code: the type's
#: OID), and it and rows are None for a statement that returns no rows.
FETCH_CURSOR: Final = "cursor"
#: Transaction control: the daemon writes the SQL itself, from allowed options.
BEGIN: Final = "begin"  # params: {"isolation_level", "readonly", "deferrable"}
COMMIT: Final = "commit"
ROLLBACK: Final = "rollback"
TRANSACTION_CONTROL = frozenset((BEGIN, COMMIT, ROLLBACK))
FETCH_MODES = frozenset((FETCH_ALL, FETCH_ONE, FETCH_VALUE, FETCH_ROWCOUNT, FETCH_MANY, FETCH_TABLE, FETCH_CURSOR))
JOB_KINDS = FETCH_MODES | TRANSACTION_CONTROL
#: A COPY, whose data streams on beside it (copying.py). It comes in a message
#: of its own (wire.MSG_COPY), never as a MSG_JOB: it is not among JOB_KINDS.
COPY = "copy"

#: Isolation levels by name, and by psycopg2's ISOLATION_LEVEL_* numbers.
ISOLATION_LEVELS = {
    "read uncommitted": "READ UNCOMMITTED",
    "read committed": "READ COMMITTED",
    "repeatable read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
    4: "READ UNCOMMITTED",
    1: "READ COMMITTED",
    2: "REPEATABLE READ",
    3: "SERIALIZABLE",
}

#: How iterate() streams rows: a server-side cursor inside a transaction.
STREAM_DECLARE = "DECLARE dbservice_rows NO SCROLL CURSOR FOR "
STREAM_FETCH = "FETCH FORWARD %s FROM dbservice_rows"

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

#: What one value costs once bound, beyond the length of a string or bytes:
#: psycopg2 spends about 1-2 us binding each one, inside the event loop.
VALUE_COST = 64
#: Containers nested deeper than this are refused: psycopg2 and json recurse
#: into them, and PostgreSQL's arrays stop at 6 dimensions anyway.
MAX_NESTING = 32
#: The bound when none is configured: a job's largest frame (Settings.max_frame).
DEFAULT_MAX_PARAMS_SIZE = 32 * 1024 * 1024

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
    """One unit of work for the daemon; immutable once built.

    *tx* names the client's transaction the job belongs to (None: a job that
    is its own transaction). *primary* runs it on the primary even where it
    could read from a replica.
    """

    __slots__ = ("sql", "params", "kind", "timeout", "tx", "primary")

    def __init__(
        self, sql: str, params: Params = None, kind: str = FETCH_ALL, timeout: Optional[float] = None,
        tx: Optional[int] = None, primary: bool = False,
    ) -> None:
        self.sql = sql
        self.params = params
        self.kind = kind  # one of JOB_KINDS
        self.timeout = timeout
        self.tx = tx
        self.primary = primary

    def __repr__(self) -> str:
        return "<Job %s %.60r timeout=%s>" % (self.kind, self.sql, self.timeout)

    def to_wire(self) -> Tuple[Any, ...]:
        """(sql, params, kind, timeout, tx), and True after them for a job that asks for the primary."""
        if self.primary:
            return (self.sql, self.params, self.kind, self.timeout, self.tx, True)
        return (self.sql, self.params, self.kind, self.timeout, self.tx)

    @classmethod
    def from_wire(cls, message: object, max_params_size: int = DEFAULT_MAX_PARAMS_SIZE) -> "Job":
        """Build a job from a decoded message, or raise JobRefused saying why.

        Its parameters may take at most *max_params_size* once bound (see
        :func:`check_params`).
        """
        if not (isinstance(message, tuple) and len(message) in (5, 6)):
            raise JobRefused("a job must be a tuple (sql, params, kind, timeout, tx[, primary])")
        sql, params, kind, timeout, tx = message[:5]
        primary = len(message) == 6 and message[5] is True
        if kind not in JOB_KINDS:
            raise JobRefused(
                "unknown kind of job %r; use one of %s" % (kind, ", ".join(sorted(JOB_KINDS)))
            )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise JobRefused("the job's timeout must be a positive number of seconds, not %r" % (timeout,))
        if tx is not None and (isinstance(tx, bool) or not isinstance(tx, int)):
            raise JobRefused("a transaction id must be an integer, not %r" % (tx,))
        if kind in TRANSACTION_CONTROL:
            if tx is None:
                raise JobRefused("%s needs the id of its transaction" % kind)
            return cls(_control_statement(kind, params), None, kind, timeout, tx)
        if not isinstance(sql, str) or not sql.strip():
            raise JobRefused("the job's SQL must be a non-empty string")
        check_params(params, kind == FETCH_MANY, max_params_size)
        return cls(sql, params, kind, timeout, tx, primary)


def transaction_options(
    isolation_level: Union[str, int, None] = None, readonly: Optional[bool] = None, deferrable: Optional[bool] = None,
) -> Dict[str, Any]:
    """BEGIN's options as a job carries them; None leaves the server's default."""
    options = {"isolation_level": isolation_level, "readonly": readonly, "deferrable": deferrable}
    return {name: value for name, value in options.items() if value is not None}


def _control_statement(kind: str, options: object) -> str:
    """The SQL of BEGIN, COMMIT or ROLLBACK; BEGIN's options come from allowlists."""
    if kind == COMMIT:
        return "COMMIT"
    if kind == ROLLBACK:
        return "ROLLBACK"
    if options is not None and not isinstance(options, dict):
        raise JobRefused(
            "BEGIN's options must be a dict of isolation_level, readonly and deferrable, not %s"
            % type(options).__name__
        )
    options = dict(options or {})
    words = ["BEGIN"]
    level = options.pop("isolation_level", None)
    if level is not None:
        key = level.lower() if isinstance(level, str) else level
        if isinstance(key, bool) or not isinstance(key, (str, int)) or key not in ISOLATION_LEVELS:
            raise JobRefused(
                "unknown isolation level %r; use read committed, repeatable read or serializable" % (level,)
            )
        words.append("ISOLATION LEVEL " + ISOLATION_LEVELS[key])
    for option, on, off in (("readonly", "READ ONLY", "READ WRITE"), ("deferrable", "DEFERRABLE", "NOT DEFERRABLE")):
        value = options.pop(option, None)
        if value is not None:
            if not isinstance(value, bool):
                raise JobRefused("%s must be True, False or None, not %r" % (option, value))
            words.append(on if value else off)
    if options:
        raise JobRefused(
            "unknown transaction option(s) %s; use isolation_level, readonly, deferrable"
            % ", ".join(sorted(map(str, options)))
        )
    return " ".join(words)


_STRINGS = (str, bytes, bytearray)
_CONTAINERS = (list, tuple, dict)


def check_params(params: Any, many: bool, limit: int) -> None:
    """Refuse parameters psycopg2 could not bind, or could only at a cost over *limit*.

    psycopg2 binds a job's parameters synchronously, in the daemon's event
    loop, expanding every reference it meets: a small pickle whose lists
    share sub-lists (``a = [a, a]``, 23 times) binds to millions of values
    and froze the loop for seconds. So the cost is counted as binding will
    meet it, a shared container as often as it is referenced: VALUE_COST for
    each value plus the length of each string and bytes. A container inside
    itself, or nesting deeper than MAX_NESTING, is refused too.
    """
    if params is None:
        return
    if many:
        if not isinstance(params, (list, tuple)):
            raise JobRefused("executemany needs a list of parameter sets, not %s" % type(params).__name__)
        for each in params:
            if each is not None:
                _check_one_set(each)
    else:
        _check_one_set(params)
    if _bound_size(params, limit) > limit:
        raise JobRefused(
            "the job's parameters would take more than %d bytes once bound (max_params_size; shared "
            "references count each time they are used): send fewer or smaller values, or raise "
            "--max-params-size" % limit
        )


def _check_one_set(params: object) -> None:
    if not isinstance(params, _CONTAINERS):
        raise JobRefused(
            "query parameters must be a tuple, a list or a dict, not %s" % type(params).__name__
        )


def _bound_size(
    value: Union[List[Any], Tuple[Any, ...], Dict[Any, Any]], limit: int, sizes: Optional[Dict[int, int]] = None,
    path: Tuple[object, ...] = (),
) -> int:
    """The cost of binding the container *value*; once past *limit*, a partial count over it.

    A container met again is counted from *sizes* (by id), so the walk costs
    as much as the distinct containers, however often they are shared: no
    more than decoding the frame did.
    """
    items = list(itertools.chain.from_iterable(value.items())) if isinstance(value, dict) else value
    size = len(items) * VALUE_COST
    if size > limit:
        return size
    nested: Iterable[Any]
    if len(items) <= 16:  # the usual few parameters: a plain loop is quickest
        nested = []
        for item in items:
            if isinstance(item, _STRINGS):
                size += len(item)
            elif isinstance(item, _CONTAINERS):
                nested.append(item)
    else:
        size += sum(map(len, itertools.compress(items, map(isinstance, items, itertools.repeat(_STRINGS)))))
        nested = itertools.compress(items, map(isinstance, items, itertools.repeat(_CONTAINERS)))
    if not nested:
        return size
    sizes = {} if sizes is None else sizes
    inner = path + (value,)
    for container in nested:
        known = sizes.get(id(container))
        if known is None:
            if any(container is outer for outer in inner):
                raise JobRefused("a query parameter contains itself; it could never be bound")
            if len(inner) >= MAX_NESTING:
                raise JobRefused("query parameters nest more than %d containers deep" % MAX_NESTING)
            known = sizes[id(container)] = _bound_size(container, limit, sizes, inner)
        size += known
        if size > limit:
            break
    return size


class _JobUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_CLASSES:
            return super().find_class(module, name)
        raise JobRefused(
            "a job may not carry %s.%s; parameters may be str, bytes, numbers, None, bool, "
            "tuple, list, dict, date/time types, Decimal or UUID" % (module, name)
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise JobRefused("a job may not carry persistent references")


def dumps_job(job: Job) -> bytes:
    return pickle.dumps(job.to_wire(), PICKLE_PROTOCOL)


def loads_job(data: bytes, max_params_size: int = DEFAULT_MAX_PARAMS_SIZE, trusted: bool = False) -> Job:
    """Decode a job; raise JobRefused for bytes that are no job, saying what is wrong with them.

    Bytes from another process go through the restricted unpickler; *trusted*
    ones, from the app's own processes (queue_intake.py), through plain
    pickle. Any other exception comes from our own code: a bug of ours.
    """
    try:
        message = pickle.loads(data) if trusted else _JobUnpickler(io.BytesIO(data)).load()
    except JobRefused:
        raise
    except Exception as exc:
        # A truncated or garbled pickle can raise almost anything.
        raise JobRefused("the job could not be decoded: %s" % (exc,)) from None
    return Job.from_wire(message, max_params_size)


def loads_message(data: bytes) -> Any:
    """Decode untrusted bytes with the restricted unpickler: plain values only, or JobRefused.

    For the messages that are not jobs (a COPY, a subscription); loads_job()
    does the same inline, as a call would cost every job 0.2 us.
    """
    try:
        return _JobUnpickler(io.BytesIO(data)).load()
    except JobRefused:
        raise
    except Exception as exc:
        raise JobRefused("the job could not be decoded: %s" % (exc,)) from None


def dumps_reply(value: object) -> bytes:
    return pickle.dumps(value, PICKLE_PROTOCOL)


def encode_reply(ok: bool, value: object, max_bytes: int) -> Tuple[bool, object, bytes]:
    """A job's reply as (ok, value, payload): its result pickled, or the error that stands for it.

    A result that cannot be pickled, or takes more than *max_bytes*, is
    replaced by an error saying so: the job still gets its one reply, and
    is counted by that error (*ok* and *value* are what was sent).
    """
    try:
        payload = dumps_reply(value)
    except Exception as exc:
        error: Exception = JobRefused("the result could not be sent: %s" % exc)
    else:
        if not ok or len(payload) <= max_bytes:
            return ok, value, payload
        error = ResultTooLarge(
            "the result takes %d bytes, more than max_result_bytes (%d); select fewer rows "
            "or stream them with iterate()" % (len(payload), max_bytes)
        )
    return False, error, dumps_reply(error)


loads_reply = pickle.loads

