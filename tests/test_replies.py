"""Every job gets exactly one reply, whatever happens to it: cancels, timeouts and garbage in one read."""

import collections
import pickle

import psycopg2

import dbservice
from dbservice import jobs, wire
from test_security import raw_connect

KINDS = [
    (jobs.Job("select %s::int", [1], "value"), int),
    (jobs.Job("select 1/0", None, "value"), psycopg2.errors.DivisionByZero),
    (jobs.Job("selec", None, "all"), psycopg2.errors.SyntaxError),
    (jobs.Job("select %s, %s", [1], "all"), dbservice.JobRefused),
    (jobs.Job("select pg_sleep(5)", None, "value", 0.05), dbservice.QueryTimeout),
    (jobs.Job("select %s::text", ["x"], "one"), tuple),
]


def test_pipelined_jobs_each_get_one_reply(socket_service):
    sock = raw_connect(socket_service.socket)
    wire.client_handshake(sock, socket_service.authkey)
    sent = {}
    for job_id in range(1, 61):
        job, expected = KINDS[job_id % len(KINDS)]
        sent[job_id] = expected
        sock.sendall(wire.encode_frame(job_id, wire.MSG_JOB, jobs.dumps_job(job)))
    sock.sendall(wire.encode_frame(99, wire.MSG_JOB, b"not a pickle"))
    sent[99] = dbservice.JobRefused
    sock.sendall(wire.encode_frame(100, 42, b""))
    sent[100] = dbservice.JobRefused

    replies = collections.Counter()
    while sum(replies.values()) < len(sent):
        job_id, kind, body = wire.recv_frame(sock)
        replies[job_id] += 1
        value = pickle.loads(body)
        assert isinstance(value, sent[job_id]), (job_id, value)
        assert (kind == wire.MSG_ERROR) == isinstance(value, Exception)
    assert replies == collections.Counter(sent.keys())
    sock.settimeout(0.3)
    try:
        extra = sock.recv(1)
    except OSError:
        extra = None
    assert extra is None  # nothing more: no second reply for anyone
    sock.close()


CANCELLED_KINDS = [
    jobs.Job("select pg_sleep(5)", None, "value"),  # one statement: runs by callbacks
    jobs.Job("select pg_sleep(%s)", [[5]], "many"),  # runs in a task
    jobs.Job("select %s::int", [1], "value"),
]


def test_a_job_cancelled_in_the_same_read_still_gets_one_reply(socket_service):
    """A cancel can arrive before the job's task took its first step, or its statement was sent."""
    sock = raw_connect(socket_service.socket)
    wire.client_handshake(sock, socket_service.authkey)
    count = 12  # three times the pool: some run, some queue
    for job_id in range(1, count + 1):
        job = CANCELLED_KINDS[job_id % len(CANCELLED_KINDS)]
        cancel = wire.encode_frame(job_id, wire.MSG_CANCEL, b"")
        sock.sendall(wire.encode_frame(job_id, wire.MSG_JOB, jobs.dumps_job(job)) + cancel)
    sock.settimeout(4.0)  # less than the sleeps: they must be cancelled, not waited for
    replies = collections.Counter()
    while sum(replies.values()) < count:
        job_id, kind, body = wire.recv_frame(sock)
        replies[job_id] += 1
        value = pickle.loads(body)
        if "pg_sleep" in CANCELLED_KINDS[job_id % len(CANCELLED_KINDS)].sql:
            assert isinstance(value, dbservice.JobCancelled), (job_id, value)
    assert replies == collections.Counter(range(1, count + 1))
    sock.close()
    with dbservice.connect(socket_service.socket, socket_service.authkey) as client:
        assert client.fetchval("select 1") == 1
