"""dbserviced pause and resume, across a real restart of the daemon's PostgreSQL, under load."""

import concurrent.futures
import json
import os
import signal
import threading

import psycopg2
import pytest
from psycopg2.extensions import make_dsn

import dbservice
from conftest import start_service, wait_until
from dbservice.display import format_status
from dbservice.embedded import Cluster
from daemons import client_of, dbserviced, ok

NAME = "pause-test"


@pytest.fixture
def database():
    """A PostgreSQL of the test's own, which it restarts."""
    server = Cluster.temporary()
    yield server
    server.stop()


class Load:
    """Client threads running numbered jobs, and transactions, until stopped; every outcome recorded."""

    def __init__(self, state_dir, threads=4):
        self.client = client_of(state_dir, timeout=60)
        self.outcomes = []  # (ok, what came back or the exception)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(n,)) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _work(self, n):
        i = 0
        while not self._stop.is_set():
            i += 1
            expected = "%d-%d" % (n, i)
            try:
                if n % 2:  # a transaction of two statements
                    with self.client.transaction() as tx:
                        got = tx.fetchval("select %s::text", [expected])
                        tx.execute("select pg_sleep(0.01)")
                else:
                    got = self.client.fetchval("select %s::text from pg_sleep(0.01)", [expected])
                self.outcomes.append((got == expected, got))
            except Exception as exc:
                self.outcomes.append((False, exc))

    def done(self):
        return sum(1 for ok, _ in self.outcomes if ok)

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self._threads), "a client thread hung"
        self.client.close()
        return [value for ok, value in self.outcomes if not ok]


def status(state_dir):
    return json.loads(ok(dbserviced(state_dir, "status", "--json")))


def server_connections(database):
    conn = psycopg2.connect(database.dsn())
    try:
        cur = conn.cursor()
        cur.execute("select count(*) from pg_stat_activity where application_name = %s", [NAME])
        return cur.fetchone()[0]
    finally:
        conn.close()


def test_jobs_submitted_during_a_pause_run_after_resume_across_a_database_restart(database, daemon_dir):
    ok(dbserviced(daemon_dir, "start", "--dsn", make_dsn(database.dsn(), application_name=NAME),
                  "--min-size", "2", "--max-size", "2"))
    load = Load(daemon_dir)
    subscriber = client_of(daemon_dir, timeout=60)
    subscription = subscriber.listen("across the pause")
    try:
        wait_until(lambda: load.done() > 50, message="jobs flowing")
        assert "dbserviced paused" in ok(dbserviced(daemon_dir, "pause"))
        # the listening connection's too; each backend leaves pg_stat_activity a moment after its socket closed
        wait_until(lambda: server_connections(database) == 0, timeout=3, message="the daemon's backends to exit")
        figures = status(daemon_dir)
        assert figures["pause"] == "paused" and figures["transactions_open"] == 0
        assert "PAUSED" in ok(dbserviced(daemon_dir, "status"))
        wait_until(lambda: status(daemon_dir)["requests_waiting"] == 4, message="every client's job to wait")
        done_while_paused = load.done()
        database.shut_down()  # nothing of the daemon's is connected: nothing of it is cut
        database.start()
        assert load.done() == done_while_paused and not [ok for ok, _ in load.outcomes if not ok]
        assert "4 jobs that waited go on" in ok(dbserviced(daemon_dir, "resume"))
        wait_until(lambda: load.done() > done_while_paused + 50, message="jobs flowing after the resume")
        assert status(daemon_dir)["pause"] is None
        marker = subscription.receive(30)  # the restart ended no connection of the daemon's: the pause did
        assert isinstance(marker, dbservice.NotificationsLost) and "was paused" in marker.reason, marker
        subscriber.notify("across the pause", "heard again")
        assert subscription.receive(30).payload == "heard again"
    finally:
        subscription.close()
        subscriber.close()
        errors = load.stop()
    assert errors == []


def test_a_pause_waits_for_open_transactions_and_held_jobs_keep_their_timeouts(dsn, socket_path):
    svc = start_service(dsn, socket_path, min_size=1, max_size=2)
    try:
        with svc.client(timeout=30) as db, db.transaction() as tx:
            tx.execute("create temporary table pause_probe (n int)")
            figures = db.pause(timeout=0.3)  # the transaction holds its connection: not paused yet
            assert (figures["pause"], figures["transactions_open"], figures["connections_open"]) == ("pausing", 1, 1)
            tx.execute("insert into pause_probe values (1)")  # its statements go on
            with pytest.raises(dbservice.QueryTimeout, match="paused"):
                db.fetchval("select 'held'", timeout=0.3)
            with concurrent.futures.ThreadPoolExecutor(1) as executor:
                held = executor.submit(db.fetchval, "select 'held, then run'")
                wait_until(lambda: db.status()["requests_waiting"] == 1, message="the job to wait")
                assert tx.fetchval("select count(*) from pause_probe") == 1
                tx.commit()
                wait_until(lambda: db.status()["pause"] == "paused", message="the pause to be complete")
                assert db.pause(timeout=1)["pause"] == "paused"
                assert db.resume()["held"] == 1
                assert held.result(timeout=30) == "held, then run"
            assert db.status()["pause"] is None
    finally:
        svc.stop()


def test_a_pause_counts_the_listening_connection_until_its_backend_is_gone(dsn, socket_path, admin):
    """The figure an operator waits on reaches 0 only once no backend of the daemon is left, LISTEN's included."""
    svc = start_service(make_dsn(dsn, application_name=NAME), socket_path, min_size=1, max_size=2)

    def backends(query="%"):
        cur = admin.cursor()
        cur.execute("select pid from pg_stat_activity where application_name = %s and query like %s", [NAME, query])
        return [pid for pid, in cur.fetchall()]

    try:
        with svc.client(timeout=30) as db, db.listen("pause_counted"):
            [listening] = backends("LISTEN%")
            os.kill(listening, signal.SIGSTOP)  # it reads the daemon's goodbye, and exits, only once continued
            try:
                figures = db.pause(timeout=0.5)
                assert (figures["pause"], figures["connections_open"]) == ("pausing", 1), figures
                status = db.status()
                assert status["connections_open"] == 1 and status["pool_size"] == 0
                assert "PAUSING      1 connections still open" in format_status(status)
                assert backends() == [listening]
            finally:
                os.kill(listening, signal.SIGCONT)
            figures = db.pause(timeout=10)
            assert (figures["pause"], figures["connections_open"]) == ("paused", 0), figures
            assert backends() == []  # at once: no backend of the daemon is left when it says so
            db.resume()
            assert db.fetchval("select 1") == 1
    finally:
        svc.stop()
