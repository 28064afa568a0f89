"""Streaming replicas: reads to the least-loaded replica, read-your-writes, and faults, on real standbys."""

import collections
import concurrent.futures
import os
import signal
import threading
import urllib.request

import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

import dbservice
from conftest import wait_until
from dbservice.display import format_status
from dbservice.embedded import Cluster
from dbservice.hosts import reads_only
from proxy import TcpProxy

#: Which server answered: each of ours listens on a port of its own.
PORT = "current_setting('port')::int"


def hosts(svc):
    with svc.client(timeout=10) as db:
        return db.status()["hosts"]


def pools(svc):
    with svc.client(timeout=10) as db:
        return db.status()["pools"]


def polled(svc):
    """True once the daemon knows every replica has replayed the primary (it may serve reads)."""
    return all(host["healthy"] and host["lag_s"] is not None for host in hosts(svc))


def start(primary, standbys, socket_path, **options):
    """A service on *primary* with *standbys* (or their DSNs) as replicas, once it has polled them."""
    replicas = tuple(s if isinstance(s, str) else s.dsn() for s in standbys)
    svc = dbservice.DBService(primary.dsn(), socket=socket_path, replicas=replicas, max_size=4, **options).start()
    wait_until(lambda: polled(svc), message="the replicas to be polled")
    return svc


