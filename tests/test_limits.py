"""Load limits: a bounded queue, a bounded number of clients, a bounded result."""

import asyncio
import concurrent.futures
import threading
import time

import pytest

import dbservice
from conftest import active, start_service, wait_until


def test_a_full_queue_refuses_more_jobs_at_once_as_busy(dsn, socket_path, admin):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_queue=2) as svc, svc.client() as c:
        with concurrent.futures.ThreadPoolExecutor(4) as executor:
            hold = executor.submit(c.fetchval, "select pg_sleep(2) /* marker-hold-queue */", timeout=30)
            wait_until(lambda: active(admin, "marker-hold-queue") == 1, message="the connection to be held")
            queued = [executor.submit(c.fetchval, "select %s::int", [i], timeout=30) for i in range(2)]
            wait_until(lambda: c.status()["queue_depth"] == 2, message="the queue to fill")
            started = time.monotonic()
            with pytest.raises(dbservice.ServiceBusy, match="max_queue 2"):
                c.fetchval("select 'no room'", timeout=30)
            assert time.monotonic() - started < 2  # at once, not after its 30 s timeout
            assert hold.result(timeout=30) is not None
            assert [q.result(timeout=30) for q in queued] == [0, 1]
        assert c.status()["queue_depth"] == 0
        assert c.fetchval("select 'room again'") == "room again"


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
        before = c.status()
        with pytest.raises(dbservice.ResultTooLarge, match="max_result_bytes"):
            c.fetchall("select repeat('x', 1000) from generate_series(1, 1000)")
        after = c.status()  # counted as its client saw it: failed
        assert (after["jobs_done"], after["jobs_failed"]) == (before["jobs_done"], before["jobs_failed"] + 1)
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


def _shared_bomb(levels):
    """A list whose pickle is tiny but which binds to 2**levels values: every level shares the one below."""
    nested = [1]
    for _ in range(levels):
        nested = [nested, nested]
    return nested


def test_parameters_that_would_bind_to_too_much_are_refused_before_they_run(socket_service):
    """A 150-byte job whose shared sub-lists bind to 8 million values froze the daemon for 18 s."""
    with socket_service.client(timeout=30) as bomber, socket_service.client(timeout=30) as other:
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            started = time.monotonic()
            refused = executor.submit(bomber.fetchval, "select %s", [_shared_bomb(23)], timeout=1.0)
            # meanwhile the daemon goes on serving everybody else
            assert [other.fetchval("select %s::int", [i]) for i in range(20)] == list(range(20))
            with pytest.raises(dbservice.JobRefused, match="max_params_size"):
                refused.result(timeout=30)
            assert time.monotonic() - started < 5
        # a structure that shares, but binds to little, is fine
        assert bomber.fetchval("select array_length(%s::int[], 1)", [_shared_bomb(4)]) == 2
        looped = [1]
        looped.append(looped)
        with pytest.raises(dbservice.JobRefused, match="contains itself"):
            bomber.fetchval("select %s", [looped])
        deep = []
        for _ in range(100):
            deep = [deep]
        with pytest.raises(dbservice.JobRefused, match="nest more than"):
            bomber.fetchval("select %s", [deep])
        assert bomber.fetchval("select 'still serving'") == "still serving"


def test_max_params_size_is_a_setting(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_params_size=10_000) as svc:
        with svc.client(timeout=30) as c:
            assert c.fetchval("select length(%s)", ["x" * 5000]) == 5000
            with pytest.raises(dbservice.JobRefused, match="more than 10000 bytes"):
                c.fetchval("select length(%s)", ["x" * 20_000])
            with pytest.raises(dbservice.JobRefused, match="more than 10000 bytes"):
                c.executemany("select %s", [[i] for i in range(500)])


def _memory_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for pid %d" % (field, pid))


