"""Intake (a) against real client processes that stop, die, read slowly, fork and end threads."""

import concurrent.futures
import hashlib
import multiprocessing
import os
import pickle
import signal
import threading

import pytest

import dbservice
from conftest import active, start_service, wait_until
from dbservice.jobs import FETCH_VALUE, Job, dumps_job
from dbservice.queue_wire import channel_path, job_frames
from dbservice.wire import MSG_JOB

#: Seconds the other processes' jobs may take while one client process is stopped.
DEADLINE = 10.0
#: Bytes of a result too large for the kernel's pipe buffer (64 KiB): the rest waits in the daemon.
LARGE_RESULT = 1024 * 1024
#: Bytes of a job parameter sent in many parts.
LARGE_JOB = 4 * 1024 * 1024


@pytest.fixture
def queue_service(dsn):
    svc = start_service(dsn, max_size=6, unread_reply_timeout=1.0)
    yield svc
    svc.stop()


class Victim:
    """A client process forked from the test, running *jobs* (callables taking the client) on threads."""

    def __init__(self, client, *jobs):
        ctx = multiprocessing.get_context("fork")
        self.results = ctx.Queue()
        self.done = ctx.Value("i", 0)
        self.process = ctx.Process(target=self._main, args=(client, jobs))
        self.process.start()

    def _main(self, client, jobs):
        outcomes = [None] * len(jobs)

        def run(i, job):
            try:
                outcomes[i] = ("ok", job(client, self.done))
            except dbservice.Error as exc:
                outcomes[i] = (type(exc).__name__, str(exc))
            except BaseException as exc:
                outcomes[i] = ("unexpected", repr(exc))

        threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.results.put(outcomes)

    def stop(self):
        os.kill(self.process.pid, signal.SIGSTOP)
        wait_until(lambda: _state(self.process.pid) == "T", message="the client process to stop")

    def resume(self):
        os.kill(self.process.pid, signal.SIGCONT)

    def outcomes(self):
        outcomes = self.results.get(timeout=60)
        self.process.join(10)
        return outcomes


def _state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _small_jobs(until):
    """Point reads, each checked for its own answer, until *until* is set."""

    def job(client, done):
        wrong = 0
        i = 0
        while not until.is_set():
            i += 1
            wrong += client.fetchval("select %s::int", [os.getpid() * 1000 + i]) != os.getpid() * 1000 + i
            with done.get_lock():
                done.value += 1
        return wrong

    return job


def _large_jobs(until):
    """Jobs of LARGE_JOB bytes, sent in many parts, until *until* is set."""

    def job(client, done):
        wrong = 0
        while not until.is_set():
            wrong += client.fetchval("select length(%s)", ["x" * LARGE_JOB]) != LARGE_JOB
            with done.get_lock():
                done.value += 1
        return wrong

    return job


def _answers_within(client, seconds, count=20):
    """Run *count* jobs here; fail if they take longer than *seconds* in all."""
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        jobs = executor.submit(lambda: [client.fetchval("select %s::int", [i]) for i in range(count)])
        try:
            return jobs.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            pytest.fail("no replies for %.0f s while one client process was stopped" % seconds)


def test_a_client_process_stopped_while_it_sends_holds_up_nobody(queue_service):
    """Stopped right after putting jobs, and in the middle of a job sent in parts."""
    client = queue_service.client(timeout=30)
    until = multiprocessing.get_context("fork").Event()
    victim = Victim(client, *[_small_jobs(until)] * 4, _large_jobs(until))
    try:
        wait_until(lambda: victim.done.value >= 50, timeout=30, message="the client process to be busy")
        victim.stop()
        assert _answers_within(client, DEADLINE) == list(range(20))
        until.set()
    finally:
        victim.resume()
    # Its replies waited in its channels: every one is its own.
    assert victim.outcomes() == [("ok", 0)] * 5


