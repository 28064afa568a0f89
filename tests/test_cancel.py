"""The cancel request, on both of its paths: libpq 17's non-blocking API and PQcancel in a thread."""

import asyncio
import time

import psycopg2
import psycopg2.errors
import pytest

from dbservice import cancel
from dbservice.connection import PooledConnection


@pytest.mark.parametrize("nonblocking", [True, False], ids=["nonblocking", "thread"])
def test_cancel_query_stops_a_running_query(dsn, monkeypatch, nonblocking):
    if nonblocking and not cancel.NONBLOCKING:
        pytest.skip("this libpq has no non-blocking cancel (libpq < 17)")
    monkeypatch.setattr(cancel, "NONBLOCKING", nonblocking)

    async def main():
        loop = asyncio.get_running_loop()
        conn = await PooledConnection.connect(dsn, 1, loop, on_lost=None, deadline=loop.time() + 10)
        cursor = conn.pgconn.cursor()  # kept: psycopg2 forgets a query whose cursor is gone
        conn.execute(cursor, "select pg_sleep(30)")
        await asyncio.sleep(0.2)  # let the server start on it
        started = time.monotonic()
        await cancel.cancel_query(conn.pgconn, timeout=5)
        with pytest.raises(psycopg2.errors.QueryCanceled):
            await conn.wait(loop.time() + 5)
        elapsed = time.monotonic() - started
        conn.close()
        return elapsed

    assert asyncio.run(main()) < 3  # not the query's 30 s
