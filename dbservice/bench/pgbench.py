"""pgbench at the same concurrency: what this server and machine do without Python in the way.

pgbench runs each workload's own statements against ``bench_accounts`` from
script files (not its own tables), with one weighted script per statement
so a mix keeps its proportions, and logs every transaction. The figures come
from those logs, over the same warm-up and window as the other strategies.
"""

import glob
import math
import os
import shutil
import subprocess
import tempfile

from .results import NotMeasured, Samples
from .workloads import param_range

#: Seconds pgbench may run past its own duration before it counts as hung.
GRACE = 120.0
#: Seconds pgbench runs beyond the warm-up and the window: its --time includes
#: connecting its clients, which can take a while at 256 on a busy machine.
CONNECT_ALLOWANCE = 2


def skip_reason():
    if shutil.which("pgbench") is None:
        return "no pgbench binary on PATH (Debian ships it in the postgresql package)"
    return None


def script(query, rows):
    """A pgbench script running *query* with its parameters drawn as the Python clients draw them."""
    lines, sql = [], query.sql
    for name in query.params:
        low, high = param_range(name, rows)
        lines.append("\\set %s random(%d, %d)" % (name, low, high))
        sql = sql.replace("%s", ":" + name, 1)
    lines.append(sql + ";")
    return "\n".join(lines) + "\n"


def measure(dsn, workload, clients, plan, started=None, protocol="simple"):
    """Run pgbench with *clients* clients for the warm-up and the window; return its Samples.

    *protocol* is pgbench's --protocol: simple (plain text, as psycopg2
    sends) or prepared (each statement parsed and planned once).
    """
    seconds = math.ceil(plan.warmup + plan.duration) + CONNECT_ALLOWANCE  # --time takes whole seconds
    with tempfile.TemporaryDirectory(prefix="dbservice-bench-") as directory:
        command = [
            "pgbench",
            "--no-vacuum",
            "--protocol=%s" % protocol,
            "--client=%d" % clients,
            "--jobs=%d" % min(plan.processes, clients),
            "--time=%d" % seconds,
            "--log",
            "--log-prefix=" + os.path.join(directory, "log"),
        ]
        for number, query in enumerate(workload.queries):
            path = os.path.join(directory, "script%d.sql" % number)
            with open(path, "w") as f:
                f.write(script(query, plan.rows))
            command.append("--file=%s@%d" % (path, query.weight))
        command.append(dsn)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if started is not None:
            started()
        try:
            _, errors = process.communicate(timeout=seconds + GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise NotMeasured("pgbench did not finish within %.0f s: it hangs" % (seconds + GRACE)) from None
        failure = "pgbench exited with code %d: %s" % (process.returncode, _last_line(errors))
        logs = glob.glob(os.path.join(directory, "log.*"))
        try:
            samples = read_logs(logs, [q.kind for q in workload.queries], plan.warmup, plan.duration)
        except NotMeasured:
            if process.returncode != 0:  # its own error says more than its logs
                raise NotMeasured(failure) from None
            raise
    for line in errors.splitlines():
        if " aborted " in line:  # a client that hit an error stops for good
            samples.error(line.strip())
    if process.returncode != 0:
        samples.error(failure)
    return samples


def read_logs(paths, kinds, warmup, duration):
    """Samples from pgbench's per-transaction logs.

    Each line is ``client transaction latency_us script epoch_s epoch_us``,
    stamped when the transaction ended; the window starts *warmup* seconds
    after the first transaction ended. *kinds* names each script's kind.
    Raises NotMeasured if the logs do not cover the window.
    """
    ended = []
    for path in paths:
        with open(path) as f:
            for line in f:
                fields = line.split()
                ended.append((int(fields[4]) + int(fields[5]) / 1e6, fields[2], int(fields[3])))
    if not ended:
        raise NotMeasured("pgbench logged no transaction")
    start = min(at for at, _, _ in ended) + warmup
    missing = start + duration - max(at for at, _, _ in ended)
    if missing > 0:
        raise NotMeasured(
            "pgbench stopped %.1f s before the window ended (connecting its clients took that long); "
            "a longer --duration leaves more room" % missing
        )
    samples = Samples()
    for at, latency, script_number in ended:
        if not start <= at <= start + duration:
            continue
        if latency.isdigit():
            samples.add(kinds[script_number], int(latency) / 1e6)
        else:  # "failed" (or "skipped"): the transaction did not complete
            samples.error("pgbench: a transaction %s" % latency)
    return samples


def _last_line(text):
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"
