"""Server-side prepared statements for the jobs' SQL, per pooled connection.

psycopg2 sends every query as text, so the server parses and plans it every
time: for a point read by primary key that is half of the server's work. The
daemon sees every job's SQL and owns its connections, so each connection
prepares the statements it runs:

- the first time a statement runs on a connection (with parameters of the
  same types), it goes as ``PREPARE dbservice_N (types) AS <sql>; EXECUTE
  dbservice_N (%s, ...)``: one round trip, whose result is the EXECUTE's;
- after that, as ``EXECUTE dbservice_N (%s, ...)``.

Parameters are still bound by psycopg2, into the EXECUTE, each occurrence of
a placeholder its own ``$n``. Each is declared as the type of the literal
psycopg2 writes for it (an int as int4, int8 or numeric by its size, a
float or a Decimal as numeric, a date as date...; a string or None as
unknown, left to the context, as its quoted literal would be), so the server
resolves the statement as it resolved the plain text: same results, same
types. What is not prepared runs as plain text, as before: other statements
than SELECT, INSERT, UPDATE, DELETE, VALUES and WITH; several statements in
one job; parameters that are lists, tuples or dicts; and a statement the
server would not prepare (see :meth:`ConnectionStatements.failed`).

Each connection keeps at most ``max_prepared`` statements, the least
recently used deallocated in the round trip of the PREPARE that would
exceed them; a session reset (``DISCARD ALL``) forgets them all.
"""

import collections
import datetime
import decimal
import math
import re
import uuid

#: The first word of the statements PREPARE takes.
_PREPARABLE = re.compile(r"\s*(select|insert|update|delete|values|with)\b", re.IGNORECASE)
#: psycopg2's placeholders: %s, %(name)s, and %% for a literal percent sign.
_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]*)\))?s|%%")
#: The server's errors that say the statement, as prepared, could not run:
#: nothing of it ran, so it may run again as plain text.
#: 42xxx: syntax, names, types, privileges; 0A000: a cached plan whose result
#: type changed; 26000: a prepared statement that does not exist.
_NOT_RUN = ("42", "0A000", "26000")

_INT4 = range(-(2 ** 31), 2 ** 31)
_INT8 = range(-(2 ** 63), 2 ** 63)


def literal_type(value):
    """How psycopg2 writes *value*, as (the type to declare for its $n, the cast after it, or None).

    A bare number or boolean is declared its literal's type (int4, int8 or numeric by
    its size, as the server types the literal); a string or None stays
    unknown, left to the context as its quoted literal would be; what
    psycopg2 writes with a cast (``'2020-01-02'::date``) gets the same cast
    after its $n, so that the server also names the column as it did. None
    if it is not preparable.
    """
    kind = type(value)
    if kind is str or value is None:
        return _UNKNOWN
    if kind is int:
        return ("int4", None) if value in _INT4 else ("int8", None) if value in _INT8 else ("numeric", None)
    if kind is float:
        return ("numeric", None) if math.isfinite(value) else ("unknown", "float")
    if kind is decimal.Decimal:
        return ("numeric", None) if value.is_finite() else ("unknown", "numeric")
    if kind is datetime.datetime:
        return ("unknown", "timestamp" if value.tzinfo is None else "timestamptz")
    if kind is datetime.time:
        return ("unknown", "time" if value.tzinfo is None else "timetz")
    return _CASTS.get(kind)


_UNKNOWN = ("unknown", None)
_CASTS = {
    bool: ("boolean", None),
    datetime.date: ("unknown", "date"),
    datetime.timedelta: ("unknown", "interval"),
    bytes: ("unknown", "bytea"),
    bytearray: ("unknown", "bytea"),
    memoryview: ("unknown", "bytea"),
    uuid.UUID: ("unknown", "uuid"),
}


class _Shape:
    """One SQL text cut at its placeholders, and which parameter each one is."""

    __slots__ = ("parts", "order")

    def __init__(self, parts, order):
        self.parts = parts  # the SQL between the placeholders: one more than them
        self.order = order  # per placeholder, the index or name of the parameter in it

    def body(self, types):
        """The SQL with $1, $2... (each with its cast, if any): what follows PREPARE ... AS."""
        pieces = [self.parts[0]]
        for n, ((_, cast), part) in enumerate(zip(types, self.parts[1:]), 1):
            pieces.append("$%d::%s" % (n, cast) if cast else "$%d" % n)
            pieces.append(part)
        return "".join(pieces)


_shapes = {}
_SHAPES_KEPT = 4096


def shape_of(sql, bound):
    """The _Shape of *sql*, or None if it is not a statement PREPARE takes (cached per text).

    *bound*: the job has parameters, so psycopg2 reads its placeholders (and
    its ``%%``); without, it sends the text as it is, and so do we.
    """
    try:
        return _shapes[sql, bound]
    except KeyError:
        pass
    shape = _shape(sql, bound)
    if len(_shapes) >= _SHAPES_KEPT:
        _shapes.clear()
    _shapes[sql, bound] = shape
    return shape


