"""AsyncConnectionPool in this process: readiness waits, least-loaded lending, growing, shrinking."""

import asyncio

import pytest

from dbservice import AsyncConnectionPool, QueryTimeout
from dbservice.jobs import Job
from dbservice.runner import run_job
from dbservice.loops import new_event_loop

SELECTORS = ["epoll", "select", "uvloop"]


def run(selector, coro_fn, timeout=60):
    loop = new_event_loop(selector)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), timeout))
    finally:
        loop.close()


async def query(pool, sql, params=None, fetch="value", timeout=None):
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    conn = await pool.getconn()
    try:
        return await run_job(conn, Job(sql, params, fetch), deadline, pool.cancel)
    finally:
        pool.putconn(conn)


@pytest.mark.parametrize("selector", SELECTORS)
def test_waiting_on_a_query_does_not_block_the_loop(dsn, selector):
    """The event loop keeps running other coroutines while a query is in flight: no wait blocks it."""

    async def main():
        pool = AsyncConnectionPool(dsn, min_size=2, max_size=2)
        await pool.open()
        ticks = 0
        slow = asyncio.ensure_future(query(pool, "select pg_sleep(0.5), 1"))
        while not slow.done():  # would not run at all if the wait blocked
            ticks += 1
            await asyncio.sleep(0.005)
        fast = await query(pool, "select 2")
        await pool.close()
        return ticks, fast

    ticks, fast = run(selector, main)
    assert ticks >= 20
    assert fast == 2


@pytest.mark.parametrize("selector", SELECTORS)
def test_a_fast_query_overtakes_a_slow_one(dsn, selector):
    """With one connection busy, the next job takes the idle one: no job waits behind a slow one."""

    async def main():
        pool = AsyncConnectionPool(dsn, min_size=2, max_size=2)
        await pool.open()
        order = []

        async def job(name, sql):
            await query(pool, sql)
            order.append(name)

        await asyncio.gather(job("slow", "select pg_sleep(0.5)"), job("fast", "select 1"))
        await pool.close()
        return order

    assert run(selector, main) == ["fast", "slow"]


def test_lends_the_most_recently_used_idle_connection(dsn):
    async def main():
        pool = AsyncConnectionPool(dsn, min_size=3, max_size=3)
        await pool.open()
        a = await pool.getconn()
        b = await pool.getconn()
        c = await pool.getconn()
        assert len({a.number, b.number, c.number}) == 3  # never the same one twice
        assert [x.lent for x in (a, b, c)] == [True, True, True]
        for conn in (b, c, a):
            pool.putconn(conn)
        first = await pool.getconn()
        second = await pool.getconn()
        numbers = first.number, second.number
        pool.putconn(first)
        pool.putconn(second)
        await pool.close()
        return numbers, (a.number, c.number)

    got, expected = run("epoll", main)
    assert got == expected


def test_grows_on_demand_up_to_max_size_and_no_further(dsn):
    async def main():
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=4)
        await pool.open()
        assert pool.size == 1
        jobs = [query(pool, "select pg_sleep(0.3)") for _ in range(10)]
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, pool.size)
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        await asyncio.gather(*jobs)
        watcher.cancel()
        stats = pool.get_stats()
        await pool.close()
        return peak, stats

    peak, stats = run("epoll", main)
    assert peak == 4
    assert stats["pool_size"] == 4
    assert stats["connections_num"] == 4


@pytest.mark.parametrize("trickle", [False, True], ids=["no-load", "one-job-at-a-time"])
def test_closes_idle_connections_above_min_size(dsn, admin, trickle):
    """With *trickle*, the jobs keep coming, one at a time: the connections they do not need still close."""

    async def main():
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=3, max_idle=0.3)
        await pool.open()
        loop = asyncio.get_running_loop()
        admin.cursor().execute("select pg_advisory_lock(4715)")  # three jobs wait on it together
        try:
            burst = asyncio.gather(*[query(pool, "select pg_advisory_xact_lock_shared(4715)") for _ in range(3)])
            deadline = loop.time() + 10
            while pool.size < 3 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            grown = pool.size
        finally:
            admin.cursor().execute("select pg_advisory_unlock(4715)")
        await burst
        idle_since = loop.time()
        first_closed = None
        deadline = idle_since + 10
        while pool.size > 1 and loop.time() < deadline:
            if trickle:
                await query(pool, "select 1")  # never idle for max_idle, if lent in turns
            await asyncio.sleep(0.01)
            if first_closed is None and pool.size < grown:
                first_closed = loop.time() - idle_since
        shrunk = pool.size
        await pool.close()
        return grown, shrunk, first_closed

    grown, shrunk, first_closed = run("epoll", main)
    assert (grown, shrunk) == (3, 1)
    assert first_closed >= 0.3 - 0.05  # not before max_idle (less the moments the burst took to end)


def test_getconn_times_out_when_every_connection_stays_busy(dsn):
    async def main():
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=1)
        await pool.open()
        held = await pool.getconn()
        loop = asyncio.get_running_loop()
        with pytest.raises(QueryTimeout, match="became free"):
            await pool.getconn(loop.time() + 0.2)
        assert pool.waiting == 0  # the one that timed out waits no more
        cancelled = asyncio.ensure_future(pool.getconn(loop.time() + 10))
        await asyncio.sleep(0.05)
        assert pool.waiting == 1
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert pool.waiting == 0
        pool.putconn(held)
        again = await pool.getconn(loop.time() + 1)  # the pool is fine afterwards
        pool.putconn(again)
        stats = pool.get_stats()
        await pool.close()
        return stats

    stats = run("epoll", main)
    assert stats["requests_waiting"] == 0
    assert stats["pool_available"] == 1


def test_cancelled_waiter_does_not_lose_the_connection(dsn):
    async def main():
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=1)
        await pool.open()
        held = await pool.getconn()
        waiter = asyncio.ensure_future(pool.getconn())
        await asyncio.sleep(0.05)
        pool.putconn(held)  # handed to the waiter...
        waiter.cancel()  # ...which is cancelled before it could run
        with pytest.raises(asyncio.CancelledError):
            await waiter
        conn = await pool.getconn(asyncio.get_running_loop().time() + 1)
        pool.putconn(conn)
        stats = pool.get_stats()
        await pool.close()
        return stats

    stats = run("epoll", main)
    assert stats["pool_size"] == 1
    assert stats["pool_available"] == 1
    assert stats["connections"][0]["busy"] is False


def test_rejects_impossible_sizes(dsn):
    with pytest.raises(ValueError, match="min_size"):
        AsyncConnectionPool(dsn, min_size=5, max_size=2)
    with pytest.raises(ValueError, match="max_size"):
        AsyncConnectionPool(dsn, min_size=0, max_size=0)