def test_a_client_process_stopped_with_replies_unread_holds_up_nobody(queue_service, admin):
    """Four replies too large for their pipes, to a stopped process: the daemon drops its channels."""
    client = queue_service.client(timeout=30)
    sql = "select repeat('x', %s) from pg_sleep(2) /* marker-unread */"

    def large_result(client, done):
        return len(client.fetchval(sql, [LARGE_RESULT]))

    victim = Victim(client, *[large_result] * 4)
    try:
        wait_until(lambda: active(admin, "marker-unread") == 4, message="its queries to run")
        victim.stop()
        wait_until(lambda: active(admin, "marker-unread") == 0, message="its results to be sent")
        assert _answers_within(client, DEADLINE) == list(range(20))
        # Its replies went unread past unread_reply_timeout (1 s): its channels are gone.
        wait_until(lambda: client.status()["queue_channels"] == 1, message="its channels to be dropped")
        assert _answers_within(client, DEADLINE) == list(range(20))
    finally:
        victim.resume()
    for kind, message in victim.outcomes():
        assert kind == "ServiceUnavailable" and "unread_reply_timeout" in message


def test_a_client_process_resumed_in_time_gets_its_large_replies(dsn, admin):
    with start_service(dsn, max_size=6, unread_reply_timeout=60.0) as svc:
        client = svc.client(timeout=30)
        sql = "select repeat('y', %s) from pg_sleep(2) /* marker-resumed */"

        def large_result(client, done):
            return client.fetchval(sql, [LARGE_RESULT]) == "y" * LARGE_RESULT

        victim = Victim(client, *[large_result] * 4)
        try:
            wait_until(lambda: active(admin, "marker-resumed") == 4, message="its queries to run")
            victim.stop()
            wait_until(lambda: active(admin, "marker-resumed") == 0, message="its results to be sent")
            assert _answers_within(client, DEADLINE) == list(range(20))
        finally:
            victim.resume()
        assert victim.outcomes() == [("ok", True)] * 4


def test_a_killed_client_process_has_its_queries_cancelled(queue_service, admin):
    client = queue_service.client(timeout=30)
    until = multiprocessing.get_context("fork").Event()

    def sleeper(client, done):
        return client.fetchval("select pg_sleep(30) /* marker-killed */")

    victim = Victim(client, sleeper, sleeper, *[_small_jobs(until)] * 2)
    wait_until(lambda: active(admin, "marker-killed") == 2 and victim.done.value >= 20, message="it to be busy")
    victim.process.kill()
    victim.process.join(10)
    # Nobody is left to read their results: the daemon cancels them on the server.
    wait_until(lambda: active(admin, "marker-killed") == 0, message="its queries to be cancelled")
    wait_until(lambda: client.status()["queue_channels"] == 1, message="its channels to be closed")
    assert _answers_within(client, DEADLINE) == list(range(20))


def test_every_waiting_client_hears_when_the_service_is_killed(dsn, admin):
    svc = start_service(dsn, min_size=1, max_size=3)
    c = svc.client()
    with concurrent.futures.ThreadPoolExecutor(3) as executor:
        jobs = [executor.submit(c.fetchval, "select pg_sleep(30) /* marker-queue-kill */") for _ in range(3)]
        wait_until(lambda: active(admin, "marker-queue-kill") == 3, message="jobs to run")
        svc.process.kill()
        for job in jobs:
            with pytest.raises(dbservice.ServiceUnavailable, match="has exited"):
                job.result(timeout=10)
    with pytest.raises(dbservice.ServiceUnavailable):
        c.fetchval("select 1")
    svc.stop()


@pytest.mark.parametrize("selector", ["epoll", "select", "uvloop"])
def test_threads_that_end_leave_no_channel_behind(dsn, selector):
    """A thread's reply channel closes with it, and the daemon sees it go, on every event loop."""
    with start_service(dsn, max_size=2, selector=selector) as svc, svc.client(timeout=10) as c:
        assert c.fetchval("select 1") == 1
        before = len(os.listdir("/proc/self/fd"))
        for i in range(100):
            thread = threading.Thread(target=c.fetchval, args=("select %s::int", [i]))
            thread.start()
            thread.join()
        assert len(c._channels) <= 2
        assert len(os.listdir("/proc/self/fd")) <= before + 2
        wait_until(lambda: c.status()["queue_channels"] <= 2, message="the daemon to see them hang up")
        assert os.listdir(svc.queue.directory) == []  # every FIFO unlinked once open
    assert not os.path.exists(svc.queue.directory)


def _forked_child(client, parent_channels, results):
    try:
        inherited = set(client._channels)
        values = [client.fetchval("select %s::int + %s::int", [os.getpid(), i]) for i in range(50)]
        mine = {channel.id for channel in client._channels}
        results.put((values == [os.getpid() + i for i in range(50)], inherited, bool(mine & parent_channels), len(mine)))
    except BaseException as exc:
        results.put(("error", repr(exc), None, None))


