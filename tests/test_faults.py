"""Faults with real processes: what happens when a part dies, stalls or races."""

import asyncio
import collections
import concurrent.futures
import io
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

import dbservice
import dbservice.queries
from conftest import active, start_service, wait_until
from dbservice.embedded import Cluster
from dbservice.health import Backoff, Reachability
from dbservice.pool import AsyncConnectionPool
from dbservice.loops import new_event_loop
from proxy import TcpProxy

CLIENT = """
import sys, dbservice
db = dbservice.connect(socket=sys.argv[1], authkey=sys.argv[2].encode())
print("connected", flush=True)
db.fetchval("select pg_sleep(60) /* marker-client-death */")
"""


def _pool_at_rest(figures):
    return (figures["pool_size"], figures["pool_available"], figures["jobs_running"]) == (1, 1, 0) and (
        figures["connections"][0]["busy"] is False
    )


def test_a_client_that_dies_mid_query_has_its_query_cancelled(dsn, socket_path, admin):
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1) as svc:
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, svc.socket, svc.authkey.decode()], stdout=subprocess.PIPE
        )
        try:
            assert client.stdout.readline().strip() == b"connected"
            wait_until(lambda: active(admin, "marker-client-death") == 1, message="the query to run")
            os.kill(client.pid, signal.SIGKILL)
            client.wait(10)
        finally:
            client.kill()
        wait_until(lambda: active(admin, "marker-client-death") == 0, message="the query to be cancelled")
        # the pool's only connection came back, nobody waits, and it serves the next job
        wait_until(
            lambda: _pool_at_rest(status(svc)), message="the connection back in the pool, idle"
        )
        with svc.client(timeout=10) as db:
            assert db.fetchval("select 'next'") == "next"


# -- the database goes away ---------------------------------------------------


@pytest.fixture(scope="module")
def private_postgresql():
    """A cluster of this module's own, which its tests may stop and restart."""
    server = Cluster.temporary()
    yield server
    server.stop()


@pytest.fixture
def proxy(postgresql):
    link = TcpProxy("127.0.0.1", postgresql.port)
    link.start()
    yield link
    link.close()


def status(svc):
    with svc.client(timeout=10) as c:
        return c.status()


class Load:
    """Client threads running numbered queries until stopped, recording every outcome."""

    def __init__(self, client, threads=4):
        self.client = client
        self.outcomes = []  # (time, ok, value or exception)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(n,)) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _work(self, n):
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                value = self.client.fetchval("select %s::text", ["%d-%d" % (n, i)], timeout=15)
                self.outcomes.append((time.monotonic(), value == "%d-%d" % (n, i), value))
            except Exception as exc:
                self.outcomes.append((time.monotonic(), False, exc))

    def successes_since(self, moment):
        return sum(1 for at, ok, _ in self.outcomes if ok and at > moment)

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return not any(thread.is_alive() for thread in self._threads)


def test_postgres_restart_under_load(private_postgresql, socket_path):
    with dbservice.DBService(private_postgresql.dsn(), socket=socket_path, min_size=2, max_size=4) as svc:
        load = Load(svc.client())
        try:
            wait_until(lambda: load.successes_since(0) > 50, message="load to run")
            private_postgresql.shut_down()  # the postmaster stops; its data stays
            down_at = time.monotonic()
            private_postgresql.start()
            up_at = time.monotonic()
            wait_until(lambda: load.successes_since(up_at) > 100, timeout=30, message="service after restart")
            figures = status(svc)
        finally:
            assert load.stop(), "a client thread hung"
    errors = [value for _, ok, value in load.outcomes if not ok]
    # only the jobs caught by the restart itself failed, each with a clear error
    assert all(isinstance(e, (psycopg2.OperationalError, dbservice.ServiceUnavailable)) for e in errors), [
        type(e).__name__ + ": " + str(e)[:60] for e in errors
    ]
    assert all(ok for at, ok, _ in load.outcomes if at > up_at + 1.0)
    assert figures["database_reachable"]
    # the pool reconnected with backoff, not in a tight loop
    assert figures["connections_errors"] < 5 + 2 * (up_at - down_at) / Backoff.INITIAL_DELAY


