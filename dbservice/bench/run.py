"""One run of the comparison: the database, every strategy on every workload, the figures."""

import contextlib
import dataclasses
import importlib.resources

import psycopg2

from .. import loops
from ..embedded import Cluster
from ..errors import Error
from . import report
from .machine import describe_machine
from .progress import Progress
from .results import NotMeasured, summarize
from .sampler import ConnectionSampler
from .strategies import STRATEGIES
from .workloads import WORKLOADS

#: The file of this package that creates and fills ``bench_accounts``.
ACCOUNTS_SQL = "accounts.sql"
#: Server connections beyond the most clients of a workload: pools, the sampler, superusers.
SPARE_CONNECTIONS = 50


@dataclasses.dataclass
class Plan:
    """How long and how wide every cell runs."""

    #: seconds measured per cell, after the warm-up
    duration: float = 5.0
    warmup: float = 1.0
    #: client threads of the workloads that do not set their own
    clients: int = 64
    #: client processes the threads are spread over
    processes: int = 8
    #: server connections of dbservice's pool and of PgBouncer's
    pool_size: int = 8
    #: accounts in bench_accounts
    rows: int = 100_000
    #: dbservice's event loop (its ``selector`` setting)
    loop: str = "auto"
    #: times every cell runs, in turns; each cell's best round is its result
    rounds: int = 1

    def clients_for(self, workload):
        return workload.clients or self.clients

    @property
    def max_clients(self):
        return max(self.clients_for(workload) for workload in WORKLOADS)


#: --quick: a smoke run of every cell, about a minute on 2 cores.
QUICK = {"duration": 0.5, "warmup": 0.25, "rows": 10_000}


def run(plan, dsn=None, strategies=STRATEGIES, workloads=WORKLOADS):
    """Run *strategies* on *workloads*; return the report (the ``--json`` document).

    Without *dsn* a throwaway PostgreSQL is started. A strategy that cannot run
    here, or a cell that could not be measured, is absent with a note. With
    ``plan.rounds`` above 1 every cell runs that many times, strategy after
    strategy, and keeps its best round: other load on the machine only ever
    slows a cell down, so the best round is the one it disturbed least. A
    progress bar goes to stderr.
    """
    notes, runnable = [], []
    for strategy in strategies:
        reason = strategy.skip_reason()
        if reason:
            notes.append(_note(strategy, None, "skipped: " + reason))
        else:
            runnable.append(strategy)
    cells = sum(len(_cells(s, workloads)) for s in runnable)
    progress = Progress(plan.rounds * cells)
    measured = []
    with database(plan, dsn) as dsn:
        machine = describe_machine(dsn)
        machine["dbservice_loop"] = loops.resolve(plan.loop)
        for _ in range(plan.rounds):
            for strategy in runnable:
                rows, strategy_notes = _run_strategy(strategy, workloads, plan, dsn, progress)
                measured += rows
                notes += [note for note in strategy_notes if note not in notes]
    progress.close()
    results = best_rounds(measured)
    return {
        "machine": machine,
        "plan": dataclasses.asdict(plan),
        "results": results,
        "rounds": measured if plan.rounds > 1 else [],
        "notes": notes,
        "ratios": report.ratios(results),
        "layers": report.layers(results),
        "targets": report.targets(results, plan),
    }


def _run_strategy(strategy, workloads, plan, dsn, progress):
    """Start what *strategy* needs and run its cells once: (rows, notes)."""
    mine = _cells(strategy, workloads)
    rows, notes, done = [], [], 0
    progress.begin("%s: starting" % strategy.name)
    try:
        with strategy.serving(dsn, plan) as target:
            for workload in mine:
                progress.begin("%s / %s" % (strategy.name, workload.name))
                row, cell_notes = _run_cell(strategy, target, workload, plan, dsn)
                rows += [row] if row else []
                notes += cell_notes
                done += 1
                progress.end()
    except (NotMeasured, Error) as exc:
        notes.append(_note(strategy, None, "not measured: %s" % exc))
        progress.end(len(mine) - done)
    return rows, notes


def best_rounds(rows):
    """Each cell's row with the most queries per second, in the order the cells first ran."""
    best = {}
    for row in rows:
        cell = (row["strategy"], row["workload"])
        if cell not in best or row["qps"] > best[cell]["qps"]:
            best[cell] = row
    return list(best.values())


def _cells(strategy, workloads):
    """The workloads *strategy* runs: those that run it, of those it runs."""
    return [w for w in workloads if w.runs(strategy.name) and strategy.runs(w.name)]


def _run_cell(strategy, target, workload, plan, dsn):
    """Measure one cell; return its row (None if it could not be measured) and its notes."""
    clients = plan.clients_for(workload)
    sampler = ConnectionSampler(dsn, delay=plan.warmup)
    try:
        samples = strategy.measure(target, workload, clients, plan, started=sampler.start)
    except NotMeasured as exc:
        return None, [_note(strategy, workload, "not measured: %s" % exc)]
    finally:
        sampler.stop()
    row = {"strategy": strategy.name, "workload": workload.name, "clients": clients}
    row.update(summarize(samples, plan.duration, mixed=workload.mixed))
    row["server_connections"] = sampler.peak
    notes = []
    if samples.first_error:
        notes.append(_note(strategy, workload, "first error: " + samples.first_error))
    if sampler.failure:
        notes.append(_note(strategy, workload, "server connections not counted: " + sampler.failure))
    return row, notes


def _note(strategy, workload, text):
    note = {"strategy": strategy.name, "note": text}
    if workload is not None:
        note["workload"] = workload.name
    return note


@contextlib.contextmanager
def database(plan, dsn=None):
    """Yield the DSN of a database holding ``bench_accounts``: *dsn*, or a throwaway PostgreSQL.

    The throwaway one allows enough connections for every strategy at the
    plan's widest workload (one per client thread, for the strategies
    without a pool).
    """
    if dsn is not None:
        load_accounts(dsn, plan.rows)
        yield dsn
        return
    with Cluster.temporary(max_connections=plan.max_clients + SPARE_CONNECTIONS) as server:
        dsn = server.dsn()
        load_accounts(dsn, plan.rows)
        yield dsn


def load_accounts(dsn, rows):
    """(Re)create ``bench_accounts`` with *rows* accounts from accounts.sql, beside this module."""
    sql = importlib.resources.files(__package__).joinpath(ACCOUNTS_SQL).read_text(encoding="utf-8")
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql, {"rows": rows})
    finally:
        conn.close()
