"""Whether a database can be reached: what the attempts to connect showed, and when to try again.

The pool records each attempt here. From them come the delay before the next
attempt (a capped, jittered exponential backoff, so that an unreachable
database never makes the daemon spin), whether a job should wait for the
database or be told at once that it is unreachable, and the words it is told.
"""

import random
from typing import Optional

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from .errors import ServiceUnavailable

#: What libpq says when the server refuses us for a reason that waiting will
#: not change (in English, the server's default lc_messages).
_REFUSALS_FOR_GOOD = (
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "permission denied for database",
    "invalid connection option",
    "invalid sslmode",
)


class Backoff:
    """Delays between reconnection attempts: doubling, capped, jittered.

    The constants live on the class so tests can shorten them.
    """

    INITIAL_DELAY = 0.1
    MAX_DELAY = 5.0
    MULTIPLIER = 2.0
    JITTER = 0.1  # each delay is randomly up to 10% shorter or longer

    def __init__(self) -> None:
        self._base = 0.0

    def next_delay(self) -> float:
        self._base = min(
            self.MAX_DELAY, self._base * self.MULTIPLIER if self._base else self.INITIAL_DELAY
        )
        return self._base * (1 + random.uniform(-self.JITTER, self.JITTER))

    def reset(self) -> None:
        self._base = 0.0


class Reachability:
    """What the attempts to connect to one database showed, for its pool.

    *shown* names the database in messages (its DSN, password masked).
    """

    def __init__(self, shown: str) -> None:
        self.shown = shown
        self.last_error: Optional[BaseException] = None  # of the latest attempt, if it failed
        self.ever_connected = False
        self.errors = 0
        self.reconnects = 0  # connections opened after attempts that failed: the database came back
        self.backoff = Backoff()
        self._down_since: Optional[float] = None  # on the loop's clock: when attempts began to fail with nothing open

    def connected(self) -> None:
        if self.last_error is not None:
            self.reconnects += 1
        self.backoff.reset()
        self.last_error = None
        self.ever_connected = True
        self._down_since = None

    def failed(self, exc: BaseException, now: float, nothing_open: bool) -> float:
        """Record a failed attempt; return the seconds to wait before the next one."""
        self.errors += 1
        self.last_error = exc
        if nothing_open and self._down_since is None:
            self._down_since = now
        return self.backoff.next_delay()

    def down(self, nothing_open: bool) -> bool:
        """True while nothing is open and the latest attempt to connect failed."""
        return self.last_error is not None and nothing_open

    def outage_error(self, now: float, nothing_open: bool, patience: float) -> Optional[ServiceUnavailable]:
        """ServiceUnavailable for a job that should not wait for the database now, else None.

        Waiting makes sense during a short outage (a restart, a failover),
        which the pool rides out by reconnecting. It only delays the same
        error when the database has not been reached since the pool opened,
        refused us for good (a password, a database that does not exist), or
        has been down for longer than *patience* seconds (the pool's timeout).
        """
        if not self.down(nothing_open):
            return None
        if self._down_since is None:  # attempts began to fail while connections were open: the outage begins now
            self._down_since = now
        lasted = now - self._down_since
        if self.ever_connected and lasted <= patience and not refused_for_good(self.last_error):
            return None
        return ServiceUnavailable(
            "the database is unreachable (for %.1f s, %s): %s" % (lasted, self.shown, one_line(self.last_error))
        )

    def wait_error(self, waited: float) -> Optional[ServiceUnavailable]:
        """ServiceUnavailable for a job that waited *waited* seconds while connecting failed, else None."""
        if self.last_error is None:
            return None
        return ServiceUnavailable(
            "the database is unreachable (waited %.2f s): %s" % (waited, one_line(self.last_error))
        )


def refused_for_good(exc: Optional[BaseException]) -> bool:
    """True if connecting failed for a reason that retrying will not change.

    A DSN that does not parse (psycopg2 raises ProgrammingError), a wrong
    password, a role or database that does not exist: the daemon must not
    start on these. A server that is down or starting up may yet come.
    """
    if isinstance(exc, psycopg2.ProgrammingError):
        return True
    text = str(exc).lower()
    return any(refusal in text for refusal in _REFUSALS_FOR_GOOD)


def mask_dsn(dsn: Optional[str]) -> str:
    """*dsn* with its password replaced by ``***``, fit for logs and status."""
    try:
        params = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "(a connection string that does not parse)"
    if "password" in params:
        params["password"] = "***"
    return make_dsn(**params)


def one_line(exc: object) -> str:
    """*exc*'s message on one line, or its class's name if it has none."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
