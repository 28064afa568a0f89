"""The asyncio client: many jobs in flight on one connection, cancellation."""

import asyncio
import os
import signal

import psycopg2.errors
import pytest

import dbservice
from conftest import active, start_service, wait_until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_many_jobs_in_flight_on_one_connection(socket_service):
    async def main():
        async with await dbservice.connect_async(socket_service.socket, socket_service.authkey) as db:
            values = await asyncio.gather(*[db.fetchval("select %s::int * 2", [i]) for i in range(300)])
            row = await db.fetchone("select %(a)s::text, %(b)s::int", {"a": "x", "b": 1})
            rows = await db.fetchall("select g from generate_series(1, 3) g")
            count = await db.execute("select 1 from generate_series(1, 4)")
            return values, row, rows, count

    values, row, rows, count = run(main())
    assert values == [i * 2 for i in range(300)]
    assert row == ("x", 1)
    assert rows == [(1,), (2,), (3,)]
    assert count == 4


def test_jobs_of_one_connection_run_concurrently(socket_service, admin):
    async def main():
        db = await dbservice.connect_async(socket_service.socket, socket_service.authkey)
        jobs = [asyncio.ensure_future(db.fetchval("select pg_sleep(2) /* marker-async-par */")) for _ in range(3)]
        loop = asyncio.get_running_loop()
        seen = await loop.run_in_executor(
            None, lambda: wait_until(lambda: active(admin, "marker-async-par") == 3, message="3 queries at once")
        )
        await asyncio.gather(*jobs)
        await db.close()
        return seen

    assert run(main())


def test_errors_arrive_as_their_classes(socket_service):
    async def main():
        async with await dbservice.connect_async(socket_service.socket, socket_service.authkey) as db:
            with pytest.raises(psycopg2.errors.DivisionByZero):
                await db.fetchval("select 1 / 0")
            with pytest.raises(dbservice.QueryTimeout):
                await db.fetchval("select pg_sleep(10)", timeout=0.3)
            with pytest.raises(dbservice.JobRefused):
                await db.fetchval("select %s", [object()])
            return await db.fetchval("select 'still fine'")

    assert run(main()) == "still fine"


def test_cancelling_the_task_cancels_the_query_on_the_server(socket_service, admin):
    async def main():
        db = await dbservice.connect_async(socket_service.socket, socket_service.authkey)
        task = asyncio.ensure_future(db.fetchval("select pg_sleep(30) /* marker-async-cancel */"))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, lambda: wait_until(lambda: active(admin, "marker-async-cancel") == 1, message="the query to run")
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await loop.run_in_executor(
            None, lambda: wait_until(lambda: active(admin, "marker-async-cancel") == 0, message="the query to stop")
        )
        value = await db.fetchval("select 5")
        await db.close()
        return value

    assert run(main()) == 5


def test_reconnects_after_the_daemon_restarts(dsn, socket_path):
    svc = dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=2).start()
    authkey = svc.authkey

    async def main():
        db = await dbservice.connect_async(socket_path, authkey)
        before = await db.fetchval("select 1")
        await asyncio.get_running_loop().run_in_executor(None, svc.stop)
        with pytest.raises(dbservice.ServiceUnavailable):
            await db.fetchval("select 2")
        again = dbservice.DBService(dsn, socket=socket_path, authkey=authkey, min_size=1, max_size=2)
        await asyncio.get_running_loop().run_in_executor(None, again.start)
        try:
            after = await db.fetchval("select 3")
        finally:
            await asyncio.get_running_loop().run_in_executor(None, again.stop)
        await db.close()
        return before, after

    assert run(main()) == (1, 3)


def test_sync_use_is_refused(socket_service):
    async def main():
        db = await dbservice.connect_async(socket_service.socket, socket_service.authkey)
        with pytest.raises(TypeError, match="async with"):
            with db:
                pass
        await db.close()

    run(main())


def test_every_job_in_flight_hears_when_the_daemon_is_killed(dsn, socket_path, admin):
    svc = start_service(dsn, socket_path, min_size=1, max_size=3)

    async def main():
        db = await dbservice.connect_async(svc.socket, svc.authkey)  # no timeout: nothing but the daemon ends them
        jobs = [asyncio.ensure_future(db.fetchval("select pg_sleep(30) /* marker-async-kill */")) for _ in range(3)]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, lambda: wait_until(lambda: active(admin, "marker-async-kill") == 3, message="the jobs to run")
        )
        svc.process.kill()
        outcomes = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 10)
        await db.close()
        return outcomes

    try:
        outcomes = run(main())
    finally:
        svc.process.join(10)
    assert [type(o) for o in outcomes] == [dbservice.ServiceUnavailable] * 3


