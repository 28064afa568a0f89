"""What ``status`` counts: every job once under its outcome, latencies, waits, connection errors.

Operators and the bench read these figures; each test runs jobs with known
outcomes on a daemon of its own and checks the figures it then reports.
"""

import asyncio
import concurrent.futures
import pickle

import psycopg2.errors
import pytest

import dbservice
from conftest import held_jobs, start_service, wait_until
from dbservice import jobs, wire
from dbservice.jobs import BEGIN, Job
from test_security import raw_connect


def _outcomes(figures):
    return {name: figures[name] for name in ("jobs_done", "jobs_failed", "jobs_timed_out")}


def test_each_job_is_counted_once_under_its_outcome(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client(timeout=30) as db:
        assert _outcomes(db.status()) == {"jobs_done": 0, "jobs_failed": 0, "jobs_timed_out": 0}
        assert [db.fetchval("select %s::int", [i]) for i in range(3)] == [0, 1, 2]
        with pytest.raises(psycopg2.errors.DivisionByZero):
            db.fetchval("select 1 / 0")
        with pytest.raises(psycopg2.errors.SyntaxError):
            db.fetchall("selec 1")
        with pytest.raises(dbservice.QueryTimeout):
            db.fetchval("select pg_sleep(30)", timeout=0.2)
        with held_jobs(admin, db):  # one more done, once the block ends
            with pytest.raises(dbservice.QueryTimeout, match="became free"):
                db.fetchval("select 1", timeout=0.2)  # timed out in the queue
        figures = db.status()
    assert _outcomes(figures) == {"jobs_done": 4, "jobs_failed": 2, "jobs_timed_out": 2}
    assert figures["latency_ms"]["window"] == 8


def test_latency_percentiles_are_nearest_rank(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client(timeout=30) as db:
        db.fetchval("select pg_sleep(1)")
        for i in range(49):
            db.fetchval("select %s::int", [i])
        latency = db.status()["latency_ms"]
    assert latency["window"] == 50
    # Of 50 jobs the p99 is the 50th fastest (the one slow job), the p95 the 48th.
    assert latency["p99"] >= 1000.0
    assert latency["p50"] <= latency["p95"] < 1000.0


def test_latencies_are_those_of_the_last_4096_jobs(socket_service):
    async def main():
        async with await dbservice.connect_async(socket_service.socket, socket_service.authkey) as db:
            for start in range(0, 4200, 600):
                await asyncio.gather(*[db.fetchval("select %s::int", [i]) for i in range(start, start + 600)])

    asyncio.run(asyncio.wait_for(main(), 60))
    with socket_service.client(timeout=10) as db:
        figures = db.status()
    assert figures["jobs_done"] >= 4200
    assert figures["latency_ms"]["window"] == 4096


def test_failed_connection_attempts_are_counted_with_their_cause(socket_path):
    dsn = "host=127.0.0.1 port=1 dbname=nowhere user=nobody connect_timeout=1"
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client() as db:
        # the first attempt and at least one retry (after 0.1 s, then 0.2 s: the backoff)
        figures = wait_until(lambda: _status_when(db, lambda f: f["connections_errors"] >= 2), message="a retry")
    assert figures["database_reachable"] is False
    assert "Connection refused" in figures["last_error"]
    assert figures["pool_size"] == 0 and figures["connections_num"] == 0


def _status_when(db, condition):
    """``db.status()`` if *condition* holds for it, else None: a condition to wait until."""
    figures = db.status()
    return figures if condition(figures) else None


def test_a_job_answered_while_it_queued_leaves_the_queue(dsn, socket_path, admin):
    """Counted out of the queue once answered, or status, and a graceful stop, wait for it for ever."""
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client(timeout=30) as db:
        assert db.status()["requests_waits"] == 0
        with held_jobs(admin, db):
            with pytest.raises(dbservice.QueryTimeout, match="became free"):
                db.fetchval("select 1", timeout=0.2)  # answered by its timeout
            asyncio.run(_cancel_while_queued(svc, db))  # answered by its cancel
            wait_until(lambda: db.status()["queue_depth"] == 0, message="the queue to be empty")
            assert db.status()["requests_waits"] >= 1  # the dispatcher waited for the held connection
        figures = db.status()
    assert (figures["queue_depth"], figures["jobs_running"]) == (0, 0)


async def _cancel_while_queued(svc, db):
    loop = asyncio.get_running_loop()
    async with await dbservice.connect_async(svc.socket, svc.authkey) as adb:
        job = asyncio.ensure_future(adb.fetchval("select 2"))
        await loop.run_in_executor(
            None, lambda: wait_until(lambda: db.status()["queue_depth"] == 1, message="the job to queue")
        )
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job


def test_the_pool_keeps_min_size_open_and_at_once_replaces_one_the_server_ends(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=2, max_size=4) as svc, svc.client(timeout=30) as db:
        # The job lasts long enough for a surplus connection to open, were one to.
        pid = db.fetchval("select pg_backend_pid() from pg_sleep(0.2)")
        figures = db.status()
        assert (figures["pool_size"], figures["connections_num"]) == (2, 2)  # min_size, and no more
        admin.cursor().execute("select pg_terminate_backend(%s)", [pid])  # idle now: no job notices
        replaced = lambda f: (f["connections_lost"], f["pool_size"], f["connections_num"]) == (1, 2, 3)  # noqa: E731
        wait_until(lambda: _status_when(db, replaced), timeout=5, message="the pool to replace the lost connection")
        assert db.fetchval("select pg_backend_pid()") != pid


def test_cancelled_refused_and_busy_jobs_are_each_counted_once_as_failed(dsn, socket_path, admin):
    """Answered without running to its end, a job is still counted: else status hides load it turned away."""
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_queue=1) as svc, svc.client(timeout=30) as db:
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            with held_jobs(admin, db):  # one job done, once the block ends
                asyncio.run(_cancel_while_queued(svc, db))  # cancelled in the queue
                queued = executor.submit(db.fetchval, "select 'queued'")  # one more done
                wait_until(lambda: db.status()["queue_depth"] == 1, message="the queue to fill")
                with pytest.raises(dbservice.ServiceBusy):
                    db.fetchval("select 'no room'")  # busy
            assert queued.result(timeout=30) == "queued"
        _begin_twice(svc)  # one BEGIN done, the second refused, the rollback done
        with pytest.raises(dbservice.JobRefused, match="contains itself"):
            cyclic = []
            cyclic.append(cyclic)
            db.fetchval("select %s", [cyclic])  # refused as it is decoded
        figures = db.status()
    assert _outcomes(figures) == {"jobs_done": 4, "jobs_failed": 4, "jobs_timed_out": 0}


def _begin_twice(svc):
    sock = raw_connect(svc.socket)
    try:
        wire.client_handshake(sock, svc.authkey)
        for job_id in (1, 2):
            sock.sendall(wire.encode_frame(job_id, wire.MSG_JOB, jobs.dumps_job(Job("", {}, BEGIN, None, 7))))
        replies = sorted(wire.recv_frame(sock) for _ in range(2))  # the refusal comes at once
        assert [kind for _, kind, _ in replies] == [wire.MSG_RESULT, wire.MSG_ERROR]
        assert "already open" in str(pickle.loads(replies[1][2]))
        sock.sendall(wire.encode_frame(3, wire.MSG_JOB, jobs.dumps_job(Job("", None, "rollback", None, 7))))
        assert wire.recv_frame(sock)[:2] == (3, wire.MSG_RESULT)
    finally:
        sock.close()
