"""``python -m dbservice.bench --replicas N``: a read-heavy load on the primary alone and with N replicas.

One throwaway primary and N streaming standbys of it; then, in turns, a
daemon on the primary alone and one on the primary plus the standbys, under
the same load: client processes whose threads each run 90% point reads and
10% single-row updates of a table of accounts. For each turn: queries per
second, p50 and p99 of reads and of writes, and which host served the reads.
On one machine the replicas share its CPUs with the primary, the daemon and
the clients, so the gain is bounded by the cores there are.
"""

import collections
import concurrent.futures
import os
import random
import tempfile
import time

import psycopg2

import dbservice
from dbservice.embedded import Cluster

from .strategies import DAEMON_SETTINGS

READ = "select balance, current_setting('port')::int from bench_replica_accounts where id = %s"
WRITE = "update bench_replica_accounts set balance = balance + 1 where id = %s"
WRITE_SHARE = 0.1
STREAM_TIMEOUT = 60.0


def run(replicas, seconds, processes, threads, rows, rounds, pool_size):
    """Measure; return the report's text."""
    primary = Cluster.temporary(max_connections=200)
    standbys = []
    try:
        _create_accounts(primary.dsn(), rows)
        for _ in range(replicas):
            standbys.append(primary.standby())
        _wait_streaming(standbys)
        lines = [
            "%d%% point reads, %d%% updates, %d rows; %d processes x %d threads; pool %d per host; "
            "%.0f s per turn; %d CPUs" % (
                100 - 100 * WRITE_SHARE, 100 * WRITE_SHARE, rows, processes, threads, pool_size, seconds,
                os.cpu_count(),
            ),
            "%-22s %8s %9s %9s %9s %9s  %s" % ("", "queries/s", "read p50", "read p99", "write p50", "write p99",
                                              "reads per host"),
        ]
        names = {primary.port: "primary"}
        names.update({standby.port: "replica%d" % n for n, standby in enumerate(standbys, 1)})
        for _ in range(rounds):
            for with_replicas in (False, True):
                dsns = tuple(standby.dsn() for standby in standbys) if with_replicas else ()
                figures = _turn(primary.dsn(), dsns, seconds, processes, threads, rows, pool_size)
                label = "primary + %d replicas" % replicas if with_replicas else "primary alone"
                lines.append(_line(label, figures, names))
        return "\n".join(lines) + "\n"
    finally:
        for standby in standbys:
            standby.stop()
        primary.stop()


def _create_accounts(dsn, rows):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("create table bench_replica_accounts (id int primary key, balance bigint not null)")
        cursor.execute("insert into bench_replica_accounts select g, 0 from generate_series(1, %s) g", [rows])
        cursor.execute("vacuum analyze bench_replica_accounts")
    conn.close()


def _wait_streaming(standbys):
    deadline = time.monotonic() + STREAM_TIMEOUT
    while not all(standby.streaming() for standby in standbys):
        if time.monotonic() > deadline:
            raise RuntimeError("the standbys did not stream within %.0f s" % STREAM_TIMEOUT)
        time.sleep(0.05)


def _turn(dsn, replicas, seconds, processes, threads, rows, pool_size):
    directory = tempfile.mkdtemp(prefix="dbsr-")
    socket = os.path.join(directory, "s.sock")
    with dbservice.DBService(
        dsn, socket=socket, replicas=replicas, min_size=pool_size, max_size=pool_size, **DAEMON_SETTINGS
    ) as svc:
        if replicas:
            _wait_polled(svc)
        with concurrent.futures.ProcessPoolExecutor(processes) as pool:
            futures = [
                pool.submit(_client_process, socket, svc.authkey, seconds, threads, rows, seed)
                for seed in range(processes)
            ]
            parts = [future.result() for future in futures]
    os.rmdir(directory)
    reads = sorted(latency for part in parts for latency in part["reads"])
    writes = sorted(latency for part in parts for latency in part["writes"])
    hosts = collections.Counter()
    for part in parts:
        hosts.update(part["hosts"])
    return {"qps": (len(reads) + len(writes)) / seconds, "reads": reads, "writes": writes, "hosts": hosts}


def _wait_polled(svc):
    deadline = time.monotonic() + STREAM_TIMEOUT
    with svc.client(timeout=10) as db:
        while not all(host["lag_s"] is not None for host in db.status()["hosts"]):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not see the replicas within %.0f s" % STREAM_TIMEOUT)
            time.sleep(0.05)


def _client_process(socket, authkey, seconds, threads, rows, seed):
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(
            lambda n: _client_thread(socket, authkey, seconds, rows, seed * 1000 + n), range(threads)
        ))
    return {
        "reads": [x for part in parts for x in part["reads"]],
        "writes": [x for part in parts for x in part["writes"]],
        "hosts": sum((part["hosts"] for part in parts), collections.Counter()),
    }


def _client_thread(socket, authkey, seconds, rows, seed):
    chance = random.Random(seed)
    reads, writes, hosts = [], [], collections.Counter()
    with dbservice.connect(socket=socket, authkey=authkey, timeout=30) as db:
        end = time.perf_counter() + seconds
        while True:
            began = time.perf_counter()
            if began >= end:
                break
            account = chance.randint(1, rows)
            if chance.random() < WRITE_SHARE:
                db.execute(WRITE, [account])
                writes.append(time.perf_counter() - began)
            else:
                _, port = db.fetchone(READ, [account])
                reads.append(time.perf_counter() - began)
                hosts[port] += 1
    return {"reads": reads, "writes": writes, "hosts": hosts}


def _line(label, figures, names):
    reads, writes = figures["reads"], figures["writes"]
    total = sum(figures["hosts"].values()) or 1
    spread = ", ".join(
        "%s %.0f%%" % (names.get(port, port), 100.0 * count / total)
        for port, count in sorted(figures["hosts"].items(), key=lambda item: names.get(item[0], ""))
    )
    return "%-22s %8.0f %8.2fms %8.2fms %8.2fms %8.2fms  %s" % (
        label, figures["qps"], _ms(reads, 0.5), _ms(reads, 0.99), _ms(writes, 0.5), _ms(writes, 0.99), spread,
    )


def _ms(latencies, quantile):
    if not latencies:
        return float("nan")
    return 1000.0 * latencies[min(len(latencies) - 1, int(quantile * len(latencies)))]
