"""Client load: processes x threads running a workload, timing every query of the measured window.

The client processes are forked from the bench process, so they inherit the
connector (and with it a dbservice client). Each gets ready (persistent
connections connect), reports so, and is then sent the window on the shared
monotonic clock: a warm-up, then the measured seconds. A query counts if it
completes inside the window; its latency is taken with ``time.perf_counter``.
Failures count from the start, warm-up included.
"""

import asyncio
import multiprocessing
import random
import threading
import time

from .connectors import QUERY_TIMEOUT
from .results import NotMeasured, Samples, describe

#: Seconds a client pauses after a failed query, as an app would before it retries.
ERROR_PAUSE = 0.01
#: Seconds the client processes have to get ready.
SETUP_TIMEOUT = 120.0
#: Seconds past the window's end a client process has to report; past it, it hangs.
REPORT_GRACE = QUERY_TIMEOUT + 30.0
#: Seconds a client process has to exit once it reported.
EXIT_TIMEOUT = 10.0


def split(clients, processes):
    """Client threads per process: *clients* spread evenly over at most *processes*."""
    processes = max(1, min(processes, clients))
    base, extra = divmod(clients, processes)
    return [base + 1 if number < extra else base for number in range(processes)]


def measure(connector, workload, clients, plan, started=None):
    """Run *workload* from *clients* threads over ``plan.processes`` processes; return its Samples.

    *started* is called once the client processes exist: the bench process
    may start threads of its own only then, not before forking.
    Raises NotMeasured if a client process crashes or hangs.
    """
    context = multiprocessing.get_context("fork")
    pipes, processes = [], []
    try:
        for threads in split(clients, plan.processes):
            here, there = context.Pipe()
            process = context.Process(
                target=_client_process,
                args=(connector, workload, threads, plan.rows, there),
                name="bench-client",
                daemon=True,
            )
            process.start()
            there.close()
            pipes.append(here)
            processes.append(process)
        if started is not None:
            started()
        samples = Samples()
        for pipe in pipes:
            samples.merge(_receive(pipe, SETUP_TIMEOUT, "get ready"))
        now = time.monotonic()
        window = (now + plan.warmup, now + plan.warmup + plan.duration)
        for pipe in pipes:
            pipe.send(window)
        for pipe in pipes:
            samples.merge(_receive(pipe, window[1] + REPORT_GRACE - time.monotonic(), "report"))
        return samples
    except BaseException:
        for process in processes:  # a hung or half-started client: no reason to wait for it
            process.kill()
        raise
    finally:
        for process in processes:
            process.join(EXIT_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()


def _receive(pipe, timeout, what):
    if not pipe.poll(max(0.0, timeout)):
        raise NotMeasured("a client process did not %s within %.0f s: it hangs" % (what, timeout))
    try:
        kind, value = pipe.recv()
    except EOFError:
        raise NotMeasured("a client process died before it could %s" % what) from None
    if kind == "error":
        raise NotMeasured("a client process failed: %s" % value)
    return value


def _client_process(connector, workload, threads, rows, pipe):
    try:
        if connector.is_async:
            asyncio.run(_run_coroutines(connector, workload, threads, rows, pipe))
        else:
            _run_threads(connector, workload, threads, rows, pipe)
    except BaseException as exc:
        pipe.send(("error", describe(exc)))
        raise


def _run_threads(connector, workload, threads, rows, pipe):
    setup = Samples()
    sessions = [connector.open_thread() for _ in range(threads)]
    for session in sessions:
        try:
            session.open()
        except Exception as exc:  # counted; the session retries at its first query
            setup.error(describe(exc))
    pipe.send(("ready", setup))
    window = pipe.recv()
    results = [Samples() for _ in sessions]
    workers = [
        threading.Thread(target=_run_session, args=(session, workload, rows, window, result), daemon=True)
        for session, result in zip(sessions, results)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for session in sessions:
        session.close()
    pipe.send(("done", _merged(results)))


def _run_session(session, workload, rows, window, samples):
    rng = random.Random()
    going = time.monotonic() < window[1]
    while going:
        query, params = workload.draw(rng, rows)
        failed = None
        started = time.perf_counter()
        try:
            session.query(query.sql, params)
        except Exception as exc:
            failed = exc
        going = _account(samples, window, query.kind, started, failed)
        if failed is not None:
            time.sleep(ERROR_PAUSE)


async def _run_coroutines(connector, workload, count, rows, pipe):
    client = await connector.open_process()
    pipe.send(("ready", Samples()))
    window = pipe.recv()
    results = [Samples() for _ in range(count)]
    await asyncio.gather(*(_run_coroutine(connector, client, workload, rows, window, r) for r in results))
    await client.close()
    pipe.send(("done", _merged(results)))


async def _run_coroutine(connector, client, workload, rows, window, samples):
    rng = random.Random()
    going = time.monotonic() < window[1]
    while going:
        query, params = workload.draw(rng, rows)
        failed = None
        started = time.perf_counter()
        try:
            await connector.query(client, query.sql, params)
        except Exception as exc:
            failed = exc
        going = _account(samples, window, query.kind, started, failed)
        if failed is not None:
            await asyncio.sleep(ERROR_PAUSE)


def _account(samples, window, kind, started, failed):
    """Count a finished query; False once the window is over.

    Its latency counts if it completed inside the window; a failure counts
    during the warm-up too, where a thread's first connection is made.
    """
    latency = time.perf_counter() - started
    now = time.monotonic()
    warm_until, end = window
    if failed is not None and now <= end:
        samples.error(describe(failed))
    elif warm_until <= now <= end:
        samples.add(kind, latency)
    return now < end


def _merged(parts):
    total = Samples()
    for part in parts:
        total.merge(part)
    return total
