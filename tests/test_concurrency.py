"""Many processes and threads at once: everyone gets exactly their own answers."""

import hashlib
import multiprocessing
import threading

import dbservice

PROCESSES = 4
THREADS = 4
QUERIES = 500
SQL = "select %(p)s::int, %(t)s::int, %(i)s::int, md5(%(tag)s), %(i)s::int * %(p)s::int + %(t)s::int"


def _expected(p, t, i):
    tag = "p%d-t%d-q%d" % (p, t, i)
    return (p, t, i, hashlib.md5(tag.encode()).hexdigest(), i * p + t), tag


def _thread_work(client, p, t, queries, wrong):
    for i in range(queries):
        expected, tag = _expected(p, t, i)
        row = client.fetchone(SQL, {"p": p, "t": t, "i": i, "tag": tag})
        if row != expected:
            wrong.append((expected, row))


def _process_work(make_client, p, queries, results):
    try:
        client = make_client()
        wrong = []
        threads = [threading.Thread(target=_thread_work, args=(client, p, t, queries, wrong)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.put((p, len(wrong), wrong[:3]))
    except BaseException as exc:  # report, never hang the parent
        results.put((p, -1, repr(exc)))


class _SocketClientFactory:
    def __init__(self, path, authkey):
        self.path, self.authkey = path, authkey

    def __call__(self):
        return dbservice.connect(socket=self.path, authkey=self.authkey, timeout=60)


def run_processes(make_client, processes=PROCESSES, queries=QUERIES):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    workers = [ctx.Process(target=_process_work, args=(make_client, p, queries, results)) for p in range(processes)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=100) for _ in workers)
    for worker in workers:
        worker.join(10)
    return outcomes


def test_processes_times_threads_all_get_their_own_answers(dsn, socket_path):
    with dbservice.DBService(dsn, socket=socket_path, min_size=2, max_size=8) as svc:
        outcomes = run_processes(_SocketClientFactory(svc.socket, svc.authkey))
    assert outcomes == [(p, 0, []) for p in range(PROCESSES)]


def test_queue_intake_from_forked_processes(dsn):
    with dbservice.DBService(dsn, min_size=2, max_size=8) as svc:
        outcomes = run_processes(svc.client)
    assert outcomes == [(p, 0, []) for p in range(PROCESSES)]
