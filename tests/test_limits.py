"""Load limits: a bounded queue, a bounded number of clients, a bounded result."""

import asyncio
import concurrent.futures
import threading
import time

import pytest

import dbservice
from conftest import active, held_jobs, start_service, wait_until


def test_full_queue_makes_jobs_wait_then_refuses_them_as_busy(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_queue=2) as svc, svc.client() as c:
        with concurrent.futures.ThreadPoolExecutor(6) as executor:
            hold = executor.submit(c.fetchval, "select pg_sleep(3) /* marker-hold-queue */", timeout=30)
            wait_until(lambda: active(admin, "marker-hold-queue") == 1, message="the connection to be held")
            queued = [executor.submit(c.fetchval, "select %s::int", [i], timeout=30) for i in range(2)]
            wait_until(lambda: c.status()["queue_depth"] == 2, message="the queue to fill")
            # the queue is full: this one waits for room, as long as its timeout...
            waiting = executor.submit(c.fetchval, "select 'got in'", timeout=30)
            wait_until(lambda: c.status()["queue_depth"] == 3, message="a job to wait for room")
            # ...and this one gives up when its timeout passes
            started = time.monotonic()
            with pytest.raises(dbservice.ServiceBusy, match="max_queue"):
                c.fetchval("select 'too late'", timeout=0.5)
            assert time.monotonic() - started < 5
            assert hold.result(timeout=30) is not None
            assert [q.result(timeout=30) for q in queued] == [0, 1]
            assert waiting.result(timeout=30) == "got in"  # it got room before its timeout


def test_overflow_beyond_twice_max_queue_is_refused_at_once(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_queue=1) as svc, svc.client() as c:
        with concurrent.futures.ThreadPoolExecutor(4) as executor:
            hold = executor.submit(c.fetchval, "select pg_sleep(2) /* marker-overflow */", timeout=30)
            wait_until(lambda: active(admin, "marker-overflow") == 1, message="the connection to be held")
            others = [executor.submit(c.fetchval, "select 1", timeout=30) for _ in range(2)]
            wait_until(lambda: c.status()["queue_depth"] == 2, message="queue and overflow to fill")
            started = time.monotonic()
            with pytest.raises(dbservice.ServiceBusy):
                c.fetchval("select 1", timeout=30)
            assert time.monotonic() - started < 2  # not after its 30 s timeout
            hold.result(timeout=30)
            assert [o.result(timeout=30) for o in others] == [1, 1]


def test_a_job_that_waited_for_room_in_the_queue_times_out_as_any_other(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_queue=1) as svc, svc.client() as c:
        with concurrent.futures.ThreadPoolExecutor(2) as executor:
            with held_jobs(admin, c):
                queued = executor.submit(c.fetchval, "select 1", timeout=30)
                wait_until(lambda: c.status()["queue_depth"] == 1, message="the queue to fill")
                late = executor.submit(c.fetchval, "select pg_sleep(30) /* marker-room-late */", timeout=3)
                wait_until(lambda: c.status()["queue_depth"] == 2, message="a job to wait for room")
            # it gets room, runs, and at its timeout is cancelled on the server like any job
            with pytest.raises(dbservice.QueryTimeout):
                late.result(timeout=30)
            wait_until(lambda: active(admin, "marker-room-late") == 0, message="the query to be cancelled")
            assert queued.result(timeout=30) == 1


@pytest.mark.xfail(
    strict=True,
    reason="a job answered while it waited for room (refused as busy, or cancelled) stays in the server's "
    "overflow until the queue moves: queue_depth counts it, and the next job is refused at once, the "
    "overflow taken for full",
)
def test_a_job_answered_while_it_waited_for_room_makes_room_for_the_next(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_queue=1) as svc, svc.client(timeout=30) as c:
        with concurrent.futures.ThreadPoolExecutor(2) as executor:
            with held_jobs(admin, c):
                queued = executor.submit(c.fetchval, "select 'queued'")
                wait_until(lambda: c.status()["queue_depth"] == 1, message="the queue to fill")
                with pytest.raises(dbservice.ServiceBusy):
                    c.fetchval("select 'no room'", timeout=0.3)  # waited for room, in vain
                assert c.status()["queue_depth"] == 1  # only the queued job waits now
                waiting = executor.submit(c.fetchval, "select 'got in'")
                wait_until(lambda: c.status()["queue_depth"] == 2, message="the next job to wait for room")
            assert (queued.result(timeout=30), waiting.result(timeout=30)) == ("queued", "got in")


def test_clients_beyond_max_clients_are_refused_with_a_message(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_clients=3) as svc:
        clients = [svc.client() for _ in range(3)]
        with pytest.raises(dbservice.ServiceBusy, match="max_clients"):
            svc.client()
        with pytest.raises(dbservice.ServiceBusy, match="max_clients"):
            asyncio.run(dbservice.connect_async(svc.socket, svc.authkey))
        clients.pop().close()
        again = wait_until(lambda: _try_connect(svc), message="a place to free up")
        assert again.fetchval("select 1") == 1
        for c in clients + [again]:
            c.close()


def _try_connect(svc):
    try:
        return svc.client()
    except dbservice.ServiceBusy:
        return None


@pytest.mark.parametrize("intake", ["socket", "queue"])
def test_a_result_over_max_result_bytes_is_an_error_for_that_job(dsn, socket_path, intake):
    path = socket_path if intake == "socket" else None
    with start_service(dsn, path, min_size=1, max_size=1, max_result_bytes=100_000) as svc:
        c = svc.client(timeout=30)
        with pytest.raises(dbservice.ResultTooLarge, match="max_result_bytes"):
            c.fetchall("select repeat('x', 1000) from generate_series(1, 1000)")
        assert len(c.fetchall("select repeat('x', 1000) from generate_series(1, 10)")) == 10
        if intake == "socket":  # the way to fetch that many rows
            rows = c.iterate("select repeat('x', 1000) from generate_series(1, 1000)", batch=50)
            assert sum(1 for _ in rows) == 1000
        c.close()


def test_a_burst_of_clients_connecting_at_once_all_get_in(socket_service):
    """More clients connect together than a default listen backlog (100) holds."""
    barrier = threading.Barrier(300)
    errors = []

    def one(i):
        barrier.wait()
        try:
            with dbservice.connect(socket=socket_service.socket, authkey=socket_service.authkey) as db:
                assert db.fetchval("select %s::int", [i]) == i
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
