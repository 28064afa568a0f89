"""--plot FILE.png: throughput and p99 latency side by side, one bar per strategy and workload.

matplotlib is an optional extra: ``pip install 'dbservice[plot]'``.
"""

import importlib.util


def require_matplotlib():
    """Raise RuntimeError, saying how to install it, if matplotlib is missing: check before a long run."""
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError("--plot needs matplotlib: pip install 'dbservice[plot]'")


def plot(report, path):
    """Draw *report*'s results into the image file *path*."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    results = report["results"]
    workloads = list(dict.fromkeys(row["workload"] for row in results))
    strategies = list(dict.fromkeys(row["strategy"] for row in results))
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(1, len(strategies))
    for number, strategy in enumerate(strategies):
        rows = {row["workload"]: row for row in results if row["strategy"] == strategy}
        positions = [w + (number - (len(strategies) - 1) / 2) * width for w in range(len(workloads))]
        for axes, key in ((left, "qps"), (right, "p99_ms")):
            values = [(rows[w][key] or 0) if w in rows else 0 for w in workloads]
            axes.bar(positions, values, width, label=strategy)
    for axes, title in (
        (left, "throughput (queries per second, log scale)"),
        (right, "p99 latency (ms, log scale)"),
    ):
        axes.set_title(title)
        axes.set_xticks(range(len(workloads)))
        axes.set_xticklabels(workloads)
    left.set_yscale("log")
    right.set_yscale("log")
    left.legend(fontsize="small")
    machine = report["machine"]
    figure.suptitle(
        "dbservice bench, %s: %d cores, %s, PostgreSQL %s"
        % (machine["date"], machine["cores"], machine["cpu_model"], machine["postgresql"].split()[0])
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