def test_forked_children_make_their_own_channels(queue_service):
    client = queue_service.client(timeout=30)
    assert client.fetchval("select 1") == 1
    parent_channels = {channel.id for channel in client._channels}
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    children = [ctx.Process(target=_forked_child, args=(client, parent_channels, results)) for _ in range(3)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(10)
    # each started with none of the parent's channels and made one of its own
    assert outcomes == [(True, set(), False, 1)] * 3
    assert client.fetchval("select 2") == 2
    assert {channel.id for channel in client._channels} == parent_channels


def test_a_job_in_many_parts_and_one_over_max_frame(dsn):
    with start_service(dsn, max_size=2, max_frame=LARGE_JOB) as svc, svc.client(timeout=30) as c:
        text = "z" * (LARGE_JOB - 1000)
        assert c.fetchval("select md5(%s)", [text]) == _md5(text)
        with pytest.raises(dbservice.JobRefused, match=r"\(max_frame %d\).*--max-frame" % LARGE_JOB):
            c.fetchval("select length(%s)", ["z" * LARGE_JOB])
        # The daemon has the same limit, for a client that does not check it.
        unchecked = dbservice.QueueClient(svc.queue, svc.process.sentinel, timeout=30)
        with pytest.raises(dbservice.JobRefused, match=r"\(max_frame %d\)" % LARGE_JOB):
            unchecked.fetchval("select length(%s)", ["z" * LARGE_JOB])
        assert unchecked.fetchval("select 3") == 3
        assert c.fetchval("select 4") == 4


def _md5(text):
    return hashlib.md5(text.encode()).hexdigest()


@pytest.mark.parametrize("payload, says", [
    (b"\x80\x05no pickle", r"^the job could not be decoded: "),
    (pickle.dumps(("select 1", None)), r"^a job must be a tuple \(sql, params, kind, timeout, tx\[, primary\]\)$"),
    (pickle.dumps(("select 1", None, "every", None, None)), r"^unknown kind of job 'every'; use one of "),
], ids=["garbled", "short", "unknown kind"])
def test_a_job_that_does_not_decode_is_refused_saying_why(queue_service, payload, says):
    client = queue_service.client(timeout=30)
    refused = client.status()["jobs_refused"]
    with pytest.raises(dbservice.JobRefused, match=says):
        client._request(MSG_JOB, payload, 10)
    assert client.fetchval("select 'next'") == "next"
    assert client.status()["jobs_refused"] == refused + 1


def test_a_graceful_stop_answers_every_job(dsn, admin):
    svc = start_service(dsn, max_size=4)
    c = svc.client(timeout=30)
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        sql = "select pg_sleep(1)::text || %s /* marker-queue-stop */"
        jobs = [executor.submit(c.fetchval, sql, [str(i)]) for i in range(4)]
        wait_until(lambda: active(admin, "marker-queue-stop") == 4, message="all jobs to run")
        stopper = threading.Thread(target=svc.stop)
        stopper.start()
        assert sorted(job.result(timeout=30) for job in jobs) == [str(i) for i in range(4)]
        stopper.join(30)
    with pytest.raises(dbservice.ServiceUnavailable):
        c.fetchval("select 1")


def test_a_channel_left_with_more_than_one_reply_unread_is_dropped_at_once(dsn):
    """The daemon keeps one reply's worth for a client that does not read; a QueueClient never asks more."""
    with start_service(dsn, max_size=2, max_result_bytes=3 * LARGE_RESULT, unread_reply_timeout=600.0) as svc:
        c = svc.client(timeout=30)
        channel_id = 0x5EED
        path = channel_path(svc.queue.directory, channel_id)
        os.mkfifo(path, 0o600)
        unread = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            job = dumps_job(Job("select repeat('r', %s)", [2 * LARGE_RESULT], FETCH_VALUE, 30))
            os.write(svc.queue.writer.fileno(), job_frames(channel_id, 1, MSG_JOB, job)[0])
            wait_until(lambda: c.status()["queue_channels"] == 2, message="the daemon to open the channel")
            os.write(svc.queue.writer.fileno(), job_frames(channel_id, 2, MSG_JOB, job)[0])
            # 4 MiB unread is more than one reply (max_result_bytes, 3 MiB): dropped, long before 600 s.
            wait_until(lambda: c.status()["queue_channels"] == 1, message="the channel to be dropped")
        finally:
            os.close(unread)