def test_a_daemon_that_stops_answering_is_a_timeout_for_async_clients(dsn, socket_path, monkeypatch):
    """The asyncio client bounds its wait for a reply itself, as the sync one does."""
    monkeypatch.setattr(dbservice.async_client, "REPLY_GRACE", 0.3)
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc:

        async def main():
            async with await dbservice.connect_async(svc.socket, svc.authkey) as db:
                assert await db.fetchval("select 1") == 1
                os.kill(svc.process.pid, signal.SIGSTOP)
                try:
                    with pytest.raises(dbservice.QueryTimeout, match="no reply from the dbservice daemon within 0.5 s"):
                        await asyncio.wait_for(db.fetchval("select 2", timeout=0.2), 10)
                finally:
                    os.kill(svc.process.pid, signal.SIGCONT)
                return await db.fetchval("select 3")

        assert run(main()) == 3


def test_a_closed_async_client_runs_no_more_jobs(socket_service):
    async def main():
        db = await dbservice.connect_async(socket_service.socket, socket_service.authkey)
        assert await db.fetchval("select 1") == 1
        await db.close()
        with pytest.raises(dbservice.Error, match="closed"):
            await db.fetchval("select 2")

    run(main())


def _open_clients(svc):
    with svc.client(timeout=10) as c:
        return c.status()["socket_clients"] - 1  # not this one


def test_a_client_per_request_that_is_never_closed_leaves_nothing_behind(socket_service, caplog):
    """connect_async() per request, as the README once showed: 96 connections left, 1,906 warnings."""
    import gc

    async def handler(i):
        db = await dbservice.connect_async(socket_service.socket, socket_service.authkey, timeout=10)
        return await db.fetchval("select %s::int", [i])

    async def main():
        results = [await handler(i) for i in range(1000)]
        gc.collect()
        await asyncio.sleep(0)  # the collected clients' connections close on the loop
        return results

    before = _open_clients(socket_service)
    assert run(main()) == list(range(1000))
    wait_until(lambda: _open_clients(socket_service) == before, message="every connection to close")
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


def test_a_client_left_open_closes_with_its_loop(socket_service, caplog):
    async def request(i):
        db = await dbservice.connect_async(socket_service.socket, socket_service.authkey, timeout=10)
        return await db.fetchval("select %s::int", [i])  # never closed, still referenced by the caller

    before = _open_clients(socket_service)
    kept = [asyncio.run(request(i)) for i in range(20)]  # a loop per request, as some frameworks do
    assert kept == list(range(20))
    wait_until(lambda: _open_clients(socket_service) == before, message="every connection to close")
    assert not [r for r in caplog.records if r.levelname == "ERROR" and r.name == "asyncio"]


def test_the_client_is_an_async_context_manager(socket_service):
    async def main():
        async with dbservice.connect_async(socket_service.socket, socket_service.authkey) as db:
            value = await db.fetchval("select 'in'")
        with pytest.raises(dbservice.Error, match="closed"):
            await db.fetchval("select 1")
        return value

    assert run(main()) == "in"


def test_a_client_used_from_another_event_loop_fails_at_once_saying_so(socket_service):
    """Shared by two threads with a loop each, the other thread's jobs hung with no answer."""
    import threading

    async def connect():
        return await dbservice.connect_async(socket_service.socket, socket_service.authkey, timeout=10)

    loop = asyncio.new_event_loop()
    db = loop.run_until_complete(connect())
    outcome = []

    def other_thread():
        async def use():
            return await db.fetchval("select 1")

        try:
            outcome.append(asyncio.run(asyncio.wait_for(use(), 10)))
        except BaseException as exc:  # noqa: B902 - whatever it is, the test reports it
            outcome.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(30)
    try:
        assert isinstance(outcome[0], dbservice.Error) and "one client per event loop" in str(outcome[0])
        assert loop.run_until_complete(db.fetchval("select 'owner still served'")) == "owner still served"
    finally:
        loop.run_until_complete(db.close())
        loop.close()
