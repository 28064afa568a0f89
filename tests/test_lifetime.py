"""max_lifetime: a pooled connection older than it is retired, idle at once, busy when its job ends."""

import concurrent.futures

from psycopg2.extensions import make_dsn

from conftest import start_service, wait_until


def backends(admin, application_name):
    cur = admin.cursor()
    cur.execute("select pid from pg_stat_activity where application_name = %s", [application_name])
    return {pid for (pid,) in cur.fetchall()}


def test_an_idle_connection_past_its_lifetime_is_replaced(dsn, socket_path, admin):
    name = "lifetime-idle"
    svc = start_service(make_dsn(dsn, application_name=name), socket_path, min_size=1, max_size=1, max_lifetime=0.5)
    try:
        first = wait_until(lambda: backends(admin, name), message="the pool's connection")
        # No job at all: the pool replaces it by itself, keeping min_size open.
        wait_until(lambda: backends(admin, name).isdisjoint(first), message="the old backend to go")
        assert len(wait_until(lambda: backends(admin, name), message="a new backend in its place")) == 1
        with svc.client(timeout=10) as db:
            assert db.fetchval("select 'served'") == "served"
            assert db.status()["connections_expired"] >= 1
    finally:
        svc.stop()


def test_a_busy_connection_past_its_lifetime_ends_its_job_then_is_replaced(dsn, socket_path):
    svc = start_service(dsn, socket_path, min_size=1, max_size=1, max_lifetime=0.5)
    try:
        with svc.client(timeout=30) as db, concurrent.futures.ThreadPoolExecutor(2) as executor:
            long_job = executor.submit(db.fetchval, "select pg_backend_pid() from pg_sleep(1.0)")
            wait_until(lambda: db.status()["jobs_running"] == 1, message="the long job to run")
            # Queued behind it: the connection goes from one job straight to the
            # next, never idle, so only the check on its return can retire it.
            next_job = executor.submit(db.fetchval, "select pg_backend_pid()")
            wait_until(lambda: db.status()["requests_waiting"] == 1, message="the next job to wait")
            old, new = long_job.result(), next_job.result()
        assert old != new
    finally:
        svc.stop()