def test_killed_backend_fails_its_job_and_is_replaced(dsn, socket_path, admin):
    with dbservice.DBService(dsn, socket=socket_path, min_size=2, max_size=2) as svc, svc.client(timeout=30) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            doomed = executor.submit(c.fetchval, "select pg_sleep(30) /* marker-terminate */")
            wait_until(lambda: active(admin, "marker-terminate") == 1, message="the query to run")
            admin.cursor().execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where query like '%marker-terminate%'"
                " and state = 'active' and pid <> pg_backend_pid()"
            )
            with pytest.raises(psycopg2.OperationalError):
                doomed.result(timeout=30)
        assert [c.fetchval("select %s::int", [i]) for i in range(20)] == list(range(20))
        assert c.status()["connections_lost"] >= 1
        wait_until(lambda: c.status()["pool_size"] == 2, message="the pool to replace the connection")


def reset_as_one_event(svc, proxy, last_words):
    """The proxy sends the daemon *last_words*, then RST, as a server that died with our query unread.

    The daemon is stopped meanwhile (SIGSTOP), so that both reach it as one
    event: readable and in error at once.
    """
    os.kill(svc.process.pid, signal.SIGSTOP)
    try:
        proxy.reset(last_words)
    finally:
        os.kill(svc.process.pid, signal.SIGCONT)


def _fails_at_once_when_reset(svc, c, proxy, admin, marker, doomed, last_words):
    """Once the job *marker* names runs, reset as one event: *doomed* fails at once, and *c* goes on."""
    wait_until(lambda: active(admin, marker) == 1, message="the job to run")
    reset_as_one_event(svc, proxy, last_words)
    with pytest.raises(psycopg2.OperationalError):
        doomed.result(timeout=3)  # at once, not at the job's timeout
    assert c.fetchval("select 41 + 1") == 42  # on a new connection


#: A NoticeResponse: a whole message that leaves a query waiting for the rest of its reply.
NOTICE = b"N" + struct.pack("!i", 4 + 33) + b"SNOTICE\0VNOTICE\0C00000\0Mgoodbye\0\0"


def _message(kind, body):
    return kind + struct.pack("!i", 4 + len(body)) + body


#: The whole reply to a one-column query, as the server sends it: the row 7, then ready for the next query.
REPLY_OF_7 = (
    _message(b"T", struct.pack("!h", 1) + b"x\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
    + _message(b"D", struct.pack("!hi", 1, 1) + b"7")
    + _message(b"C", b"SELECT 1\0")
    + _message(b"Z", b"I")
)


#: The first 64 kB of a large result: more than one read, and still not all of it.
PART_OF_A_LARGE_RESULT = (
    _message(b"T", struct.pack("!h", 1) + b"x\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0))
    + _message(b"D", struct.pack("!hi", 1, 1000) + b"x" * 1000) * 64
)


@pytest.mark.parametrize("selector", ["epoll", "select", "uvloop"])
@pytest.mark.parametrize(
    "last_words", [b"", NOTICE, PART_OF_A_LARGE_RESULT], ids=["rst", "notice-and-rst", "part-of-a-result-and-rst"]
)
def test_a_connection_reset_during_a_query_fails_its_job_at_once(proxy, socket_path, admin, selector, last_words):
    """Also when a message and the reset reach the daemon together: one event, readable and in error.

    uvloop runs the reader once for such an event and then stops watching the
    socket; a reader that read only the message must watch it anew.
    """
    dsn = proxy.dsn(user="postgres", dbname="test")
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1, selector=selector) as svc, \
            svc.client(timeout=30) as c, concurrent.futures.ThreadPoolExecutor(1) as executor:
        marker = "marker-reset-%s-%d" % (selector, len(last_words))  # the backends of the cases before it may sleep on
        doomed = executor.submit(c.fetchval, "select pg_sleep(30) /* %s */" % marker, timeout=6)
        _fails_at_once_when_reset(svc, c, proxy, admin, marker, doomed, last_words)


@pytest.mark.parametrize("selector", ["epoll", "uvloop"])
def test_an_idle_connection_reset_after_a_notice_is_replaced_before_a_job_meets_it(proxy, socket_path, selector):
    dsn = proxy.dsn(user="postgres", dbname="test")
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1, selector=selector) as svc, \
            svc.client(timeout=10) as c:
        assert c.fetchval("select 1") == 1
        reset_as_one_event(svc, proxy, NOTICE)
        wait_until(lambda: c.status()["connections_lost"] == 1, timeout=5, message="the pool to notice")
        assert c.fetchval("select 41 + 1") == 42


