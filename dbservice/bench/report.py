"""The report of a run: ratios, targets, the table on stdout, the --json document."""

import dataclasses
import json

#: The strategy every ratio is about.
OURS = "dbservice"

#: The headline: dbservice over these, on point reads.
HEADLINE = (("pgbouncer", "PgBouncer"), ("pgbench", "pgbench"), ("connect-per-query", "connect-per-query"))

#: What each layer an app puts over its connection costs: its throughput over that of the layer
#: it rides on, in the same workload: (upper strategy, lower strategy, label).
LAYERS = (
    ("dbservice-dbapi", "dbservice", "dbservice.dbapi / dbservice Client"),
    ("dbservice-sqlalchemy", "dbservice-dbapi", "SQLAlchemy Core / dbservice.dbapi"),
    ("pgbouncer-sqlalchemy", "pgbouncer", "SQLAlchemy Core / psycopg2, both on PgBouncer"),
    ("dbservice-sqlalchemy", "pgbouncer-sqlalchemy", "SQLAlchemy Core: on dbservice / on PgBouncer"),
)

COLUMNS = (
    ("workload", "workload", "<"),
    ("strategy", "strategy", "<"),
    ("clients", "clients", ">"),
    ("qps", "qps", ">"),
    ("p50_ms", "p50 ms", ">"),
    ("p99_ms", "p99 ms", ">"),
    ("fast_p99_ms", "fast p99 ms", ">"),
    ("errors", "errors", ">"),
    ("server_connections", "server conns", ">"),
)


def ratios(results):
    """dbservice's queries per second over each other strategy's, per workload."""
    table = {}
    for workload in _workloads(results):
        ours = _row(results, workload, OURS)
        if ours is None or not ours["qps"]:
            continue
        for row in results:
            if row["workload"] == workload and row["strategy"] != OURS and row["qps"]:
                table.setdefault(workload, {})["%s/%s" % (OURS, row["strategy"])] = round(
                    ours["qps"] / row["qps"], 3
                )
    return table


