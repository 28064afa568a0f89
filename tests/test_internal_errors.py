"""A job the daemon itself fails on gets an InternalError; its connection and the client's other jobs go on."""

import asyncio
import os
import pickle

import pytest

import dbservice
from conftest import start_service, wait_until
from dbservice import wire
from dbservice.jobs import FETCH_VALUE, Job, dumps_job
from test_security import raw_connect

FAULTY_DAEMON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faulty_daemon")
FAULT_MARKER = "fault-marker-7f3a"
FAULTY_SQL = "select '%s'::text" % FAULT_MARKER  # the marker in its SQL, and in its result
LOCK = 7316001  # the advisory lock that holds the other job in flight
#: The frames that ask for a reply, each with the job id it is answered under (wire.py).
ANSWERED_KINDS = {
    "job": wire.MSG_JOB, "status": wire.MSG_STATUS, "pause": wire.MSG_PAUSE, "resume": wire.MSG_RESUME,
    "COPY": wire.MSG_COPY, "LISTEN": wire.MSG_LISTEN, "handover": wire.MSG_HANDOVER,
}


@pytest.fixture
def faulty_service(step, dsn, socket_path, monkeypatch):
    """A socket daemon that fails in *step* on the jobs carrying FAULT_MARKER (faulty_daemon/sitecustomize.py)."""
    svc = _faulty(step, monkeypatch, dsn, socket_path)
    yield svc
    svc.stop()


@pytest.fixture
def faulty_queue_service(step, dsn, monkeypatch):
    """The same, serving intake (a): the app's own processes, on its job queue."""
    svc = _faulty(step, monkeypatch, dsn)
    yield svc
    svc.stop()


def _faulty(step, monkeypatch, dsn, socket=None):
    monkeypatch.setenv("DBSERVICE_FAULT", step)
    monkeypatch.setenv("DBSERVICE_FAULT_MARKER", FAULT_MARKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (FAULTY_DAEMON, os.environ.get("PYTHONPATH")) if p))
    return start_service(dsn, socket, max_size=2)


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


@pytest.mark.parametrize("step", ["decode", "handle", "reply"])
def test_a_queued_job_the_daemon_fails_on_gets_an_internal_error(step, faulty_queue_service):
    """A well-formed job our own code raises on, decoding it, handling its frame or encoding its reply: our bug."""
    client = faulty_queue_service.client(timeout=10)
    before = client.status()
    with pytest.raises(dbservice.InternalError, match="RuntimeError: a fault injected in the %s step" % step):
        client.fetchval(FAULTY_SQL)
    assert client.fetchval("select 'next'") == "next"
    now = client.status()
    assert now["jobs_failed"] == before["jobs_failed"] + 1
    assert now["jobs_refused"] == before["jobs_refused"]
    assert now["jobs_done"] == before["jobs_done"] + 1


@pytest.mark.parametrize("step", ["handle"])
def test_each_request_the_daemon_fails_on_gets_an_internal_error_and_the_connection_goes_on(step, faulty_service):
    sock = raw_connect(faulty_service.socket)
    wire.client_handshake(sock, faulty_service.authkey)
    before = _status(sock, 1)
    for request_id, (name, kind) in enumerate(ANSWERED_KINDS.items(), 10):
        sock.sendall(wire.encode_frame(request_id, kind, FAULT_MARKER.encode()))
        sock.sendall(wire.encode_frame(request_id + 100, wire.MSG_STATUS, b""))
        (failed_id, failed, error), (next_id, answered, _) = _replies(sock, 2)
        assert (failed_id, failed, next_id, answered) == (request_id, wire.MSG_ERROR, request_id + 100,
                                                           wire.MSG_RESULT), name
        assert isinstance(error, dbservice.InternalError), name
        assert "RuntimeError: a fault injected in the handle step" in str(error), name
    figures = _status(sock, 2)
    # the job and the COPY are jobs, counted; the other requests are not
    assert figures["jobs_failed"] == before["jobs_failed"] + 2
    assert figures["jobs_done"] == before["jobs_done"]
    sock.close()