def _shape(sql, bound):
    if not _PREPARABLE.match(sql) or ";" in sql or re.search(r"\$\d", sql):
        return None
    if not bound:
        return _Shape((sql,), ())
    parts, order, start, positional = [], [], 0, 0
    for match in _PLACEHOLDER.finditer(sql):
        if match.group(0) == "%%":
            continue  # stays: psycopg2 turns it into % as it binds the EXECUTE
        parts.append(sql[start:match.start()])
        start = match.end()
        if match.group("name") is None:
            order.append(positional)
            positional += 1
        else:
            order.append(match.group("name"))
    parts.append(sql[start:])
    if positional and positional != len(order):
        return None  # both kinds at once: psycopg2 refuses it; let it say so
    return _Shape(tuple(parts), tuple(order))


class PreparedQuery:
    """How one job's statement goes to the server: its text and parameters, and whether it prepares."""

    __slots__ = ("text", "params", "key", "name", "fresh")

    def __init__(self, text, params, key, name, fresh):
        self.text = text
        self.params = params
        self.key = key  # (sql, parameter types, whether it has parameters)
        self.name = name  # (the statement's name, the text that executes it)
        self.fresh = fresh  # it prepares the statement on this connection


class ConnectionStatements:
    """The statements one pooled connection prepared, most recently used last."""

    __slots__ = ("max_prepared", "_names", "_numbers", "_unpreparable")

    def __init__(self, max_prepared):
        self.max_prepared = max_prepared
        self._names = collections.OrderedDict()  # (sql, types, bound) -> (statement name, its EXECUTE text)
        self._numbers = 0
        self._unpreparable = set()  # keys the server would not prepare on this connection

    def __len__(self):
        """How many statements are prepared on the connection."""
        return len(self._names)

    def query(self, sql, params, prepare_new=True):
        """The PreparedQuery for *sql* with *params*, or None to send them as plain text.

        With *prepare_new* False (inside a client's transaction, where a
        failed PREPARE would abort it) only statements prepared already are
        used.
        """
        if not self.max_prepared:
            return None
        bound = params is not None
        shape = shape_of(sql, bound)
        if shape is None:
            return None
        try:
            values = [params[key] for key in shape.order] if bound else None
        except (IndexError, KeyError, TypeError):
            return None  # psycopg2 refuses them as plain text too, saying why
        if isinstance(params, (list, tuple)) and len(params) != len(shape.order):
            return None  # likewise
        types = tuple(literal_type(value) for value in values) if bound else ()
        if None in types:
            return None
        key = (sql, types, bound)
        prepared = self._names.get(key)
        if prepared is not None:
            self._names.move_to_end(key)
            return PreparedQuery(prepared[1], values, key, prepared[0], False)
        if not prepare_new or key in self._unpreparable:
            return None
        self._numbers += 1
        name = "dbservice_%d" % self._numbers
        body = shape.body(types)
        execute = _execute(name, len(types), body)
        declared = " (%s)" % ", ".join(declared for declared, _ in types) if types else ""
        text = "PREPARE %s%s AS %s; %s" % (name, declared, body, execute)
        if len(self._names) >= self.max_prepared:  # full: the least recently used goes, in the same round trip
            _, (old, _) = self._names.popitem(last=False)
            text = "DEALLOCATE %s; %s" % (old, text)
        return PreparedQuery(text, values, key, (name, execute), True)

    def sent(self, query):
        """*query* reached the server and ran: remember what it prepared."""
        if query.fresh:
            self._names[query.key] = query.name

    def failed(self, query, error):
        """*query* failed with *error*; True if nothing of it ran, so the job may run again as plain text.

        A fresh PREPARE the server refused (a parameter whose type it cannot
        infer, say) is not tried again on this connection; a prepared
        statement whose plan went stale (DDL changed its result) or that is
        gone is forgotten, and prepared anew next time.
        """
        code = getattr(error, "pgcode", None) or ""
        if not code.startswith(_NOT_RUN):
            if query.fresh:  # the PREPARE ran, its EXECUTE failed: it stays prepared
                self._names[query.key] = query.name
            return False
        self._names.pop(query.key, None)
        if query.fresh:
            self._unpreparable.add(query.key)
        return True

    def clear(self):
        """The session was reset (DISCARD ALL): nothing is prepared any more."""
        self._names.clear()


def _execute(name, count, body):
    """EXECUTE *name* with *count* placeholders, the statement's SQL after it in a comment.

    The comment keeps pg_stat_activity and the server's log saying what runs,
    as with plain text (with its own comments defused, so that it stays one).
    """
    args = " (%s)" % ", ".join(["%s"] * count) if count else ""
    return "EXECUTE %s%s /* %s */" % (name, args, body.replace("*/", "* /").replace("/*", "/ *"))
