"""The service end to end: dispatch, timeouts, errors, every event loop, stopping."""

import concurrent.futures
import os
import threading

import psycopg2.errors
import pytest

import dbservice
from conftest import active, held_jobs, start_service, wait_until


def test_a_slow_job_does_not_hold_up_the_others(client):
    """Fast jobs finish while a slow one still runs: one slow query holds one connection and nothing else."""
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        slow = executor.submit(client.fetchval, "select pg_sleep(2)::text || 'slow'")
        fast = [client.fetchval("select %s::int", [i]) for i in range(20)]
        assert not slow.done()
        assert fast == list(range(20))
        assert slow.result(timeout=30) == "slow"


@pytest.mark.parametrize("selector", ["epoll", "select", "uvloop", "auto"])
def test_every_event_loop_serves_concurrent_jobs(dsn, socket_path, selector):
    with start_service(dsn, socket_path, max_size=3, selector=selector) as svc, svc.client(timeout=30) as c:
        with concurrent.futures.ThreadPoolExecutor(8) as executor:
            results = list(executor.map(lambda i: c.fetchval("select %s::int * 3", [i]), range(200)))
        running = c.status()["event_loop"]
    assert results == [i * 3 for i in range(200)]
    assert running == ("uvloop" if selector == "auto" else selector)  # the test extra installs uvloop