def test_a_client_that_does_not_read_holds_the_bound_plus_one_reply_then_is_dropped(dsn, socket_path, admin):
    """Ten jobs of 20 MB each, sent in one write and never read, held 200 MB and more."""
    import pickle
    import socket

    from dbservice import wire

    bound = 4 * 1024 * 1024
    reply = 20_000_000
    with start_service(
        dsn, socket_path, min_size=1, max_size=14, max_client_buffer=bound, client_stall_timeout=3.0
    ) as svc, svc.client(timeout=30) as other:
        other.fetchval("select 1")
        pid = svc.process.pid
        before = _memory_kib(pid, "VmRSS")
        greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        greedy.settimeout(10)
        greedy.connect(svc.socket)
        wire.client_handshake(greedy, svc.authkey)
        job = pickle.dumps(("select repeat('x', %d) /* marker-greedy */" % reply, None, "value", 60.0, None))
        greedy.sendall(b"".join(wire.encode_frame(i, wire.MSG_JOB, job) for i in range(1, 11)))
        # everybody else is served meanwhile
        started = time.monotonic()
        assert [other.fetchval("select %s::int", [i]) for i in range(50)] == list(range(50))
        assert time.monotonic() - started < 2.5
        # until it is dropped, after client_stall_timeout of reading nothing
        wait_until(lambda: other.status()["socket_clients"] == 1, timeout=30, message="the greedy client to go")
        peak = _memory_kib(pid, "VmHWM")
        wait_until(lambda: active(admin, "marker-greedy") == 0, message="its queries to be cancelled")
        wait_until(lambda: other.status()["jobs_running"] == 0, message="its jobs to end")
        greedy.close()
    # At its peak one reply of 20 MB takes about five times its size in the daemon (libpq's read
    # buffer and result, the Python string, its pickle, the socket's send buffer): 95 MiB here, for
    # one job or ten. Unbounded, the ten took 477 MiB.
    assert (peak - before) * 1024 < bound + 6 * reply, (before, peak)


def test_jobs_beyond_max_client_jobs_wait_unread_and_all_get_their_reply(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=1, max_size=8, max_client_jobs=3) as svc:
        seen = []

        async def main():
            async with await dbservice.connect_async(svc.socket, svc.authkey, timeout=30) as db:
                jobs = [asyncio.ensure_future(db.fetchval("select %s::int from pg_sleep(0.05)", [i])) for i in range(30)]
                while not all(job.done() for job in jobs):
                    figures = await asyncio.get_running_loop().run_in_executor(None, _status, svc)
                    seen.append(figures["queue_depth"] + figures["jobs_running"])
                return [job.result() for job in jobs]

        assert asyncio.run(asyncio.wait_for(main(), 60)) == list(range(30))
        assert max(seen) <= 3 and max(seen) > 0


def _status(svc):
    with svc.client(timeout=10) as c:
        return c.status()


def test_a_job_over_max_frame_is_refused_in_its_client_naming_the_limit(dsn, socket_path):
    """It got 'Broken pipe' with no word of the limit, was sent again, and failed six other jobs."""
    with start_service(dsn, socket_path, min_size=1, max_size=4, max_frame=100_000) as svc:
        with svc.client(timeout=30) as c:
            with pytest.raises(dbservice.JobRefused, match=r"max_frame 100000\).*--max-frame"):
                c.fetchval("select length(%s)", ["x" * 200_000])
            assert c.fetchval("select 'same connection'") == "same connection"
            assert c.status()["socket_clients"] == 1  # not reconnected to send it again

        async def main():
            async with dbservice.connect_async(svc.socket, svc.authkey, timeout=30) as db:
                others = [asyncio.ensure_future(db.fetchval("select %s::int from pg_sleep(0.2)", [i])) for i in range(6)]
                await asyncio.sleep(0.05)
                with pytest.raises(dbservice.JobRefused, match="max_frame"):
                    await db.fetchval("select length(%s)", ["x" * 200_000])
                return await asyncio.gather(*others)

        assert asyncio.run(asyncio.wait_for(main(), 30)) == list(range(6))
