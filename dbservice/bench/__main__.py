"""python -m dbservice.bench: the command line of the benchmark."""

import shlex

import click
import psycopg2
import psycopg2.extensions

from . import plot as plotting
from . import report
from .run import QUICK, Plan, run
from .strategies import STRATEGIES
from .workloads import WORKLOADS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dsn",
    metavar="DSN",
    help="Run against this database (its bench_accounts table is dropped and "
    "recreated) instead of a throwaway PostgreSQL.",
)
@click.option(
    "--scale", type=click.IntRange(1), metavar="ROWS", help="Accounts in the table [100000; quick: 10000]."
)
@click.option(
    "--duration",
    type=click.FloatRange(0.1),
    metavar="SECONDS",
    help="Seconds measured per cell [5; quick: 0.5].",
)
@click.option(
    "--warmup",
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="Seconds of warm-up before each cell's measurement [1; quick: 0.25].",
)
@click.option(
    "--clients",
    type=click.IntRange(1),
    default=Plan.clients,
    show_default=True,
    help="Client threads of the workloads that do not set their own.",
)
@click.option(
    "--processes",
    type=click.IntRange(1),
    default=Plan.processes,
    show_default=True,
    help="Client processes the threads are spread over.",
)
@click.option(
    "--pool-size",
    type=click.IntRange(1),
    default=Plan.pool_size,
    show_default=True,
    help="Server connections of dbservice's pool and PgBouncer's.",
)
@click.option(
    "--strategy",
    "strategy_names",
    multiple=True,
    metavar="NAME",
    type=click.Choice([s.name for s in STRATEGIES]),
    help="Run only this strategy (repeatable).",
)
@click.option(
    "--workload",
    "workload_names",
    multiple=True,
    metavar="NAME",
    type=click.Choice([w.name for w in WORKLOADS]),
    help="Run only this workload (repeatable).",
)
@click.option(
    "--loop",
    type=click.Choice(["auto", "epoll", "select", "uvloop"]),
    default=Plan.loop,
    show_default=True,
    help="dbservice's event loop (uvloop: pip install 'dbservice[uvloop]').",
)
@click.option(
    "--rounds",
    type=click.IntRange(1),
    metavar="N",
    help="Run every cell N times, strategy after strategy, and report each cell's best round [1]: "
    "for a machine that other work shares.",
)
@click.option(
    "--replicas",
    type=click.IntRange(1),
    metavar="N",
    help="Instead: a 90%% read, 10%% write load on a throwaway primary alone and with N streaming "
    "replicas, in turns (--duration, --processes, --clients, --pool-size, --rounds, --scale apply).",
)
@click.option("--quick", is_flag=True, help="A smoke run of every cell: about a minute on 2 cores.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True),
    metavar="FILE",
    help="Also write the results as JSON.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, writable=True),
    metavar="FILE.png",
    help="Also draw throughput and p99 side by side (needs matplotlib: dbservice[plot]).",
)
def main(
    dsn,
    scale,
    duration,
    warmup,
    clients,
    processes,
    pool_size,
    strategy_names,
    workload_names,
    loop,
    rounds,
    replicas,
    quick,
    json_path,
    plot_path,
):
    """Benchmark dbservice against its alternatives, side by side, in one run.

    Every strategy runs the same workloads from the same client processes and
    threads; the table gives queries per second, p50 and p99 latency, errors
    and server connections per strategy and workload, then the ratios and the
    targets measured in this run.
    """
    if replicas:
        from . import replicas as replicated

        threads = max(1, clients // processes)
        seconds = duration or (1.0 if quick else 5.0)
        click.echo(replicated.run(replicas, seconds, processes, threads, scale or 10000, rounds or 1, pool_size), nl=False)
        return
    plan = _plan(
        quick,
        scale=scale,
        duration=duration,
        warmup=warmup,
        clients=clients,
        processes=processes,
        pool_size=pool_size,
        loop=loop,
        rounds=rounds,
    )
    if plot_path:
        try:
            plotting.require_matplotlib()
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    strategies = [s for s in STRATEGIES if not strategy_names or s.name in strategy_names]
    workloads = [w for w in WORKLOADS if not workload_names or w.name in workload_names]
    try:
        result = run(plan, dsn, strategies, workloads)
    except (RuntimeError, psycopg2.Error) as exc:
        raise click.ClickException("the bench could not run: %s" % exc) from None
    result["command"] = command(plan, dsn, strategy_names, workload_names)
    click.echo(report.format_report(result), nl=False)
    if json_path:
        report.write_json(result, json_path)
    if plot_path:
        plotting.plot(result, plot_path)


def _plan(quick, scale, **given):
    settings = dict(QUICK) if quick else {}
    settings.update((key, value) for key, value in given.items() if value is not None)
    if scale is not None:
        settings["rows"] = scale
    return Plan(**settings)


def command(plan, dsn, strategy_names, workload_names):
    """The command line that reruns exactly this plan (a password in the DSN left out)."""
    words = ["python", "-m", "dbservice.bench"]
    if dsn:
        params = psycopg2.extensions.parse_dsn(dsn)
        params.pop("password", None)
        words += ["--dsn", " ".join("%s=%s" % item for item in sorted(params.items()))]
    words += [
        "--scale",
        str(plan.rows),
        "--duration",
        "%g" % plan.duration,
        "--warmup",
        "%g" % plan.warmup,
        "--clients",
        str(plan.clients),
        "--processes",
        str(plan.processes),
        "--pool-size",
        str(plan.pool_size),
    ]
    if plan.loop != Plan.loop:
        words += ["--loop", plan.loop]
    if plan.rounds != Plan.rounds:
        words += ["--rounds", str(plan.rounds)]
    for name in strategy_names:
        words += ["--strategy", name]
    for name in workload_names:
        words += ["--workload", name]
    return shlex.join(words)


if __name__ == "__main__":
    main(prog_name="python -m dbservice.bench")
