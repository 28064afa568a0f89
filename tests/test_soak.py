"""Soak: 1,000 client connections over 8 server connections, 200,000 jobs.

Slow, so not part of the default run: ``python -m pytest -m slow -s tests/test_soak.py``.
Every reply must match its job (the right rows for the right id), none may be
lost or duplicated, and the daemon's memory must stay flat; the figures are
printed.
"""

import asyncio
import multiprocessing
import time

import pytest

import dbservice
from conftest import start_service

PROCESSES = 4
CONNECTIONS_PER_PROCESS = 250
JOBS_PER_CONNECTION = 200  # 4 x 250 x 200 = 200,000 jobs

MODES = [
    ("fetchval", "select %s::int * 2", lambda n: n * 2),
    ("fetchone", "select %s::int, %s::text", None),
    ("fetchall", "select g from generate_series(%s::int, %s::int + 2) g", None),
    ("execute", "select 1 from generate_series(1, %s::int %% 5 + 1)", lambda n: n % 5 + 1),
]


def _check(mode, n, result):
    name, _, expect = MODES[mode]
    if name == "fetchone":
        return result == (n, str(n))
    if name == "fetchall":
        return result == [(n,), (n + 1,), (n + 2,)]
    return result == expect(n)


async def _connection(db, process, number, counts):
    for i in range(JOBS_PER_CONNECTION):
        n = (process * CONNECTIONS_PER_PROCESS + number) * JOBS_PER_CONNECTION + i
        mode = n % len(MODES)
        name, sql, _ = MODES[mode]
        params = [n, n] if sql.count("%s") == 2 else [n]
        result = await getattr(db, name)(sql, params, timeout=60)
        counts["ok" if _check(mode, n, result) else "wrong"] += 1


def _process(socket, authkey, process, results):
    async def main():
        counts = {"ok": 0, "wrong": 0}
        clients = [await dbservice.connect_async(socket, authkey) for _ in range(CONNECTIONS_PER_PROCESS)]
        outcomes = await asyncio.gather(
            *(_connection(db, process, k, counts) for k, db in enumerate(clients)), return_exceptions=True
        )
        for db in clients:
            await db.close()
        errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
        return counts, errors[:5]

    try:
        results.put((process,) + asyncio.run(main()))
    except BaseException as exc:
        results.put((process, {"ok": 0, "wrong": 0}, [repr(exc)]))


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_1000_clients_8_connections_200k_jobs(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=8, max_size=8) as svc:
        pid = svc.process.pid
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        workers = [ctx.Process(target=_process, args=(svc.socket, svc.authkey, p, results)) for p in range(PROCESSES)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        samples = []
        outcomes = []
        while len(outcomes) < PROCESSES and time.monotonic() - started < 540:
            samples.append((round(time.monotonic() - started, 1), _rss_kib(pid)))
            try:
                outcomes.append(results.get(timeout=2))
            except Exception:
                pass
        elapsed = time.monotonic() - started
        for worker in workers:
            worker.join(30)
        with svc.client() as c:
            figures = c.status()
    total = sum(o[1]["ok"] for o in outcomes)
    print("\nsoak: %d jobs in %.1f s (%.0f jobs/s); daemon RSS (s, KiB): %s" % (total, elapsed, total / elapsed, samples))
    print("soak: daemon figures: %s" % {k: figures[k] for k in ("jobs_done", "jobs_failed", "jobs_timed_out", "pool_size")})
    assert len(outcomes) == PROCESSES, "a load process did not finish"
    assert [o[2] for o in outcomes] == [[]] * PROCESSES
    assert sum(o[1]["wrong"] for o in outcomes) == 0
    assert total == PROCESSES * CONNECTIONS_PER_PROCESS * JOBS_PER_CONNECTION
    assert figures["jobs_failed"] == 0 and figures["jobs_timed_out"] == 0
    assert figures["pool_size"] == 8
    # flat: after the first fifth of the run, memory grows by less than 20 MiB
    warm = [rss for at, rss in samples if at >= elapsed / 5] or [samples[-1][1]]
    assert max(warm) - warm[0] < 20 * 1024, samples