@pytest.mark.parametrize("step", ["handle"])
def test_a_frame_of_no_reply_the_daemon_fails_on_ends_the_job_it_is_for(step, faulty_service, admin):
    """A CANCEL of a job in flight (or its COPY's data): that job's reply is the InternalError; an UNLISTEN: none."""
    marked = FAULT_MARKER.encode()
    sock = raw_connect(faulty_service.socket)
    wire.client_handshake(sock, faulty_service.authkey)
    sock.sendall(wire.encode_frame(1, wire.MSG_UNLISTEN, marked))
    before = _status(sock, 2)
    assert before["socket_clients"] == 1  # its reply came first: the UNLISTEN got none
    admin.cursor().execute("select pg_advisory_lock(%s)", [LOCK])
    try:
        held = Job("select 'held' from (select pg_advisory_xact_lock(%s)) held", [LOCK], FETCH_VALUE)
        sock.sendall(wire.encode_frame(3, wire.MSG_JOB, dumps_job(held)))
        wait_until(lambda: lock_waiters(admin) == 1, message="the job waiting on the lock")
        sock.sendall(wire.encode_frame(3, wire.MSG_CANCEL, marked))
        [(job_id, kind, error)] = _replies(sock, 1)
    finally:
        admin.cursor().execute("select pg_advisory_unlock(%s)", [LOCK])
    assert (job_id, kind) == (3, wire.MSG_ERROR)
    assert isinstance(error, dbservice.InternalError)
    assert "a fault injected in the handle step" in str(error)
    sock.sendall(wire.encode_frame(4, wire.MSG_JOB, dumps_job(Job("select 'next'", None, FETCH_VALUE))))
    assert _replies(sock, 1) == [(4, wire.MSG_RESULT, "next")]
    figures = _status(sock, 5)
    assert (figures["jobs_failed"], figures["jobs_done"]) == (before["jobs_failed"] + 1, before["jobs_done"] + 1)
    sock.close()


@pytest.mark.parametrize("step", ["handled"])
def test_a_request_answered_before_the_daemon_failed_on_it_gets_no_second_reply(step, faulty_service):
    sock = raw_connect(faulty_service.socket)
    wire.client_handshake(sock, faulty_service.authkey)
    sock.sendall(wire.encode_frame(1, wire.MSG_STATUS, FAULT_MARKER.encode()))  # answered, then failed on
    sock.sendall(wire.encode_frame(2, wire.MSG_STATUS, b""))
    assert [reply[:2] for reply in _replies(sock, 2)] == [(1, wire.MSG_RESULT), (2, wire.MSG_RESULT)]
    sock.close()


@pytest.mark.parametrize("step", ["handled"])
def test_a_request_to_be_answered_later_the_daemon_failed_on_gets_one_reply(step, faulty_service):
    """A LISTEN, answered once the daemon listens: failed on after it was taken in, one reply all the same."""
    sock = raw_connect(faulty_service.socket)
    wire.client_handshake(sock, faulty_service.authkey)
    sock.sendall(wire.encode_frame(1, wire.MSG_LISTEN, pickle.dumps([FAULT_MARKER])))
    [(job_id, kind, error)] = _replies(sock, 1)
    assert (job_id, kind) == (1, wire.MSG_ERROR) and isinstance(error, dbservice.InternalError)
    # Subscriptions are answered in the order they came: a second answer to the first would come before this one's.
    sock.sendall(wire.encode_frame(2, wire.MSG_LISTEN, pickle.dumps(["after-the-fault"])))
    assert [reply[:2] for reply in _replies(sock, 1)] == [(2, wire.MSG_RESULT)]
    sock.close()


def _status(sock, request_id):
    """The daemon's figures, asked for on the raw connection *sock*, whose next reply must be theirs."""
    sock.sendall(wire.encode_frame(request_id, wire.MSG_STATUS, b""))
    [(job_id, kind, figures)] = _replies(sock, 1)
    assert (job_id, kind) == (request_id, wire.MSG_RESULT), figures
    return figures


def _replies(sock, count):
    """The next *count* replies on the raw connection *sock*: ``[(job id, kind, value), ...]``."""
    return [(job_id, kind, pickle.loads(body)) for job_id, kind, body in (wire.recv_frame(sock) for _ in range(count))]


def lock_waiters(admin):
    cur = admin.cursor()
    cur.execute("select count(*) from pg_locks where locktype = 'advisory' and objid = %s and not granted", [LOCK])
    return cur.fetchone()[0]
