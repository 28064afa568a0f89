"""The regression guard: it passes the daemon as it is and fails one slowed down by a quarter."""

import os
import re
import subprocess
import sys

import pytest

from dbservice.bench import guard

HERE = os.path.dirname(os.path.abspath(__file__))
#: A sitecustomize that slows the daemon's two per-job steps by a quarter (its docstring says how).
SLOWED_DAEMON = os.path.join(HERE, "slowed_daemon")


def test_the_verdict_is_the_median_round_against_the_ceiling():
    passed, measured = guard.verdict([2.0, 9.0, 2.2], 2.5)  # one round disturbed: the median holds
    assert passed
    assert measured == "the daemon spent 2.20x its client's CPU per job (median of 3 rounds: 2.00 2.20 9.00; ceiling 2.50x)"
    passed, _ = guard.verdict([2.6, 2.7, 2.0], 2.5)
    assert not passed


def _run_guard(slowdown, loop):
    env = dict(os.environ, DBSERVICE_SLOWDOWN=str(slowdown))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SLOWED_DAEMON, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "dbservice.bench.guard", "--loop", loop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=110,
        env=env,
    )


@pytest.mark.bench
@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop", ["epoll", "uvloop"])
@pytest.mark.parametrize(
    "slowdown, exit_code, verdict, stream",
    [(0, 0, "passed", "stdout"), (0.25, 1, "failed", "stderr")],
    ids=["the daemon as it is passes", "a daemon slowed by a quarter fails"],
)
def test_the_guard(slowdown, exit_code, verdict, stream, loop):
    result = _run_guard(slowdown, loop)
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert re.search(
        r"regression guard: %s: the daemon spent [\d.]+x its client's CPU" % verdict, getattr(result, stream)
    ), result.stdout + result.stderr


def test_the_guard_keeps_itself_and_what_it_starts_on_one_core():
    before = os.sched_getaffinity(0)
    try:
        core = guard.pin_to_one_core()
        assert os.sched_getaffinity(0) == {core} and core in before
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout.strip() == "[%d]" % core
    finally:
        os.sched_setaffinity(0, before)