@pytest.mark.parametrize("selector", ["epoll", "uvloop"])
def test_a_connection_reset_during_a_copy_fails_it_at_once(proxy, socket_path, admin, selector):
    """A COPY reads with libpq's own functions, not poll(): after a message and the reset, it must watch anew too."""
    dsn = proxy.dsn(user="postgres", dbname="test")
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1, selector=selector) as svc, \
            svc.client(timeout=30) as c, concurrent.futures.ThreadPoolExecutor(1) as executor:
        marker = "marker-copy-reset-%s" % selector
        sql = "copy (select pg_sleep(30) /* %s */) to stdout" % marker
        doomed = executor.submit(c.copy_expert, sql, io.StringIO(), timeout=6)
        _fails_at_once_when_reset(svc, c, proxy, admin, marker, doomed, NOTICE)


@pytest.mark.parametrize("selector", ["epoll", "uvloop"])
def test_a_connection_reset_as_its_reply_arrives_is_replaced_before_a_job_meets_it(proxy, socket_path, admin, selector):
    """The whole reply and the reset in one event: the job is answered, and the connection, idle, still watched.

    uvloop stops watching the socket after such an event; the poll that
    finishes the job must not leave it so.
    """
    dsn = proxy.dsn(user="postgres", dbname="test")
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1, selector=selector) as svc, \
            svc.client(timeout=10) as c, concurrent.futures.ThreadPoolExecutor(1) as executor:
        marker = "marker-reply-and-reset-%s" % selector
        answered = executor.submit(c.fetchval, "select 1 from pg_sleep(30) /* %s */" % marker, timeout=6)
        wait_until(lambda: active(admin, marker) == 1, message="the query to run")
        reset_as_one_event(svc, proxy, REPLY_OF_7)
        assert answered.result(timeout=3) == 7
        wait_until(lambda: c.status()["connections_lost"] == 1, timeout=5, message="the pool to notice")
        assert c.fetchval("select 41 + 1") == 42


def test_database_down_at_start_then_served_when_it_appears(proxy, socket_path):
    proxy.stop()
    with dbservice.DBService(proxy.dsn(user="postgres", dbname="test"), socket=socket_path, min_size=1, max_size=2) as svc:
        assert status(svc)["database_reachable"] is False
        with svc.client() as c:
            for _ in range(3):  # at once, not after the job's timeout or pool_timeout (30 s)
                started = time.monotonic()
                with pytest.raises(dbservice.ServiceUnavailable, match="unreachable.*Connection refused"):
                    c.fetchval("select 1")
                assert time.monotonic() - started < 1.0
            proxy.start()
            # jobs coming make the pool try again soon, whatever its backoff had reached
            came_back = time.monotonic()
            assert wait_until(lambda: _served(c), timeout=10, message="a job to be served") == "up"
            assert time.monotonic() - came_back < 2.0
        assert status(svc)["database_reachable"] is True


def _served(client):
    try:
        return client.fetchval("select 'up'")
    except dbservice.ServiceUnavailable:
        return None


def test_stalled_network_fails_jobs_within_their_timeout_then_recovers(proxy, socket_path):
    dsn = proxy.dsn(user="postgres", dbname="test")
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=2, connect_timeout=1.0) as svc:
        with svc.client() as c:
            assert c.fetchval("select 1", timeout=5) == 1
            proxy.stall()
            started = time.monotonic()
            # the cancel request cannot reach the server either: nobody can say the query stopped
            with pytest.raises(dbservice.QueryOutcomeUnknown, match="may still commit"):
                c.fetchval("select 2", timeout=1.0)
            # the timeout, then at most connect_timeout for the failed cancel
            assert time.monotonic() - started < 1.0 + 1.0 + 2.0
            figures = c.status()
            assert (figures["jobs_timed_out"], figures["jobs_failed"]) == (1, 0)  # a timeout, if an uncertain one
            proxy.resume()
            proxy.stop()  # drop the stalled connections, as a real outage ends
            proxy.start()
            assert c.fetchval("select 3", timeout=30) == 3


@pytest.fixture(scope="module")
def crowded_postgresql():
    """A cluster with three connection slots and none kept for superusers."""
    server = Cluster.temporary(max_connections=3, superuser_reserved_connections=0)
    yield server
    server.stop()