def test_timed_out_query_is_cancelled_on_the_server_and_its_connection_reused(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client() as c:
        pid = c.fetchval("select pg_backend_pid()")
        with pytest.raises(dbservice.QueryTimeout):
            c.fetchval("select pg_sleep(30) /* marker-timeout */", timeout=0.5)
        # cancelled, not left running: its backend went back to idle
        wait_until(lambda: _idle(admin, pid), message="the cancelled backend to be idle")
        assert active(admin, "marker-timeout") == 0
        # the same (only) connection serves the next job, with no leftover
        assert c.fetchval("select pg_backend_pid()") == pid
        assert c.fetchval("select 41 + 1") == 42


def _idle(admin, pid):
    cur = admin.cursor()
    cur.execute("select state from pg_stat_activity where pid = %s", [pid])
    row = cur.fetchone()
    return row is not None and row[0] == "idle"


def test_job_waiting_in_the_queue_times_out_with_a_clear_error(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client(timeout=30) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            slow = executor.submit(c.fetchval, "select pg_sleep(1.5) /* marker-hold */")
            wait_until(lambda: active(admin, "marker-hold"), message="the slow job to start")
            with pytest.raises(dbservice.QueryTimeout, match="became free"):
                c.fetchval("select 1", timeout=0.3)
            slow.result(timeout=30)
        assert c.fetchval("select 2") == 2


def test_unreachable_database_gives_service_unavailable(socket_path):
    dsn = "host=127.0.0.1 port=1 dbname=nowhere user=nobody connect_timeout=1"
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client() as c:
        with pytest.raises(dbservice.ServiceUnavailable, match="unreachable"):
            c.fetchval("select 1", timeout=1.0)


def test_no_daemon_is_service_unavailable(tmp_path):
    os.chmod(tmp_path, 0o700)
    with pytest.raises(dbservice.ServiceUnavailable, match="dbserviced start"):
        dbservice.connect(socket=str(tmp_path / "none.sock"), authkey=b"k")


def test_graceful_stop_lets_running_jobs_finish(dsn, socket_path, admin):
    svc = start_service(dsn, socket_path, max_size=4)
    c = svc.client(timeout=30)
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        sql = "select pg_sleep(1)::text || %s /* marker-stop */"
        jobs = [executor.submit(c.fetchval, sql, [str(i)]) for i in range(4)]
        wait_until(lambda: active(admin, "marker-stop") == 4, message="all jobs to run")
        stopper = threading.Thread(target=svc.stop)
        stopper.start()
        results = [j.result(timeout=30) for j in jobs]
        stopper.join(30)
    assert sorted(results) == [str(i) for i in range(4)]


def test_a_stopping_daemon_takes_no_new_job(dsn, socket_path, admin):
    svc = start_service(dsn, socket_path, max_size=2)
    c = svc.client(timeout=30)
    assert c.fetchval("select 1") == 1  # this thread's connection to the daemon stays open
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        with held_jobs(admin, c):  # a job it took before: it finishes, once the block ends
            stopping = executor.submit(svc.stop)
            wait_until(lambda: not os.path.exists(svc.socket), message="the daemon to stop listening")
            with pytest.raises(dbservice.ServiceUnavailable, match="stopping"):
                c.fetchval("select 2")
        stopping.result(timeout=60)


@pytest.mark.parametrize("intake", ["socket", "queue"])
def test_every_waiting_client_hears_when_the_service_is_killed(dsn, socket_path, admin, intake):
    svc = start_service(dsn, socket_path if intake == "socket" else None, min_size=1, max_size=3)
    c = svc.client()
    with concurrent.futures.ThreadPoolExecutor(3) as executor:
        marker = "marker-kill-" + intake  # the other intake's queries may still run on the server
        jobs = [executor.submit(c.fetchval, "select pg_sleep(30) /* %s */" % marker) for _ in range(3)]
        wait_until(lambda: active(admin, marker) == 3, message="jobs to run")
        svc.process.kill()
        for job in jobs:
            with pytest.raises(dbservice.ServiceUnavailable):
                job.result(timeout=10)


def test_threads_that_end_leave_no_connection_behind(socket_service):
    """One thread per request (a dev server, a task runner) must not leak a socket each."""
    with socket_service.client(timeout=10) as c:
        c.fetchval("select 1")
        before = len(os.listdir("/proc/self/fd"))
        for i in range(100):
            thread = threading.Thread(target=c.fetchval, args=("select %s::int", [i]))
            thread.start()
            thread.join()
        assert len(c._channels) <= 2
        assert len(os.listdir("/proc/self/fd")) <= before + 2
        wait_until(lambda: c.status()["socket_clients"] <= 3, message="the daemon to see them hang up")


def test_statement_timeout_on_the_server_is_a_query_timeout_too(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client(timeout=30) as c:
        pid = c.fetchval("select pg_backend_pid()")
        with pytest.raises(dbservice.QueryTimeout) as info:
            c.fetchval("set local statement_timeout = '100ms'; select pg_sleep(10)")
        assert isinstance(info.value, psycopg2.errors.QueryCanceled)
        assert info.value.pgcode == "57014"
        # the same connection serves the next job, without the setting
        assert c.fetchval("select pg_backend_pid()") == pid
        assert c.fetchval("show statement_timeout") == "0"


def test_a_fast_stop_cancels_running_queries_on_the_server(dsn, socket_path, admin):
    """Told the job did not end, a client must be able to trust that it did not commit."""
    admin.cursor().execute("drop table if exists stop_writes; create table stop_writes (n int)")
    svc = start_service(dsn, socket_path, max_size=2)
    c = svc.client(timeout=30)
    sql = "insert into stop_writes select %s from pg_sleep(2) /* marker-fast-stop */"
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        jobs = [
            executor.submit(c.execute, sql, [1]),  # one statement: runs by callbacks
            executor.submit(c.executemany, sql, [[2]]),  # runs in a task
        ]
        wait_until(lambda: active(admin, "marker-fast-stop") == 2, message="both jobs to run")
        svc.stop(force=True)
        for job in jobs:
            with pytest.raises(dbservice.ServiceUnavailable, match="stopped before the job"):
                job.result(timeout=10)
    # Had they run on, they would now commit before leaving pg_stat_activity.
    wait_until(lambda: active(admin, "marker-fast-stop") == 0, message="the queries to end")
    cur = admin.cursor()
    cur.execute("select count(*) from stop_writes")
    assert cur.fetchone()[0] == 0


def test_a_statement_timeout_inside_the_jobs_own_begin_is_a_statement_timeout(client):
    with pytest.raises(dbservice.StatementTimeout):
        client.fetchval("begin; set local statement_timeout = '50ms'; select pg_sleep(5)")
    assert client.fetchval("select 7") == 7


def test_a_connection_ended_after_a_timeout_is_replaced_before_a_job_gets_it(dsn, socket_path, admin):
    """The cancelled query's error arrives while nobody waits; the socket must stay watched."""
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client(timeout=30) as c:
        for lost in (1, 2, 3):
            pid = c.fetchval("select pg_backend_pid()")
            with pytest.raises(dbservice.QueryTimeout):
                c.fetchval("select pg_sleep(30)", timeout=0.2)
            wait_until(lambda: _idle(admin, pid), message="the cancelled backend to be idle")
            admin.cursor().execute("select pg_terminate_backend(%s)", [pid])
            wait_until(lambda: c.status()["connections_lost"] == lost, message="the pool to notice")
            assert c.fetchval("select 1") == 1


def test_a_closed_client_runs_no_more_jobs(socket_service):
    c = socket_service.client(timeout=10)
    assert c.fetchval("select 1") == 1
    c.close()
    with pytest.raises(dbservice.Error, match="closed"):
        c.fetchval("select 2")
