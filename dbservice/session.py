"""Session state a job may leave behind on its connection, and the reset that clears it.

A pooled connection serves one client's job, then another's. Whatever a job
changes in its session outlives it: a ``SET`` or ``SET ROLE``, a temporary
table and its rows, a prepared statement, a ``WITH HOLD`` cursor, a session
advisory lock, a ``LISTEN``. The next client would see all of it. Resetting
the session after every job costs a round trip per job; so the SQL of each
job is read instead, quickly and erring on the side of a reset, and a
connection whose job may have changed its session is reset with
``DISCARD ALL`` before anybody else gets it.

What the text cannot show is a function that changes session state inside
its body (a PL/pgSQL ``SET``, or ``CREATE TEMP TABLE``): with
``session_reset = "always"`` every job is followed by the reset.
"""

import re
from typing import TYPE_CHECKING

import psycopg2.extensions as ext

if TYPE_CHECKING:
    from .connection import PooledConnection

#: What clears a session: settings, role, temporary tables, prepared
#: statements, cursors, LISTEN, advisory locks, cached plans and sequences.
RESET = "DISCARD ALL"

#: session_reset's values.
AUTO, ALWAYS = "auto", "always"
SESSION_RESETS = (AUTO, ALWAYS)

# The first words of a statement, past blanks and comments (each alternative
# starts differently, so matching stays linear in the text).
_FIRST_WORDS = re.compile(r"(?:\s|--[^\n]*|/\*[^*]*\*+(?:[^/*][^*]*\*+)*/)*(\w+)(?:\s+(\w+))?")
# Statements that may change the session. SET LOCAL, SET TRANSACTION and SET
# CONSTRAINTS end with the transaction.
_CHANGING_STATEMENTS = frozenset(("set", "reset", "prepare", "deallocate", "discard", "listen", "load", "do", "call"))
_TRANSACTION_SETS = frozenset(("local", "transaction", "constraints"))
# Anywhere in the text: temporary objects, WITH HOLD cursors, session
# advisory locks (not the _xact_ ones), set_config(), dblink connections.
_CHANGING_WORDS = re.compile(
    r"\btemp(?:orary)?\s+(?:table|view|sequence|recursive)\b|\binto\s+temp(?:orary)?\b|\bpg_temp\b"
    r"|\bwith\s+hold\b|advisory_lock|\bset_config\b|\bdblink_connect",
    re.IGNORECASE,
)
#: Longer SQL is not read: it is reset after, which costs it little.
_READ_LENGTH = 65536

#: SQL texts up to this long have their verdict remembered: jobs repeat.
_CACHED_LENGTH = 4096
_CACHE_SIZE = 4096
_verdicts = {}


def may_change_session(sql: str) -> bool:
    """True unless *sql* surely leaves its session as it found it (see the module's docstring)."""
    verdict = _verdicts.get(sql)
    if verdict is None:
        verdict = len(sql) > _READ_LENGTH or _changing_statement(sql) or bool(_CHANGING_WORDS.search(sql))
        if len(sql) <= _CACHED_LENGTH:
            if len(_verdicts) >= _CACHE_SIZE:
                _verdicts.clear()
            _verdicts[sql] = verdict
    return verdict


def _changing_statement(sql):
    for statement in sql.split(";"):
        words = _FIRST_WORDS.match(statement)
        if words is not None:
            first = words.group(1).lower()
            if first in _CHANGING_STATEMENTS and not (
                first == "set" and (words.group(2) or "").lower() in _TRANSACTION_SETS
            ):
                return True
    return False


def in_transaction(conn: "PooledConnection") -> bool:
    """True if *conn*, a PooledConnection, was left inside a transaction (or a failed one)."""
    status = conn.pgconn.get_transaction_status()
    return status in (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR)


async def clean(conn: "PooledConnection", deadline: float) -> bool:
    """Roll back what a job left open on *conn*, reset its session if a job may have changed it.

    A transaction is left open when the BEGIN of a client's transaction ran
    but the client gave up on it (its task was cancelled meanwhile). Returns
    True if the session was reset; raises what stopped it (then the
    connection must be closed).
    """
    cursor = conn.pgconn.cursor()
    try:
        if in_transaction(conn):
            conn.execute(cursor, "ROLLBACK")
            await conn.wait(deadline)
        if not conn.needs_reset:
            return False
        conn.execute(cursor, RESET)
        await conn.wait(deadline)
        conn.needs_reset = False
        conn.statements.clear()  # DISCARD ALL deallocated them
        return True
    finally:
        cursor.close()
        del conn.pgconn.notifies[:]  # what arrived before UNLISTEN: nobody will read it