def test_a_timed_out_query_is_cancelled_even_when_the_server_has_no_slot_left(crowded_postgresql, socket_path):
    """Cancelling must not need a connection: a cancel that could not connect let the UPDATE commit later."""
    dsn = crowded_postgresql.dsn()
    setup = psycopg2.connect(dsn)
    setup.autocommit = True
    setup.cursor().execute("create table if not exists crowded (id int primary key, v int)")
    setup.cursor().execute("truncate crowded; insert into crowded values (1, 0)")
    with start_service(dsn, socket_path, min_size=2, max_size=2) as svc, svc.client() as c:
        locker = setup.cursor()
        locker.execute("begin; update crowded set v = -1 where id = 1")  # holds the row's lock
        # the daemon's two connections and ours: no slot left for anybody
        with pytest.raises(psycopg2.OperationalError, match="too many clients"):
            psycopg2.connect(dsn).close()
        started = time.monotonic()
        with pytest.raises(dbservice.QueryTimeout) as timed_out:
            c.execute("update crowded set v = 42 where id = 1 /* marker-crowded */", timeout=1.0)
        assert not isinstance(timed_out.value, dbservice.QueryOutcomeUnknown)
        assert time.monotonic() - started < 5
        locker.execute("select count(*) from pg_stat_activity where query like '%%marker-crowded%%' and state = 'active'"
                       " and pid <> pg_backend_pid()")
        assert locker.fetchone()[0] == 0  # cancelled on the server, not left waiting for the lock
        locker.execute("rollback")
        assert c.fetchval("select v from crowded where id = 1") == 0  # the timed-out UPDATE never commits
        assert c.execute("update crowded set v = 7 where id = 1", timeout=5) == 1  # its connection serves on
    setup.close()


def test_reconnect_backoff_doubles_is_capped_and_jittered(postgresql, monkeypatch):
    monkeypatch.setattr(Backoff, "INITIAL_DELAY", 0.05)
    monkeypatch.setattr(Backoff, "MAX_DELAY", 0.4)
    link = TcpProxy("127.0.0.1", 1)  # nothing listens upstream: every attempt fails
    link.start()

    async def main():
        pool = AsyncConnectionPool(link.dsn(user="postgres", dbname="test"), min_size=1, max_size=1)
        await pool.open(wait=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(link.accepted) < 9 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await pool.close()

    try:
        new_event_loop().run_until_complete(main())
    finally:
        link.close()
    intervals = [b - a for a, b in zip(link.accepted, link.accepted[1:])][:8]
    expected = [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4]
    assert len(intervals) == 8
    for got, want in zip(intervals, expected):
        assert want * 0.85 <= got <= want * 1.15 + 0.05, (intervals, expected)
    # jittered: the capped delays are not all the same
    assert len({round(x, 3) for x in intervals[3:]}) > 1


def test_backoff_schedule():
    random.seed(7)
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(12)]
    bases = [min(Backoff.MAX_DELAY, Backoff.INITIAL_DELAY * 2 ** n) for n in range(12)]
    for delay, base in zip(delays, bases):
        assert base * (1 - Backoff.JITTER) <= delay <= base * (1 + Backoff.JITTER)
    # jittered: clients that lost the database together do not retry in step
    assert len(set(delays[-5:])) == 5
    backoff.reset()
    assert backoff.next_delay() <= Backoff.INITIAL_DELAY * (1 + Backoff.JITTER)


def test_an_outage_that_began_with_connections_open_is_timed_from_when_the_last_one_went():
    """Attempts failed while connections were still open (the server shutting down), then those went too."""
    health = Reachability("db")
    health.connected()
    health.failed(psycopg2.OperationalError("the database system is shutting down"), 10.0, nothing_open=False)
    assert health.outage_error(11.0, nothing_open=True, patience=5.0) is None  # a short outage: jobs wait
    error = health.outage_error(16.5, nothing_open=True, patience=5.0)
    assert isinstance(error, dbservice.ServiceUnavailable) and "for 5.5 s" in str(error)


# -- races and stuck connections ----------------------------------------------


