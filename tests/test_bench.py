"""The benchmark's own logic: percentiles, the report, pgbench's logs, the load, and a --quick run."""

import io
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from dbservice.bench import load, pgbench, pgbouncer, plot, report
from dbservice.bench.__main__ import command
from dbservice.bench.progress import Progress
from dbservice.bench.results import NotMeasured, Samples, summarize
from dbservice.bench.run import Plan, best_rounds
from dbservice.bench.workloads import FAST, POINT_READ, SLOW, WORKLOADS, WRITE, param_range

STRATEGY_NAMES = {
    "connect-per-query",
    "threadpool",
    "mp-queue-pipe",
    "dbservice",
    "dbservice-unprepared",
    "dbservice-async",
    "pgbouncer",
    "pgbench",
    "pgbench-prepared",
    "dbservice-dbapi",
    "dbservice-sqlalchemy",
    "pgbouncer-sqlalchemy",
}
#: The strategies that run on dbservice's pool, and so on its server connections alone.
DAEMON_STRATEGIES = {
    "dbservice", "dbservice-unprepared", "mp-queue-pipe", "dbservice-async", "dbservice-dbapi", "dbservice-sqlalchemy",
}
WORKLOAD_NAMES = {"point-read", "write", "slow-mix", "many-clients", "single-client"}


def samples_of(kind_latencies, errors=()):
    samples = Samples()
    for kind, values in kind_latencies.items():
        for value in values:
            samples.add(kind, value)
    for message in errors:
        samples.error(message)
    return samples


# -- percentiles and rows --------------------------------------------------------


def test_summary_is_qps_and_nearest_rank_percentiles_in_ms():
    samples = samples_of({FAST: [i / 1000.0 for i in range(100, 0, -1)]})  # 1..100 ms, unordered
    row = summarize(samples, duration=2.0)
    assert row == {"qps": 50.0, "p50_ms": 50.0, "p99_ms": 99.0, "errors": 0}


def test_p99_of_few_samples_is_the_largest_not_an_interpolation():
    row = summarize(samples_of({FAST: [0.001, 0.002, 0.010]}), duration=1.0)
    assert (row["p50_ms"], row["p99_ms"]) == (2.0, 10.0)


def test_a_mix_keeps_its_fast_queries_percentiles_apart():
    samples = samples_of({FAST: [0.001] * 95, SLOW: [0.050] * 5})
    row = summarize(samples, duration=1.0, mixed=True)
    assert (row["qps"], row["p99_ms"], row["fast_p99_ms"], row["fast_p50_ms"]) == (100.0, 50.0, 1.0, 1.0)


def test_nothing_completed_gives_no_percentiles_and_counts_the_errors():
    row = summarize(
        samples_of({}, errors=["OperationalError: too many clients"] * 3), duration=1.0, mixed=True
    )
    assert row == {
        "qps": 0.0,
        "p50_ms": None,
        "p99_ms": None,
        "errors": 3,
        "fast_p50_ms": None,
        "fast_p99_ms": None,
    }


def test_merged_samples_keep_every_latency_and_the_first_error():
    total = samples_of({FAST: [0.001]}, errors=["first"])
    total.merge(samples_of({FAST: [0.002], SLOW: [0.05]}, errors=["second"]))
    assert (total.count, total.errors, total.first_error) == (3, 2, "first")
    assert list(total.latencies[FAST]) == [0.001, 0.002]


# -- workloads -------------------------------------------------------------------


def test_workload_names_are_the_documented_ones_and_only_the_mix_is_mixed():
    assert {w.name for w in WORKLOADS} == WORKLOAD_NAMES
    assert [w.name for w in WORKLOADS if w.mixed] == ["slow-mix"]


def test_the_slow_mix_draws_about_five_percent_slow_queries_with_ids_in_range():
    mix = next(w for w in WORKLOADS if w.name == "slow-mix")
    rng = random.Random(4)
    draws = [mix.draw(rng, 1000) for _ in range(4000)]
    slow = sum(query.kind == SLOW for query, _ in draws)
    assert 120 < slow < 280
    assert all(1 <= params[0] <= 1000 for query, params in draws if query.kind == FAST)


# -- pgbench ---------------------------------------------------------------------


def test_pgbench_scripts_run_the_same_statements_with_the_same_ranges():
    assert pgbench.script(POINT_READ, 500) == (
        "\\set id random(1, 500)\nselect id, balance, owner from bench_accounts where id = :id;\n"
    )
    assert pgbench.script(WRITE, 500).splitlines() == [
        "\\set amount random(%d, %d)" % param_range("amount", 500),
        "\\set id random(1, 500)",
        "update bench_accounts set balance = balance + :amount where id = :id returning balance;",
    ]