@pytest.fixture(scope="module")
def cluster(replicated):
    primary, standbys = replicated
    conn = psycopg2.connect(primary.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("create table if not exists ryw (client int, n int)")
        cur.execute("create sequence if not exists counter")
        cur.execute("create table if not exists items (id int primary key)")
        cur.execute("insert into items values (1) on conflict do nothing")
    conn.close()
    return replicated


@pytest.fixture(scope="module")
def svc(cluster, tmp_path_factory):
    directory = tmp_path_factory.mktemp("r")
    os.chmod(directory, 0o700)
    service = start(*cluster, str(directory / "s.sock"), metrics="127.0.0.1:0")
    yield service
    service.stop()


def scrape(svc):
    """Every sample of a scrape of *svc*'s metrics: {(name, (label, value) pairs): value}."""
    with svc.client(timeout=10) as db:
        address = db.status()["metrics"]
    with urllib.request.urlopen("http://%s/metrics" % address, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def pool_sample(scraped, name, pool, **labels):
    role = "primary" if pool == "pool" else "replica"
    return scraped[(name, tuple(sorted(dict(labels, pool=pool, role=role).items())))]


@pytest.mark.parametrize("sql", [
    "select 1", "  SELECT * from t", "with x as (select 1) select * from x", "values (1)", "table t", "show work_mem",
    "select nextval('s')",  # a replica refuses it, and it runs again on the primary
])
def test_statements_that_start_as_reads_may_go_to_a_replica(sql):
    assert reads_only(sql)


@pytest.mark.parametrize("sql", [
    "insert into t values (1)", "update t set x = 1", "delete from t", "create table t (x int)",
    "select set_config('work_mem', '1MB', false)", "select pg_advisory_lock(1)",  # session state: the primary's
    "/* a comment */ select 1", "(select 1)", "begin", "call p()", "do $$ begin end $$", "listen x",
])
def test_anything_else_goes_to_the_primary(sql):
    assert not reads_only(sql)


def test_the_standbys_stream_what_the_primary_writes(cluster):
    primary, standbys = cluster
    conn = psycopg2.connect(primary.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("insert into ryw values (-1, 42)")
    conn.close()
    for standby in standbys:
        replica = psycopg2.connect(standby.dsn())
        replica.autocommit = True
        with replica.cursor() as cur:
            cur.execute("select pg_is_in_recovery()")
            assert cur.fetchone() == (True,)

            def replayed():
                cur.execute("select count(*) from ryw where client = -1")
                return cur.fetchone()[0] > 0

            wait_until(replayed, message="the write to reach the standby")
        replica.close()


def test_reads_spread_over_the_replicas_and_writes_go_to_the_primary(cluster, svc):
    primary, standbys = cluster
    counts = collections.Counter()
    lock = threading.Lock()

    def reader():
        with svc.client(timeout=30) as db:  # a client that wrote nothing may read any replica
            for _ in range(100):
                port = db.fetchval("select %s from pg_sleep(0.001)" % PORT)
                with lock:
                    counts[port] += 1

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(counts.values()) == 400
    for standby in standbys:  # a fair share each
        assert counts[standby.port] >= 100, counts
    with svc.client(timeout=30) as db:
        before = hosts(svc)[0]["jobs_done"]
        assert db.execute("insert into ryw values (-2, 1)") == 1
        assert db.fetchval("select %s from (values (1)) v(x)" % PORT, primary=True) == primary.port
        assert hosts(svc)[0]["jobs_done"] == before + 2


def test_the_metrics_show_each_host(cluster, tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm")
    os.chmod(directory, 0o700)
    service = start(*cluster, str(directory / "s.sock"), metrics="127.0.0.1:0")
    try:
        with service.client(timeout=10) as db:
            for _ in range(20):
                db.fetchval("select 1")
            db.execute("insert into ryw values (-1, -1)")
            status = db.status()
        with urllib.request.urlopen("http://%s/metrics" % status["metrics"], timeout=10) as response:
            text = response.read().decode()
    finally:
        service.stop()
    scraped = {
        (sample.name, sample.labels.get("host"), sample.labels.get("role")): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
        if sample.name.startswith("dbservice_host_") and "state" not in sample.labels
    }
    for host, figures in zip(["pool", "replica1", "replica2"], status["hosts"]):
        key = (host, figures["role"])
        assert scraped[("dbservice_host_healthy",) + key] == 1
        assert scraped[("dbservice_host_jobs_total",) + key] == figures["jobs_done"]
        assert scraped[("dbservice_host_jobs_rerun_total",) + key] == figures["jobs_rerun"]
        assert scraped[("dbservice_host_jobs_in_flight",) + key] == 0
    replicas_done = [figures["jobs_done"] for figures in status["hosts"][1:]]
    assert sum(replicas_done) > 0 and status["hosts"][0]["jobs_done"] >= 1  # reads went out, the write stayed


def test_status_and_the_metrics_show_each_replicas_pool(cluster, svc):
    """Reads held on both replicas: each one's pool, in status and in a scrape, shows them busy and waiting."""
    primary, standbys = cluster
    locks = [psycopg2.connect(standby.dsn()) for standby in standbys]  # advisory locks work on a standby
    held = "select 'held' from pg_advisory_xact_lock_shared(4711)"  # a read: it goes to a replica
    with concurrent.futures.ThreadPoolExecutor(12) as executor:
        try:
            for conn in locks:
                conn.autocommit = True
                conn.cursor().execute("select pg_advisory_lock(4711)")
            # 6 on each replica: 4 on its connections (max_size), 2 waiting for one
            reads = [executor.submit(_fetchval, svc, held) for _ in range(12)]

            def each_replica_full():
                return all(p["pool_size"] - p["pool_available"] == 4 and p["requests_waiting"] == 2
                           for p in pools(svc)[1:])

            wait_until(each_replica_full, message="4 reads on each replica's connections, 2 waiting")
            with svc.client(timeout=10) as db:
                status = db.status()
            scraped = scrape(svc)
        finally:
            for conn in locks:
                conn.close()  # the held reads go on
    assert [read.result() for read in reads] == ["held"] * 12
    text = format_status(status)
    figures = status["pools"]
    assert [(p["name"], p["role"]) for p in figures] == [("pool", "primary"), ("replica1", "replica"),
                                                       ("replica2", "replica")]
    assert [p["dsn"] for p in figures] == [host["dsn"] for host in status["hosts"]]
    assert {key: figures[0][key] for key in figures[0] if key not in ("name", "role", "dsn")} == {
        key: status[key] for key in figures[0] if key not in ("name", "role", "dsn")
    }  # the top-level figures are the primary's, as ever
    for pool in figures[1:]:
        name = pool["name"]
        assert pool["database_reachable"] is True and pool["connections_num"] >= 4
        assert pool_sample(scraped, "dbservice_pool_connections", name, state="busy") == 4
        assert pool_sample(scraped, "dbservice_jobs_waiting", name) == 2
        assert pool_sample(scraped, "dbservice_pool_connections_opened_total", name) == pool["connections_num"]
        assert pool_sample(scraped, "dbservice_pool_max_connections", name) == 4
        assert pool_sample(scraped, "dbservice_pool_wait_seconds_count", name) >= 2
        assert "\n  %-12s %d open (min 2, max 4), 0 idle, 2 jobs waiting for one\n" % (name, pool["pool_size"]) in text
    assert pool_sample(scraped, "dbservice_jobs_waiting", "pool") == figures[0]["requests_waiting"]


def _fetchval(svc, sql):
    with svc.client(timeout=30) as db:
        return db.fetchval(sql)


def test_a_select_that_writes_is_rerun_on_the_primary(cluster, svc):
    with svc.client(timeout=30) as db:
        rerun = sum(host["jobs_rerun"] for host in hosts(svc))
        first = db.fetchval("select nextval('counter')")
        assert db.fetchval("select nextval('counter')", primary=True) == first + 1
        assert db.fetchall("select id from items for update") == [(1,)]
    # Each fresh client's disguised write went to a replica first, which refused it.
    with svc.client(timeout=30) as db:
        assert db.fetchval("select nextval('counter')") == first + 2
    assert sum(host["jobs_rerun"] for host in hosts(svc)) >= rerun + 2


def test_transactions_and_the_primary_keyword_route_by_intent(svc):
    with svc.client(timeout=30) as db:  # it writes nothing: a replica may serve each read
        assert db.fetchval("select pg_is_in_recovery()") is True
        with db.transaction(readonly=True) as tx:
            assert tx.fetchval("select pg_is_in_recovery()") is True
        with db.transaction() as tx:
            assert tx.fetchval("select pg_is_in_recovery()") is False
    with svc.client(timeout=30) as db:
        assert db.fetchval("select pg_is_in_recovery()", primary=True) is False


def test_each_client_reads_its_own_writes_whichever_host_serves_it(cluster, svc):
    """4000 write-then-read pairs from 16 clients: not one read misses its client's write."""
    _write_then_read(cluster[0], svc, pairs_per_client=250, first_client=1000)


@pytest.mark.slow
def test_ten_thousand_write_then_read_pairs_see_every_write(cluster, svc):
    _write_then_read(cluster[0], svc, pairs_per_client=625, first_client=2000)


def _write_then_read(primary, svc, pairs_per_client, first_client):
    """16 clients each write a row, then read it back twice; no read may miss it."""
    stale, from_replicas = [], collections.Counter()
    lock = threading.Lock()

    def client(number):
        with svc.client(timeout=30) as db:
            for n in range(pairs_per_client):
                db.execute("insert into ryw values (%s, %s)", [number, n])
                for _ in range(2):
                    seen, port = db.fetchone(
                        "select coalesce(max(n), -1), %s from ryw where client = %%s" % PORT, [number]
                    )
                    with lock:
                        if seen != n:
                            stale.append((number, n, seen, port))
                        if port != primary.port:
                            from_replicas[port] += 1

    threads = [threading.Thread(target=client, args=(first_client + number,)) for number in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stale == []
    assert sum(from_replicas.values()) > 0, "no read reached a replica: the test proves nothing"


def _read_ports(svc, reads=40):
    with svc.client(timeout=30) as db:
        return collections.Counter(db.fetchval("select %s" % PORT) for _ in range(reads))


def test_a_killed_replica_stops_getting_reads_and_rejoins(cluster, svc):
    _, standbys = cluster
    victim = standbys[0]
    answers = []

    def in_flight():
        with svc.client(timeout=30) as db:
            answers.append(db.fetchval("select 'answered' from pg_sleep(1)"))

    # 6 on each replica: 4 running (max_size), 2 waiting for a connection
    readers = [threading.Thread(target=in_flight) for _ in range(12)]
    for thread in readers:
        thread.start()
    wait_until(lambda: sum(host["jobs_in_flight"] for host in hosts(svc)[1:]) == 12, message="reads in flight")
    os.kill(victim.server_pid, signal.SIGKILL)
    victim.process.wait()
    try:
        for thread in readers:
            thread.join(10)  # not the pool's 30 s timeout: the waiting ones move to the primary at once
        assert answers == ["answered"] * 12  # those on the killed replica ran again, on the primary
        wait_until(lambda: not hosts(svc)[1]["healthy"], timeout=3, message="the killed replica to be seen down")
        assert victim.port not in _read_ports(svc)
        _shows_unreachable(svc, "replica1")
    finally:
        wait_until(_restarted(victim), timeout=30, message="the replica to restart")
    wait_until(lambda: hosts(svc)[1]["healthy"] and victim.port in _read_ports(svc), timeout=15,
               message="the replica to serve reads again")


def _shows_unreachable(svc, name):
    """*name*'s pool shows in status, its text and a scrape as unreachable, with its failed attempts."""
    def down():
        with svc.client(timeout=10) as db:
            status = db.status()
        return None if _named(status, name)["database_reachable"] else status

    status = wait_until(down, timeout=5, message="%s's pool to say it is unreachable" % name)
    pool = _named(status, name)
    assert pool["pool_size"] == 0 and pool["connections_errors"] >= 1 and pool["last_error"]
    assert status["database_reachable"] is True  # the primary's
    scraped = scrape(svc)
    assert pool_sample(scraped, "dbservice_pool_connection_errors_total", name) >= 1
    assert pool_sample(scraped, "dbservice_pool_connections_lost_total", name) >= 1
    assert pool_sample(scraped, "dbservice_pool_connections", name, state="idle") == 0
    assert scraped[("dbservice_host_healthy", (("host", name), ("role", "replica")))] == 0
    assert "\n  %-12s 0 open (min 2, max 4), 0 idle" % name in format_status(status)
    assert "UNREACHABLE" in [line for line in format_status(status).splitlines() if line.startswith("  " + name)][0]


def _named(status, name):
    return [pool for pool in status["pools"] if pool["name"] == name][0]


def _restarted(standby):
    def attempt():
        try:
            standby.start()  # fails while the killed postmaster's backends still hold its memory
        except RuntimeError:
            return False
        return standby.streaming()
    return attempt


def test_a_paused_replica_stops_getting_reads_and_rejoins(cluster, tmp_path_factory):
    primary, standbys = cluster
    directory = tmp_path_factory.mktemp("p")
    os.chmod(directory, 0o700)
    paused = standbys[1]
    with start(primary, standbys, str(directory / "s.sock"), max_replica_lag=0.5) as svc:
        control = psycopg2.connect(paused.dsn())
        control.autocommit = True
        with control.cursor() as cur:
            cur.execute("select pg_wal_replay_pause()")
        try:
            with svc.client(timeout=30) as db:
                def lagging():
                    db.execute("insert into ryw values (-3, 0)")  # the primary moves on without it
                    return (hosts(svc)[2]["lag_s"] or 0) > 0.5
                wait_until(lagging, timeout=5, message="the paused replica to lag")
            assert paused.port not in _read_ports(svc)
        finally:
            with control.cursor() as cur:
                cur.execute("select pg_wal_replay_resume()")
            control.close()
        wait_until(lambda: paused.port in _read_ports(svc), timeout=10, message="the replica to serve reads again")


def test_a_paused_primary_has_no_connection_of_the_daemon_and_replicas_serve_reads_on(cluster, tmp_path_factory):
    primary, standbys = cluster
    directory = tmp_path_factory.mktemp("pp")
    os.chmod(directory, 0o700)
    tagged = psycopg2.extensions.make_dsn(primary.dsn(), application_name="paused_primary")
    replicas = tuple(standby.dsn() for standby in standbys)
    admin = psycopg2.connect(primary.dsn())
    admin.autocommit = True

    def daemons_connections():
        with admin.cursor() as cur:
            cur.execute("select count(*) from pg_stat_activity where application_name = 'paused_primary'")
            return cur.fetchone()[0]

    try:
        with dbservice.DBService(tagged, socket=str(directory / "s.sock"), replicas=replicas, max_size=4,
                                 max_replica_lag=0.5).start() as svc:
            wait_until(lambda: polled(svc), message="the replicas to be polled")
            assert daemons_connections() > 0
            with svc.client(timeout=30) as db, db.listen("on the primary") as subscription:
                with admin.cursor() as cur:  # the listening connection is the primary's
                    cur.execute("select count(*) from pg_stat_activity where application_name = 'paused_primary'"
                                " and query like 'LISTEN%%'")
                    assert cur.fetchone()[0] == 1
                figures = db.pause(10)
                assert (figures["pause"], figures["connections_open"]) == ("paused", 0), figures
                # at once: the poller's connection, the pool's and LISTEN's are all gone when it says so
                assert daemons_connections() == 0
                # the replicas have replayed all that was written before the pause: they serve on, however long
                wait_until(lambda: all(host["lag_s"] > 0.5 for host in hosts(svc)[1:]), timeout=5,
                           message="the pause to outlast max_replica_lag")
                assert db.fetchval("select %s" % PORT, timeout=5) in [standby.port for standby in standbys]
                db.resume()
                assert db.execute("insert into ryw values (-4, 0)") == 1
                assert isinstance(subscription.receive(10), dbservice.NotificationsLost)
                db.notify("on the primary", "heard again")
                assert subscription.receive(10).payload == "heard again"
    finally:
        admin.close()


def test_a_partitioned_replica_stops_getting_reads_and_rejoins(cluster, tmp_path_factory):
    primary, standbys = cluster
    directory = tmp_path_factory.mktemp("n")
    os.chmod(directory, 0o700)
    cut = standbys[0]
    proxy = TcpProxy("127.0.0.1", cut.port)
    proxy.start()
    try:
        replicas = [proxy.dsn(user="postgres", dbname="test"), standbys[1]]
        with start(primary, replicas, str(directory / "s.sock")) as svc:
            wait_until(lambda: cut.port in _read_ports(svc), message="reads through the link")
            proxy.stall()  # the link forwards nothing: the poller's query gets no answer
            wait_until(lambda: not hosts(svc)[1]["healthy"], timeout=3, message="the partition to be seen")
            assert cut.port not in _read_ports(svc)
            proxy.resume()
            wait_until(lambda: hosts(svc)[1]["healthy"] and cut.port in _read_ports(svc), timeout=15,
                       message="the replica to serve reads again")
    finally:
        proxy.close()


def test_with_the_primary_down_writes_fail_clearly_and_replicas_serve_reads(tmp_path_factory):
    directory = tmp_path_factory.mktemp("d")
    os.chmod(directory, 0o700)
    with Cluster.temporary() as primary:
        standby = primary.standby()
        try:
            wait_until(standby.streaming, timeout=30, message="the standby to stream")
            with start(primary, [standby], str(directory / "s.sock")) as svc:
                primary.shut_down()
                with svc.client(timeout=30) as db:
                    with pytest.raises(dbservice.ServiceUnavailable, match="unreachable"):
                        db.execute("create table lost (x int)", timeout=1)
                    assert [db.fetchval("select %s" % PORT) for _ in range(20)] == [standby.port] * 20
                primary.start()
                wait_until(lambda: hosts(svc)[0]["healthy"], timeout=20, message="the primary to be back")
                with svc.client(timeout=30) as db:
                    assert db.execute("create table back (x int)") == -1
        finally:
            standby.stop()
