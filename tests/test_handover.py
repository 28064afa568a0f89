"""dbserviced restart under load: a new daemon takes the socket and the clients over, and no job fails."""

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import psycopg2

import dbservice
from conftest import wait_until
from daemons import client_of, dbserviced, env_for, ok
from dbservice import dbapi
from dbservice.config import StateDir
from dbservice.pidfile import read_pid, running_pid, wait_for_exit


class Load:
    """Clients of every kind running jobs whose results they check, until stopped; every failure kept.

    Sync client threads, a thread opening a new client per job (connecting
    while the socket changes hands), DB-API transactions, an asyncio client
    with twenty jobs in flight at all times, and jobs that outlast a handover.
    """

    def __init__(self, state_dir, workers=None):
        self.socket = StateDir(str(state_dir)).socket
        self.client = client_of(state_dir)
        self.done = 0
        self.failures = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        if workers is None:
            workers = [self._plain, self._plain, self._new_client_each_time, self._dbapi_transactions,
                       self._asyncio, self._slow]
        else:
            workers = [getattr(self, "_" + name) for name in workers]
        self._threads = [threading.Thread(target=self._run, args=(worker,)) for worker in workers]
        for thread in self._threads:
            thread.start()

    def _run(self, worker):
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                worker("%s-%d-%d" % (worker.__name__, threading.get_ident(), i))
            except Exception as exc:
                with self._lock:
                    self.failures.append(exc)
            else:
                with self._lock:
                    self.done += 1

    def _plain(self, tag):
        assert self.client.fetchval("select %s::text", [tag]) == tag

    def _new_client_each_time(self, tag):
        with dbservice.connect(socket=self.socket, timeout=60) as db:
            assert db.fetchone("select %s::text, 1", [tag]) == (tag, 1)

    def _dbapi_transactions(self, tag):
        if not hasattr(self, "_dbapi"):
            self._dbapi = dbapi.connect(socket=self.socket, timeout=60)
        cur = self._dbapi.cursor()
        cur.execute("select %s::text", [tag])
        cur.execute("select pg_sleep(0.02), %s::text", [tag])  # the same transaction, still open
        assert cur.fetchone()[1] == tag
        self._dbapi.commit()

    def _asyncio(self, tag):
        """One connection for the whole load that is never idle: nineteen tasks each sending its
        next job as soon as its last one is answered, and one whose next slow job always leaves
        before its last one is answered, so that the daemon always has a job of it in flight."""
        async def tasks():
            async with dbservice.connect_async(socket=self.socket, timeout=60) as db:
                await asyncio.gather(overlapping(db, tag), *(one_after_another(db, "%s-%d" % (tag, n)) for n in range(19)))

        async def one_after_another(db, tag):
            for i in self._numbers():
                assert await db.fetchval("select %s::text", ["%s-%d" % (tag, i)]) == "%s-%d" % (tag, i)

        async def overlapping(db, tag):
            # A job of 0.2 s every 0.1 s: the next one is always sent before the last is answered.
            sent = collections.deque()
            for i in self._numbers():
                sent.append((str(i), asyncio.ensure_future(db.fetchval("select %s::text from pg_sleep(0.2)", [str(i)]))))
                await asyncio.sleep(0.1)
                while sent and sent[0][1].done():
                    expected, job = sent.popleft()
                    assert job.result() == expected
            for expected, job in sent:
                assert await job == expected

        asyncio.run(tasks())

    def _numbers(self):
        """1, 2, 3... until the load stops, each one more job done."""
        i = 0
        while not self._stop.is_set():
            i += 1
            yield i
            with self._lock:
                self.done += 1

    def _slow(self, tag):
        assert self.client.fetchval("select %s::text from pg_sleep(0.5)", [tag]) == tag

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"
        self.client.close()
        return self.failures


def status(state_dir):
    return json.loads(ok(dbserviced(state_dir, "status", "--json")))


def test_restarts_under_load_fail_no_job_and_apply_the_new_settings(dsn, daemon_dir):
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn, "--max-size", "4", "--metrics", "127.0.0.1:0"))
    first = status(daemon_dir)
    load = Load(daemon_dir)
    pids = [first["pid"]]
    try:
        for max_size in ("5", "6"):
            wait_until(lambda: load.done > 200, timeout=60, message="jobs flowing")
            output = ok(dbserviced(daemon_dir, "restart", "--dsn", dsn, "--max-size", max_size,
                                   "--metrics", "127.0.0.1:0"))
            assert "took the socket over from pid %d" % pids[-1] in output
            assert "handed its clients over and exited" in output
            figures = status(daemon_dir)
            assert figures["pid"] not in pids and figures["pool_max"] == int(max_size)
            assert figures["metrics"] == first["metrics"]  # the same listening port, handed over too
            pids.append(figures["pid"])
            load.done = 0
        wait_until(lambda: load.done > 200, timeout=60, message="jobs flowing after the restarts")
    finally:
        failures = load.stop()
    assert failures == []
    assert all(wait_for_exit(pid, 0) for pid in pids[:-1])