def test_pgbench_logs_are_read_over_the_window_after_the_first_transaction(tmp_path):
    # client transaction latency_us script epoch_s epoch_us, stamped at the end
    lines = [
        "0 1 900 0 1000 0",  # the first to end: the clock starts here; in the warm-up
        "0 2 1000 0 1001 500000",  # 1.5 s in: inside the window [1.0, 3.0]
        "1 1 50000 1 1002 0",  # a slow one, inside
        "1 2 failed 0 1002 100",  # failed, inside: an error
        "0 3 2000 0 1003 500000",  # after the window
    ]
    log = tmp_path / "log.123"
    log.write_text("\n".join(lines) + "\n")
    samples = pgbench.read_logs([str(log)], [FAST, SLOW], warmup=1.0, duration=2.0)
    assert {kind: list(values) for kind, values in samples.latencies.items()} == {FAST: [0.001], SLOW: [0.05]}
    assert samples.errors == 1


def test_pgbench_logs_that_end_before_the_window_does_are_not_figures(tmp_path):
    log = tmp_path / "log.123"
    log.write_text("0 1 900 0 1000 0\n0 2 900 0 1002 0\n")
    with pytest.raises(NotMeasured, match="stopped 1.0 s before the window ended"):
        pgbench.read_logs([str(log)], [FAST], warmup=1.0, duration=2.0)


# -- the report ------------------------------------------------------------------


def row(strategy, workload, qps, p50=1.0, p99=2.0, **extra):
    result = {
        "strategy": strategy,
        "workload": workload,
        "clients": 64,
        "qps": qps,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": 0,
        "server_connections": 8,
    }
    result.update(extra)
    return result


RESULTS = [
    row("connect-per-query", "point-read", 400.0),
    row("threadpool", "point-read", 20000.0),
    row("dbservice", "point-read", 10000.0, p99=4.0),
    row("pgbouncer", "point-read", 12500.0),
    row("dbservice", "slow-mix", 3000.0, p99=60.0, fast_p50_ms=2.0, fast_p99_ms=16.0),
    row("threadpool", "single-client", 9000.0, p50=0.1),
    row("dbservice", "single-client", 4000.0, p50=0.2),
]


def test_ratios_are_dbservice_qps_over_each_other_strategy_per_workload():
    assert report.ratios(RESULTS) == {
        "point-read": {
            "dbservice/connect-per-query": 25.0,
            "dbservice/threadpool": 0.5,
            "dbservice/pgbouncer": 0.8,
        },
        "single-client": {"dbservice/threadpool": 0.444},
    }


def test_layers_are_each_layers_qps_over_the_one_it_rides_on():
    results = RESULTS + [
        row("dbservice-dbapi", "point-read", 9000.0),
        row("dbservice-sqlalchemy", "point-read", 4500.0),
        row("pgbouncer-sqlalchemy", "point-read", 5000.0),
    ]
    assert report.layers(results) == {
        "point-read": {
            "dbservice-dbapi/dbservice": 0.9,
            "dbservice-sqlalchemy/dbservice-dbapi": 0.5,
            "pgbouncer-sqlalchemy/pgbouncer": 0.4,
            "dbservice-sqlalchemy/pgbouncer-sqlalchemy": 0.9,
        }
    }
    text = report.format_report(dict(DOCUMENT, results=results, layers=report.layers(results)))
    assert "point-read     SQLAlchemy Core: on dbservice / on PgBouncer" in text and text.count("0.90x") == 2


def test_targets_say_pass_fail_or_not_measured_with_the_measured_value():
    verdicts = [(t["verdict"], t["value"]) for t in report.targets(RESULTS, Plan())]
    assert verdicts == [("PASS", 25.0), ("FAIL", 0.8), ("N-A", None), ("FAIL", 2.0), ("FAIL", 4.0)]
    without_bouncer = [r for r in RESULTS if r["strategy"] != "pgbouncer"]
    assert report.targets(without_bouncer, Plan())[1]["verdict"] == "N-A"


def test_the_pgbouncer_target_is_not_judged_at_another_concurrency():
    target = report.targets(RESULTS, Plan(clients=16))[1]
    assert target["verdict"] == "N-A" and "16 client threads" in target["detail"]


DOCUMENT = {
    "machine": {
        "date": "2026-11-21 08:00 UTC",
        "cores": 2,
        "cpu_model": "AMD EPYC",
        "memory_gib": 23.5,
        "load_average": 0.5,
        "os": "Linux",
        "python": "3.11.7",
        "psycopg2": "2.9.13",
        "postgresql": "15.18",
        "pgbouncer": None,
        "pgbench": "pgbench (PostgreSQL) 15.18",
        "dbservice_loop": "epoll",
    },
    "plan": {
        "warmup": 1.0,
        "duration": 5.0,
        "clients": 64,
        "processes": 4,
        "pool_size": 8,
        "rows": 100000,
    },
    "command": "python -m dbservice.bench",
    "results": RESULTS,
    "notes": [{"strategy": "pgbench", "note": "skipped: no pgbench binary on PATH"}],
    "ratios": report.ratios(RESULTS),
    "targets": report.targets(RESULTS, Plan()),
}