def test_timeouts_racing_results_leave_nothing_behind(dsn, socket_path):
    rng = random.Random(11)
    outcomes = collections.Counter()
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1) as svc, svc.client() as c:
        for i in range(300):
            # some finish well before the timeout, some just as it fires, some far after it
            sleep = rng.choice([0.0, 0.005, 0.01, 0.015, 0.05])
            try:
                value = c.fetchval("select %s::int from pg_sleep(%s)", [i, sleep], timeout=0.01)
                assert value == i
                outcomes["result"] += 1
            except dbservice.QueryTimeout:
                outcomes["timeout"] += 1
            # the next job on the only connection sees its own answer, nothing left over
            assert c.fetchval("select %s::text", ["check-%d" % i], timeout=10) == "check-%d" % i
    assert sum(outcomes.values()) == 300
    assert outcomes["timeout"] > 0 and outcomes["result"] > 0


def test_a_lock_wait_holds_one_connection_and_nothing_else(dsn, socket_path, admin):
    admin.cursor().execute("drop table if exists locked; create table locked (id int primary key, n int)")
    admin.cursor().execute("insert into locked values (1, 0)")
    holder = psycopg2.connect(dsn)  # a transaction outside dbservice holds the row
    holder.cursor().execute("select * from locked where id = 1 for update")
    try:
        with dbservice.DBService(dsn, socket=socket_path, min_size=2, max_size=3) as svc, svc.client() as c:
            with concurrent.futures.ThreadPoolExecutor(1) as executor:
                blocked = executor.submit(c.execute, "update locked set n = n + 1 where id = 1 /* marker-lock */")
                wait_until(lambda: active(admin, "marker-lock") == 1, message="the update to wait on the lock")
                assert [c.fetchval("select %s::int", [i], timeout=5) for i in range(30)] == list(range(30))
                assert not blocked.done()
                holder.commit()
                assert blocked.result(timeout=30) == 1
    finally:
        holder.close()
        admin.cursor().execute("drop table if exists locked")


CLIENT_IN_TRANSACTION = """
import asyncio, sys, dbservice
async def main():
    db = await dbservice.connect_async(sys.argv[1], sys.argv[2].encode())
    tx = db.transaction()
    await tx.__aenter__()
    await tx.execute("insert into orphans values (1)")
    print("inserted", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_a_client_that_dies_inside_a_transaction_has_it_rolled_back(dsn, socket_path, admin):
    admin.cursor().execute("drop table if exists orphans; create table orphans (id int)")
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1) as svc:
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT_IN_TRANSACTION, svc.socket, svc.authkey.decode()], stdout=subprocess.PIPE
        )
        try:
            assert client.stdout.readline().strip() == b"inserted"
            assert status(svc)["transactions_open"] == 1
            os.kill(client.pid, signal.SIGKILL)
            client.wait(10)
        finally:
            client.kill()
        wait_until(lambda: status(svc)["transactions_open"] == 0, message="the transaction to be rolled back")
        with svc.client(timeout=10) as c:
            assert c.fetchval("select count(*) from orphans") == 0  # never committed
            assert c.fetchval("select 'the connection is back'") == "the connection is back"
        figures = status(svc)
    assert figures["pool_available"] == 1
    admin.cursor().execute("drop table if exists orphans")


def test_clients_reconnect_after_the_daemon_is_killed_and_restarted(dsn, socket_path):
    svc = dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1).start()
    c = svc.client(timeout=10)
    assert c.fetchval("select 1") == 1
    svc.process.kill()
    svc.process.join(10)
    started = time.monotonic()
    with pytest.raises(dbservice.ServiceUnavailable):
        c.fetchval("select 2")
    assert time.monotonic() - started < 5
    again = dbservice.DBService(dsn, socket=socket_path, authkey=svc.authkey, min_size=1, max_size=1).start()
    try:
        assert c.fetchval("select 3") == 3  # the same client, no new connect() needed
    finally:
        again.stop()


def test_a_daemon_that_stops_answering_is_a_timeout_for_its_clients(dsn, socket_path, monkeypatch):
    """The sync client bounds its wait for a reply itself: a frozen daemon cannot hang it."""
    monkeypatch.setattr(dbservice.queries, "REPLY_GRACE", 0.3)
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client() as c:
        assert c.fetchval("select 1") == 1
        os.kill(svc.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(dbservice.QueryTimeout, match="no reply from the dbservice daemon within 0.5 s"):
                c.fetchval("select 2", timeout=0.2)
            assert time.monotonic() - started < 5
        finally:
            os.kill(svc.process.pid, signal.SIGCONT)
        assert c.fetchval("select 3") == 3  # on a new connection
