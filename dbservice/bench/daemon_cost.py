"""python -m dbservice.bench.daemon_cost: what the daemon itself costs.

The comparison in ``python -m dbservice.bench`` is end to end. This measures
the daemon alone, for the performance work: its CPU time per job under point
reads from 8 processes x 8 threads (from /proc, user + system, divided by the
jobs done), the queries per second meanwhile, and its resident memory with no
client and with 1,000 idle client connections. PgBouncer, where installed,
is measured the same way in the same run, its clients being psycopg2
connections: what the same place in the path costs a proxy written in C.
"""

import asyncio
import contextlib
import multiprocessing
import os
import random
import tempfile
import threading
import time

import click

import dbservice
from dbservice import loops

from . import pgbouncer
from .connectors import ClientConnector, DirectConnector
from .run import Plan, database
from .strategies import DAEMON_SETTINGS
from .workloads import POINT_READ

PROCESSES = 8
THREADS = 8
IDLE_CLIENTS = 1000
#: The targets: the daemon's CPU per query over PgBouncer's, and its memory with IDLE_CLIENTS.
CPU_TARGET = 1.5
MEMORY_TARGET_MB = 100


def cpu_seconds(pid):
    """CPU time of every thread of process *pid*, in seconds, to the nanosecond the scheduler counts."""
    total = 0
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, task)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended between the listing and the read
    return total / 1e9


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _client_process(connector, rows, seconds, counts):
    done = []
    stop = time.monotonic() + seconds

    def run():
        rng, n = random.Random(), 0
        session = connector.open_thread()
        session.open()
        while time.monotonic() < stop:
            session.query(POINT_READ.sql, [rng.randint(1, rows)])
            n += 1
        session.close()
        done.append(n)

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts.put(sum(done))


def load(pid, connector, rows, seconds):
    """Point reads through *connector* for *seconds*; (queries per second, CPU us per query of process *pid*)."""
    ctx = multiprocessing.get_context("fork")
    counts = ctx.Queue()
    workers = [
        ctx.Process(target=_client_process, args=(connector, rows, seconds, counts)) for _ in range(PROCESSES)
    ]
    cpu_before, started = cpu_seconds(pid), time.monotonic()
    for worker in workers:
        worker.start()
    jobs = sum(counts.get(timeout=seconds + 60) for _ in workers)
    for worker in workers:
        worker.join()
    elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu_before
    return jobs / elapsed, cpu / jobs * 1e6


def _round(name, pid, connector, rows, seconds):
    qps, micros = load(pid, connector, rows, seconds)
    click.echo("  %s: %.0f queries/s, its CPU %.1f us per query (load average %.1f)" % (name, qps, micros, os.getloadavg()[0]))
    return micros


async def _hold_idle_clients(service, count):
    clients = [await dbservice.connect_async(service.socket, service.authkey) for _ in range(count)]
    try:
        return rss_mib(service.process.pid)
    finally:
        for client in clients:
            await client.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--loop",
    type=click.Choice(["auto", "epoll", "select", "uvloop"]),
    default="auto",
    show_default=True,
    help="The daemon's event loop.",
)
@click.option(
    "--seconds", type=click.FloatRange(1), default=6.0, show_default=True, help="Seconds per round."
)
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True, help="Rounds of load.")
@click.option("--dsn", metavar="DSN", help="Use this database instead of a throwaway PostgreSQL.")
def main(loop, seconds, rounds, dsn):
    """What the daemon itself costs: CPU per job, and memory.

    Point reads from 8 processes x 8 threads of the sync client through a
    daemon with 8 connections, and the same through PgBouncer with 8 server
    connections and psycopg2 clients, if it is installed, in turns: for each
    round, the queries per second and the proxy's CPU time (user + system)
    divided by the jobs done. Then the daemon's resident memory with no
    client, and with 1,000 idle client connections; then the targets, from
    the best round of each.
    """
    plan = Plan()
    with database(plan, dsn) as dsn, tempfile.TemporaryDirectory(prefix="dbservice-cost-") as directory:
        service = dbservice.DBService(
            dsn,
            min_size=plan.pool_size,
            max_size=plan.pool_size,
            socket=os.path.join(directory, "s.sock"),
            selector=loop,
            slow_ms=0,
            **DAEMON_SETTINGS,
        )
        click.echo(
            "%d server connections; %d processes x %d threads of point reads" % (plan.pool_size, PROCESSES, THREADS)
        )
        with service, contextlib.ExitStack() as stack:
            ours = ClientConnector(service.client(timeout=60))
            load(service.process.pid, ours, plan.rows, 1.0)  # warm-up
            reason = pgbouncer.skip_reason()
            if reason:
                click.echo("  PgBouncer: skipped: %s" % reason)
                bouncer = None
            else:
                bouncer = stack.enter_context(pgbouncer.running(dsn, plan.pool_size, PROCESSES * THREADS))
                theirs = DirectConnector(bouncer.dsn, persistent=True)
            costs = {"dbservice": [], "PgBouncer": []}
            for _ in range(rounds):  # in turns: what else the machine does weighs on both alike
                costs["dbservice"].append(
                    _round("dbservice on %s" % loops.resolve(loop), service.process.pid, ours, plan.rows, seconds)
                )
                if bouncer is not None:
                    costs["PgBouncer"].append(_round("PgBouncer", bouncer.pid, theirs, plan.rows, seconds))
            idle = rss_mib(service.process.pid)
            held = asyncio.run(_hold_idle_clients(service, IDLE_CLIENTS))
        click.echo("daemon RSS: %.1f MiB, and %.1f MiB with %d idle client connections" % (idle, held, IDLE_CLIENTS))
        _judge(costs, held)


def _judge(costs, held):
    """The targets, from the best round of each (other load only ever adds CPU per query)."""
    click.echo("targets:")
    if costs["PgBouncer"]:
        ratio = min(costs["dbservice"]) / min(costs["PgBouncer"])
        click.echo(
            "  %s  the daemon's CPU per query <= %.1fx PgBouncer's: %.2fx (best rounds: %.1f against %.1f us)"
            % ("PASS" if ratio <= CPU_TARGET else "FAIL", CPU_TARGET, ratio, min(costs["dbservice"]), min(costs["PgBouncer"]))
        )
    else:
        click.echo("  N-A   the daemon's CPU per query <= %.1fx PgBouncer's: PgBouncer not measured" % CPU_TARGET)
    click.echo(
        "  %s  the daemon's RSS with %d idle clients < %d MB: %.1f MiB"
        % ("PASS" if held * 1.048576 < MEMORY_TARGET_MB else "FAIL", IDLE_CLIENTS, MEMORY_TARGET_MB, held)
    )


if __name__ == "__main__":
    main(prog_name="python -m dbservice.bench.daemon_cost")