def test_the_text_report_has_the_header_table_headline_and_targets():
    text = report.format_report(DOCUMENT)
    assert (
        "2 cores, AMD EPYC" in text
        and "load average 0.5 before the run" in text
        and "PostgreSQL 15.18" in text
        and "Python 3.11.7" in text
        and "; dbservice on epoll" in text
    )
    assert "command: python -m dbservice.bench" in text
    assert "pgbench: skipped: no pgbench binary on PATH" in text
    assert "dbservice / PgBouncer            0.80x" in text
    assert "dbservice / pgbench              n/a" in text
    assert "PASS  dbservice >= 20x connect-per-query on point reads: 25.00x" in text
    table = report.format_table(RESULTS)
    assert len({len(line) for line in table[:2]}) == 1  # header and first row aligned
    assert table[5].split()[:4] == ["slow-mix", "dbservice", "64", "3000"] and "16.00" in table[5]


def test_the_plot_draws_throughput_and_p99_side_by_side(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional [plot] extra")
    path = tmp_path / "bench.png"
    plot.plot(DOCUMENT, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_printed_command_reruns_the_plan_without_the_password():
    line = command(Plan(duration=2.0), "host=db port=5433 dbname=x user=u password=secret", (), ("write",))
    assert "secret" not in line
    assert line.startswith(
        "python -m dbservice.bench --dsn 'dbname=x host=db port=5433 user=u' --scale 100000"
    )
    assert "--duration 2 " in line and line.endswith("--workload write")


def test_with_rounds_each_cell_keeps_its_best_round_and_the_command_says_so():
    rounds = [
        row("dbservice", "point-read", 9000.0, p50=3.0),
        row("threadpool", "point-read", 20000.0),
        row("dbservice", "point-read", 11000.0, p50=2.5),
        row("threadpool", "point-read", 15000.0),
    ]
    best = best_rounds(rounds)
    cells = [(r["strategy"], r["qps"], r["p50_ms"]) for r in best]
    assert cells == [("dbservice", 11000.0, 2.5), ("threadpool", 20000.0, 1.0)]
    assert "--rounds 3" in command(Plan(rounds=3), None, (), ())
    assert "--rounds" not in command(Plan(), None, (), ())
    text = report.format_report(dict(DOCUMENT, plan=dict(DOCUMENT["plan"], rounds=3)))
    assert "5 s measured, the best of 3 rounds in turns;" in text


def test_progress_off_a_terminal_is_one_plain_line_per_cell():
    stream = io.StringIO()
    progress = Progress(4, stream)
    progress.begin("dbservice / write")
    progress.end(3)
    progress.close()
    first, last = stream.getvalue().splitlines()
    assert first.startswith("[------------------------] 0/4 0m00s dbservice / write")
    assert last.startswith("[##################------] 3/4 ") and last.endswith(" done")


# -- the load --------------------------------------------------------------------


class FakeConnector:
    """Client threads whose queries take *delay* seconds, or fail, or never end."""

    is_async = False

    def __init__(self, delay=0.001, fail=False, broken=False):
        self.delay, self.fail, self.broken = delay, fail, broken

    def open_thread(self):
        if self.broken:
            raise RuntimeError("cannot open")
        return self

    def open(self):
        pass

    def query(self, sql, params):
        time.sleep(self.delay)
        if self.fail:
            raise ValueError("no such table")

    def close(self):
        pass


QUICK_PLAN = Plan(duration=0.3, warmup=0.1, processes=2, rows=10)


def test_client_threads_are_spread_evenly_over_the_processes():
    assert load.split(64, 4) == [16, 16, 16, 16]
    assert load.split(10, 4) == [3, 3, 2, 2]
    assert load.split(1, 4) == [1]


def test_the_load_times_the_queries_of_the_window_only():
    samples = load.measure(FakeConnector(delay=0.005), WORKLOADS[0], 4, QUICK_PLAN)
    latencies = samples.latencies[FAST]
    # 4 threads, 5 ms a query, 0.3 s measured: at most 240 completions
    assert 100 < len(latencies) <= 4 * 0.3 / 0.005 + 4
    assert min(latencies) >= 0.005 and samples.errors == 0


def test_failed_queries_are_counted_with_the_first_message_warm_up_included():
    plan = Plan(duration=0.1, warmup=0.5, processes=1, rows=10)
    samples = load.measure(FakeConnector(delay=0.05, fail=True), WORKLOADS[0], 1, plan)
    assert samples.count == 0 and samples.first_error == "ValueError: no such table"
    assert samples.errors >= 8  # 0.6 s at 60 ms a failure, most of it warm-up


def test_a_client_that_cannot_start_fails_the_cell_with_its_reason():
    with pytest.raises(NotMeasured, match="RuntimeError: cannot open"):
        load.measure(FakeConnector(broken=True), WORKLOADS[0], 2, QUICK_PLAN)


def test_a_hung_client_fails_the_cell_instead_of_hanging_the_bench(monkeypatch):
    monkeypatch.setattr(load, "REPORT_GRACE", 0.5)
    started = time.monotonic()
    with pytest.raises(NotMeasured, match="hangs"):
        load.measure(FakeConnector(delay=3600), WORKLOADS[0], 2, QUICK_PLAN)
    assert time.monotonic() - started < 10


# -- the whole bench -------------------------------------------------------------


#: Seconds the --quick run may take. Every cell of every strategy runs in it:
#: 40.5 s before the DB-API and SQLAlchemy strategies (PgBouncer's skipped, as
#: in CI), 53 s with them and with PgBouncer's (load average 3 to 6), 69 s
#: with the prepared and unprepared cells too (load average 5), 91-98 s with
#: other test runs on the machine (load average 10 to 28).
QUICK_LIMIT = 120


@pytest.mark.bench
@pytest.mark.timeout(150)
def test_the_quick_run_compares_every_strategy_and_writes_the_json(tmp_path):
    path = tmp_path / "bench.json"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dbservice.bench", "--quick", "--json", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=140,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < QUICK_LIMIT, "the --quick run took %.0f s" % elapsed
    document = json.loads(path.read_text())
    assert set(document) >= {"machine", "results", "ratios", "targets", "notes"}
    assert {"cores", "cpu_model", "load_average", "postgresql", "python", "date"} <= set(document["machine"])
    assert document["machine"]["dbservice_loop"] == "uvloop"  # "auto", with the test extra's uvloop
    assert "; dbservice on uvloop" in result.stdout
    measured = {(r["strategy"], r["workload"]) for r in document["results"]}
    skipped = {note["strategy"] for note in document["notes"] if note["note"].startswith("skipped")}
    assert {strategy for strategy, _ in measured} | skipped == STRATEGY_NAMES
    assert {workload for _, workload in measured} == WORKLOAD_NAMES
    for r in document["results"]:
        assert set(r) >= {"strategy", "workload", "qps", "p50_ms", "p99_ms", "errors", "server_connections"}
        if r["strategy"] in DAEMON_STRATEGIES:
            assert r["qps"] > 0, r
            assert r["server_connections"] <= 8, r  # the pool, and nothing else
    assert "dbservice/connect-per-query" in document["ratios"]["point-read"]
    assert "targets:" in result.stdout and "command: python -m dbservice.bench" in result.stdout


@pytest.mark.bench
@pytest.mark.timeout(120)
def test_daemon_cost_reports_cpu_per_job_and_memory():
    result = subprocess.run(
        [sys.executable, "-m", "dbservice.bench.daemon_cost", "--seconds", "1", "--rounds", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"dbservice on uvloop: \d+ queries/s, its CPU [\d.]+ us per query", result.stdout), (
        result.stdout
    )
    if pgbouncer.skip_reason() is None:
        assert re.search(r"PgBouncer: \d+ queries/s, its CPU [\d.]+ us per query", result.stdout), result.stdout
    assert re.search(r"daemon RSS: [\d.]+ MiB, and [\d.]+ MiB with 1000 idle client connections", result.stdout)
    assert re.search(r"(PASS|FAIL) +the daemon's RSS with 1000 idle clients < 100 MB", result.stdout), result.stdout
    if pgbouncer.skip_reason() is None:
        assert re.search(r"(PASS|FAIL) +the daemon's CPU per query <= 1.5x PgBouncer's: [\d.]+x", result.stdout)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_replicated_run_compares_the_primary_alone_with_replicas_and_shows_the_spread():
    result = subprocess.run(
        [sys.executable, "-m", "dbservice.bench", "--replicas", "2", "--duration", "1", "--processes", "2",
         "--clients", "4", "--scale", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=140,
    )
    assert result.returncode == 0, result.stderr
    alone, replicated = [line for line in result.stdout.splitlines() if line.startswith("primary ")]
    assert alone.startswith("primary alone") and alone.endswith("primary 100%")
    assert replicated.startswith("primary + 2 replicas")
    assert "replica1 " in replicated and "replica2 " in replicated
    assert float(replicated.split()[4]) > 0  # its queries per second
