"""Server connections in use, counted on the server itself during a cell.

Counting in ``pg_stat_activity`` is the one method that is honest for every
strategy alike: a pool's idle connections count, connect-per-query's count
as they come and go, and pgbench's and PgBouncer's are seen the same way.
"""

import threading

import psycopg2

from .results import describe

#: Seconds between two counts.
INTERVAL = 0.1

COUNT_SQL = """
    select count(*) from pg_stat_activity
    where datname = current_database() and backend_type = 'client backend' and pid <> pg_backend_pid()
"""


class ConnectionSampler:
    """Counts the database's client connections every INTERVAL seconds; :attr:`peak` is the most seen.

    It starts counting *delay* seconds after :meth:`start` (after the
    warm-up, when the last cell's connections are gone) and stops at
    :meth:`stop`. It sees every client of the database: run the bench on a
    database nobody else uses.
    """

    def __init__(self, dsn, delay):
        self.dsn = dsn
        self.delay = delay
        self.peak = None
        #: why counting stopped early, if it did
        self.failure = None
        self._stop = threading.Event()
        self._thread = None
        self._conn = None

    def start(self):
        self._conn = psycopg2.connect(self.dsn)
        self._conn.autocommit = True
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop counting and return the peak (None if it never counted)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._conn.close()
        return self.peak

    def _run(self):
        if self._stop.wait(self.delay):
            return
        try:
            with self._conn.cursor() as cursor:
                while True:
                    cursor.execute(COUNT_SQL)
                    count = cursor.fetchone()[0]
                    self.peak = count if self.peak is None else max(self.peak, count)
                    if self._stop.wait(INTERVAL):
                        return
        except psycopg2.Error as exc:
            self.failure = describe(exc)