def layers(results):
    """Each of LAYERS' ratios that this run measured, per workload."""
    table = {}
    for workload in _workloads(results):
        for upper, lower, _ in LAYERS:
            value = _ratio(_field(results, workload, upper, "qps"), _field(results, workload, lower, "qps"))
            if value is not None:
                table.setdefault(workload, {})["%s/%s" % (upper, lower)] = round(value, 3)
    return table


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal the issue set: *measured* over *baseline*, each a (workload, strategy, field) cell."""

    name: str
    measured: tuple
    baseline: tuple
    comparison: str  # ">=" or "<="
    limit: float
    #: (client threads, server connections) the goal is stated at, if any
    concurrency: tuple = None


TARGETS = (
    Target(
        "dbservice >= 20x connect-per-query on point reads",
        ("point-read", OURS, "qps"),
        ("point-read", "connect-per-query", "qps"),
        ">=",
        20.0,
    ),
    Target(
        "dbservice >= 1.2x PgBouncer on point reads, 64 client threads over 8 server connections",
        ("point-read", OURS, "qps"),
        ("point-read", "pgbouncer", "qps"),
        ">=",
        1.2,
        concurrency=(64, 8),
    ),
    Target(
        "dbservice >= 0.5x pgbench -S on point reads",
        ("point-read", OURS, "qps"),
        ("point-read", "pgbench", "qps"),
        ">=",
        0.5,
    ),
    Target(
        "single-client p50 <= 1.3x a direct psycopg2 connection",
        ("single-client", OURS, "p50_ms"),
        ("single-client", "threadpool", "p50_ms"),
        "<=",
        1.3,
    ),
    Target(
        "slow-mix: fast queries' p99 <= 3x their p99 without slow queries",
        ("slow-mix", OURS, "fast_p99_ms"),
        ("point-read", OURS, "p99_ms"),
        "<=",
        3.0,
    ),
)


def targets(results, plan):
    """Each target with the ratio measured in this run and its verdict: PASS, FAIL or N-A."""
    return [_judge(target, results, plan) for target in TARGETS]


def _judge(target, results, plan):
    value = _ratio(_field(results, *target.measured), _field(results, *target.baseline))
    judged = {"target": target.name, "value": value, "limit": target.limit}
    if value is None:
        judged.update(verdict="N-A", detail="not measured in this run")
    elif target.concurrency and target.concurrency != (plan.clients, plan.pool_size):
        judged.update(
            verdict="N-A",
            detail="this run had %d client threads over %d server connections"
            % (plan.clients, plan.pool_size),
        )
    elif target.comparison == ">=":
        judged["verdict"] = "PASS" if value >= target.limit else "FAIL"
    else:
        judged["verdict"] = "PASS" if value <= target.limit else "FAIL"
    return judged


def format_report(report):
    """The whole report as text: header, table, notes, headline ratios, targets."""
    machine, plan = report["machine"], report["plan"]
    lines = [
        "dbservice bench, %s" % machine["date"],
        "machine: %d cores, %s, %s GiB RAM, %s; load average %s before the run"
        % (
            machine["cores"],
            machine["cpu_model"],
            machine["memory_gib"],
            machine["os"],
            machine["load_average"],
        ),
        "versions: PostgreSQL %s, Python %s, psycopg2 %s%s%s; dbservice on %s"
        % (
            machine["postgresql"],
            machine["python"],
            machine["psycopg2"],
            ", " + machine["pgbouncer"] if machine["pgbouncer"] else "",
            ", " + machine["pgbench"] if machine["pgbench"] else "",
            machine["dbservice_loop"],
        ),
        "command: %s" % report["command"],
        "each cell: %g s warm-up, then %g s measured%s; %d client threads over %d processes unless the "
        "workload says otherwise; pools of %d server connections; %d accounts"
        % (
            plan["warmup"],
            plan["duration"],
            ", the best of %d rounds in turns" % plan["rounds"] if plan.get("rounds", 1) > 1 else "",
            plan["clients"],
            plan["processes"],
            plan["pool_size"],
            plan["rows"],
        ),
        "",
    ]
    lines += format_table(report["results"])
    lines += [
        "qps: queries completed per second; p50/p99: latency percentiles over all queries (fast p99: the",
        "slow mix's fast queries only); server conns: the most client connections pg_stat_activity showed",
        "in samples every 0.1 s; errors: failed queries and failed connects.",
    ]
    if report["notes"]:
        lines += ["", "notes:"]
        lines += ["  " + _note(note) for note in report["notes"]]
    lines += ["", "headline (queries per second, point-read, this run):"]
    point = report["ratios"].get("point-read", {})
    for strategy, label in HEADLINE:
        ratio = point.get("%s/%s" % (OURS, strategy))
        lines.append(
            "  dbservice / %-20s %s" % (label, "n/a (not measured)" if ratio is None else "%.2fx" % ratio)
        )
    if report.get("layers"):
        lines += ["", "layers (queries per second over the layer below, this run):"]
        for workload, measured in report["layers"].items():
            for upper, lower, label in LAYERS:
                if "%s/%s" % (upper, lower) in measured:
                    lines.append("  %-14s %-48s %.2fx" % (workload, label, measured["%s/%s" % (upper, lower)]))
    lines += ["", "targets:"]
    for target in report["targets"]:
        value = "not measured" if target["value"] is None else "%.2fx" % target["value"]
        detail = " (%s)" % target["detail"] if "detail" in target else ""
        lines.append("  %-4s  %s: %s%s" % (target["verdict"], target["target"], value, detail))
    return "\n".join(lines) + "\n"


def format_table(results):
    """The results as aligned text lines, one per cell."""
    cells = [[header for _, header, _ in COLUMNS]]
    for row in results:
        cells.append([_cell(row.get(key)) for key, _, _ in COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return [
        "  ".join(
            text.ljust(width) if align == "<" else text.rjust(width)
            for text, width, (_, _, align) in zip(line, widths, COLUMNS)
        ).rstrip()
        for line in cells
    ]


def write_json(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "%.0f" % value if value >= 100 else "%.2f" % value
    return str(value)


def _note(note):
    where = note["strategy"] + (" / " + note["workload"] if "workload" in note else "")
    return "%s: %s" % (where, note["note"])


def _workloads(results):
    return list(dict.fromkeys(row["workload"] for row in results))


def _row(results, workload, strategy):
    for row in results:
        if row["workload"] == workload and row["strategy"] == strategy:
            return row
    return None


def _field(results, workload, strategy, key):
    row = _row(results, workload, strategy)
    return None if row is None else row.get(key)


def _ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)
