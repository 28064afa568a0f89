"""A job the daemon itself fails on gets an InternalError; its connection and the client's other jobs go on."""

import asyncio
import os

import pytest

import dbservice
from conftest import start_service, wait_until

FAULTY_DAEMON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faulty_daemon")
FAULT_MARKER = "fault-marker-7f3a"
FAULTY_SQL = "select '%s'::text" % FAULT_MARKER  # the marker in its SQL, and in its result
LOCK = 7316001  # the advisory lock that holds the other job in flight


@pytest.fixture
def faulty_service(step, dsn, socket_path, monkeypatch):
    """A socket daemon that fails in *step* on the jobs carrying FAULT_MARKER (faulty_daemon/sitecustomize.py)."""
    monkeypatch.setenv("DBSERVICE_FAULT", step)
    monkeypatch.setenv("DBSERVICE_FAULT_MARKER", FAULT_MARKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (FAULTY_DAEMON, os.environ.get("PYTHONPATH")) if p))
    svc = start_service(dsn, socket_path, max_size=2)
    yield svc
    svc.stop()


@pytest.mark.parametrize("step", ["decode", "submit", "reply"])
def test_a_job_the_daemon_fails_on_gets_an_internal_error_and_the_connection_goes_on(step, faulty_service, admin):
    with faulty_service.client(timeout=30) as c:
        before = c.status()

    async def main():
        async with await dbservice.connect_async(faulty_service.socket, faulty_service.authkey) as db:
            in_flight = asyncio.ensure_future(
                db.fetchval("select 'in flight' from (select pg_advisory_xact_lock(%s)) held", [LOCK])
            )
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_until(
                lambda: lock_waiters(admin) == 1, message="the other job waiting on the lock"))
            with pytest.raises(dbservice.InternalError) as failed:
                await asyncio.wait_for(db.fetchval(FAULTY_SQL), 10)  # unanswered, it would fail here
            assert not in_flight.done()
            admin.cursor().execute("select pg_advisory_unlock(%s)", [LOCK])
            return failed.value, await in_flight, await db.fetchval("select 'next' || %s::text", ["!"])

    admin.cursor().execute("select pg_advisory_lock(%s)", [LOCK])
    error, other, after = asyncio.run(asyncio.wait_for(main(), 60))
    assert "dbservice internal error: RuntimeError: a fault injected in the %s step" % step in str(error)
    assert "report it with that log line" in str(error)
    assert other == "in flight"
    assert after == "next!"
    with faulty_service.client(timeout=30) as c:
        now = c.status()
    assert now["jobs_failed"] == before["jobs_failed"] + 1  # a reply failed on too: its client got an error
    assert now["jobs_done"] == before["jobs_done"] + 2  # the other job, and the next
    assert now["jobs_refused"] == before["jobs_refused"]


def lock_waiters(admin):
    cur = admin.cursor()
    cur.execute("select count(*) from pg_locks where locktype = 'advisory' and objid = %s and not granted", [LOCK])
    return cur.fetchone()[0]