def test_clients_that_connect_for_each_job_lose_none_across_restarts(dsn, daemon_dir):
    """No client stays connected: at each handover, some are connecting, in the old daemon's backlog or just
    accepted, when it looks for clients to hand over, and none of them may be dropped as it exits."""
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn))
    load = Load(daemon_dir, workers=["new_client_each_time"] * 4)
    try:
        for _ in range(4):
            done = load.done
            wait_until(lambda: load.done > done + 50, timeout=60, message="jobs flowing")
            ok(dbserviced(daemon_dir, "restart", "--dsn", dsn))
    finally:
        failures = load.stop()
    assert failures == []


def test_a_new_daemon_that_cannot_start_leaves_the_old_one_serving(dsn, daemon_dir):
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn))
    pid = status(daemon_dir)["pid"]
    load = Load(daemon_dir)
    try:
        wait_until(lambda: load.done > 50, timeout=60, message="jobs flowing")
        # before it asks for the socket: its database refuses it
        result = dbserviced(daemon_dir, "restart", "--dsn", psycopg2.extensions.make_dsn(dsn, dbname="no_such_db"))
        assert result.returncode == 1 and "no_such_db" in result.stderr and "serves on" in result.stderr
        # after it got the socket, before it serves: its metrics port is taken
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = "127.0.0.1:%d" % taken.getsockname()[1]
            result = dbserviced(daemon_dir, "restart", "--dsn", dsn, "--metrics", busy)
        assert result.returncode == 1 and "in use" in result.stderr, result.stderr
        assert status(daemon_dir)["pid"] == pid
        assert dbserviced(daemon_dir, "pause", "--timeout", "30").returncode == 0
        result = dbserviced(daemon_dir, "restart", "--dsn", dsn)
        assert result.returncode == 1 and "resume it" in result.stderr
        ok(dbserviced(daemon_dir, "resume"))
        done = load.done
        wait_until(lambda: load.done > done + 50, timeout=60, message="jobs flowing still")
    finally:
        failures = load.stop()
    assert failures == [] and status(daemon_dir)["pid"] == pid


def test_the_old_daemon_serves_on_if_the_new_one_dies_during_the_handover(dsn, daemon_dir):
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn, "--stop-timeout", "60"))
    state = StateDir(str(daemon_dir))
    old = read_pid(state.pidfile)
    with client_of(daemon_dir) as db, db.transaction() as tx:
        tx.execute("select 1")  # an open transaction keeps its client on the old daemon
        restart = subprocess.Popen([sys.executable, "-m", "dbservice.cli", "restart", "--dsn", dsn],
                                   env=env_for(daemon_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            new = wait_until(lambda: (lambda pid: pid if pid not in (None, old) else None)(read_pid(state.pidfile)),
                             timeout=60, message="the new daemon to take over")
            with client_of(daemon_dir) as other:
                assert other.fetchval("select 'on the new daemon'") == "on the new daemon"
                assert other.status()["pid"] == new
                os.kill(new, signal.SIGKILL)
                # its socket went with it: the job reconnects, to the old daemon
                wait_until(lambda: running_pid(state.pidfile) == old, message="the old daemon to take its pidfile back")
                assert other.fetchval("select 'on the old one again'") == "on the old one again"
                assert other.status()["pid"] == old
        finally:
            restart.kill()
            restart.wait()
        assert tx.fetchval("select 'the transaction goes on'") == "the transaction goes on"
    assert status(daemon_dir)["pid"] == old


def test_a_subscriber_across_a_restart_gets_the_marker_then_what_is_sent_after(dsn, daemon_dir):
    """Its subscription is the old daemon's: its connection is closed, and it subscribes again to the new one."""
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn))
    with client_of(daemon_dir) as db:
        subscription = db.listen("across a handover")
        db.notify("across a handover", "before")
        assert subscription.receive(10).payload == "before"
        ok(dbserviced(daemon_dir, "restart", "--dsn", dsn))
        marker = subscription.receive(30)
        assert isinstance(marker, dbservice.NotificationsLost) and marker.count is None
        db.notify("across a handover", "after")
        assert subscription.receive(10).payload == "after"
        subscription.close()


def test_a_restart_without_metrics_frees_the_old_daemons_port(dsn, daemon_dir):
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % probe.getsockname()[1]
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn, "--metrics", address))
    ok(dbserviced(daemon_dir, "restart", "--dsn", dsn))
    assert status(daemon_dir)["metrics"] is None

    def port_free():
        with socket.socket() as again:
            try:
                again.bind(("127.0.0.1", int(address.rpartition(":")[2])))
            except OSError:
                return False
            return True
    wait_until(port_free, message="no daemon to hold the metrics port")
    ok(dbserviced(daemon_dir, "restart", "--dsn", dsn, "--metrics", address))
    assert status(daemon_dir)["metrics"] == address
