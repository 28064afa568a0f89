"""COPY through the daemon: psycopg2's copy methods on every client, streamed with bounded memory both ways."""

import asyncio
import concurrent.futures
import io
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

import dbservice
from conftest import start_service, wait_until
from dbservice import dbapi


@pytest.fixture(scope="module")
def copy_service(dsn, tmp_path_factory):
    directory = tmp_path_factory.mktemp("c")
    os.chmod(directory, 0o700)
    svc = start_service(dsn, str(directory / "dbservice.sock"), min_size=1, max_size=3)
    yield svc
    svc.stop()


@pytest.fixture
def db(copy_service):
    with copy_service.client(timeout=60) as client:
        yield client


@pytest.fixture
def table(db):
    db.execute("drop table if exists copied; create table copied (n int, word text)")
    yield "copied"
    db.execute("drop table if exists copied")


ROWS = "1\tone\n2\t\\N\n3\tthree, with a comma\n4\tfünf ☃\n"


def test_copy_from_and_copy_to_as_psycopg2_spells_them(db, table):
    assert db.copy_from(io.StringIO(ROWS), table) == 4
    assert db.fetchall("select n, word from copied order by n")[1] == (2, None)
    out = io.StringIO()
    assert db.copy_to(out, table) == 4
    assert out.getvalue() == ROWS
    out = io.BytesIO()
    db.copy_to(out, table, sep="|", null="-", columns=["word", "n"])
    assert out.getvalue().decode().splitlines()[:2] == ["one|1", "-|2"]
    assert db.copy_from(io.BytesIO(b"5|five\n"), table, sep="|", columns=("n", "word")) == 1
    assert db.fetchval("select word from copied where n = 5") == "five"


def test_copy_expert_either_way(db, table):
    csv = "6,\"six, quoted\"\n7,seven\n"
    assert db.copy_expert("COPY copied FROM STDIN WITH (FORMAT csv)", io.StringIO(csv), size=3) == 2
    out = io.BytesIO()
    assert db.copy_expert("COPY (SELECT * FROM copied ORDER BY n) TO STDOUT WITH (FORMAT csv)", out) == 2
    assert out.getvalue().decode() == csv


def test_bad_data_is_the_servers_error_and_nothing_is_copied(db, table):
    with pytest.raises(psycopg2.errors.InvalidTextRepresentation) as caught:
        db.copy_from(io.StringIO("1\tfine\nnot a number\tbad\n"), table)
    assert caught.value.pgcode == "22P02" and "COPY copied, line 2" in str(caught.value)
    assert db.fetchval("select count(*) from copied") == 0
    with pytest.raises(psycopg2.errors.UndefinedTable):
        db.copy_to(io.StringIO(), "no_such_table")
    with pytest.raises(dbservice.JobRefused, match="not a query"):
        db.copy_expert("select 1", io.StringIO())
    with pytest.raises(TypeError, match="read"):
        db.copy_from("not a file", table)
    assert db.fetchval("select 'the client goes on'") == "the client goes on"


class Failing(io.RawIOBase):
    """A file that fails after *good* chunks."""

    def __init__(self, good):
        self.good = good

    def readable(self):
        return True

    def writable(self):
        return True

    def read(self, size=-1):
        if not self.good:
            raise OSError("the disk went away")
        self.good -= 1
        return b"%d\tpart\n" % self.good

    def write(self, data):
        return self.read()


def test_a_file_that_fails_stops_the_copy_and_nothing_commits(db, table):
    with pytest.raises(OSError, match="the disk went away"):
        db.copy_from(Failing(3), table)
    assert db.fetchval("select count(*) from copied") == 0
    db.copy_from(io.StringIO(ROWS), table)
    with pytest.raises(OSError, match="the disk went away"):
        db.copy_expert("COPY (SELECT n FROM copied, generate_series(1, 100000)) TO STDOUT", Failing(2))
    assert db.fetchval("select count(*) from copied") == 4
    assert db.status()["copies_running"] == 0


def test_a_copy_in_a_transaction_runs_on_its_connection_and_rolls_back_with_it(db):
    with pytest.raises(ZeroDivisionError):
        with db.transaction() as tx:
            tx.execute("create table in_tx (n int)")  # only this transaction's connection sees it
            assert tx.copy_from(io.StringIO("1\n2\n"), "in_tx") == 2
            out = io.StringIO()
            tx.copy_to(out, "in_tx")
            assert out.getvalue() == "1\n2\n"
            raise ZeroDivisionError
    assert db.fetchval("select to_regclass('in_tx')") is None  # rolled back, table and rows
    with db.transaction() as tx:
        tx.execute("create table in_tx (n int)")
        tx.copy_from(io.StringIO("3\n"), "in_tx")
    assert db.fetchall("select n from in_tx") == [(3,)]
    db.execute("drop table in_tx")


def test_the_asyncio_client_copies_with_plain_and_async_files(copy_service, table):
    class AsyncSource:
        def __init__(self, chunks):
            self.chunks = list(chunks)

        async def read(self, size):
            await asyncio.sleep(0)
            return self.chunks.pop(0) if self.chunks else b""

    async def main():
        async with dbservice.connect_async(copy_service.socket, copy_service.authkey, timeout=60) as client:
            assert await client.copy_from(AsyncSource([b"1\ta\n", b"2\tb\n"]), table) == 2
            async with client.transaction() as tx:
                await tx.copy_expert("COPY copied FROM STDIN", io.StringIO("3\tc\n"))
                out = io.StringIO()
                await tx.copy_to(out, table)
            jobs = [client.fetchval("select %s::int", [n]) for n in range(20)]  # on the same connection
            out2 = io.BytesIO()
            results = await asyncio.gather(client.copy_to(out2, table), *jobs)
            return out.getvalue(), out2.getvalue(), results

    text, data, results = asyncio.run(main())
    assert text == "1\ta\n2\tb\n3\tc\n" and data == text.encode()
    assert results == [3] + list(range(20))


def test_the_dbapi_cursor_copies_in_its_transaction(copy_service, table):
    conn = dbapi.connect(socket=copy_service.socket, authkey=copy_service.authkey)
    try:
        cur = conn.cursor()
        cur.copy_from(io.StringIO(ROWS), table)
        assert cur.rowcount == 4
        conn.rollback()
        cur.execute("select count(*) from copied")
        assert cur.fetchone() == (0,)
        cur.copy_expert("COPY copied FROM STDIN", io.StringIO(ROWS))
        conn.commit()
        conn.autocommit = True
        out = io.StringIO()
        cur.copy_to(out, table)
        assert out.getvalue() == ROWS and cur.rowcount == 4
    finally:
        conn.close()


class Gate(io.RawIOBase):
    """A source that gives one row, then waits for *release* before it ends."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def readable(self):
        return True

    def read(self, size=-1):
        if not self.started.is_set():
            self.started.set()
            return b"1\theld\n"
        self.release.wait(60)
        return b""


def test_a_copy_that_outlives_its_timeout_is_stopped_and_commits_nothing(db, table):
    source = Gate()
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        copying = executor.submit(db.copy_from, source, table, timeout=1)
        assert source.started.wait(30)
        # the daemon stops it at its timeout, while its client still waits for its file
        wait_until(lambda: db.status()["copies_running"] == 0, message="the daemon to stop the COPY")
        source.release.set()
        with pytest.raises(dbservice.QueryTimeout):
            copying.result(30)
    assert db.fetchval("select count(*) from copied") == 0
    assert db.copy_from(io.StringIO(ROWS), table) == 4  # the connection serves on


class Stuck(io.RawIOBase):
    """A sink that takes one chunk, then waits for *release* before it takes the next."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def writable(self):
        return True

    def write(self, data):
        if self.started.is_set():
            self.release.wait(60)
        self.started.set()
        return len(data)


def test_copies_whose_clients_stall_hold_up_no_other_client(copy_service, db, table):
    """The daemon's loop waits for neither: a COPY FROM whose file gives nothing, a COPY TO whose file takes nothing."""
    source, sink = Gate(), Stuck()
    big = "COPY (SELECT n FROM generate_series(1, 1000000) n) TO STDOUT"
    with concurrent.futures.ThreadPoolExecutor(2) as executor, copy_service.client(timeout=60) as other:
        copying_in = executor.submit(db.copy_from, source, table)
        copying_out = executor.submit(other.copy_expert, big, sink)
        try:
            assert source.started.wait(30) and sink.started.wait(30)
            with copy_service.client(timeout=5) as third:
                for n in range(20):
                    assert third.fetchval("select %s::int", [n]) == n
        finally:
            source.release.set()
            sink.release.set()
        assert copying_in.result(30) == 1 and copying_out.result(30) == 1000000


def test_copies_are_bounded_and_hold_a_pooled_connection(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_copies=1) as svc:
        db = svc.client(timeout=60)
        db.execute("drop table if exists held; create table held (n int, word text)")
        source = Gate()
        holder = threading.Thread(target=db.copy_from, args=(source, "held"))
        holder.start()
        try:
            assert source.started.wait(30)
            other = svc.client(timeout=60)
            failed = db.status()["jobs_failed"]
            with pytest.raises(dbservice.ServiceBusy, match="max_copies"):
                other.copy_from(io.StringIO("2\tno room\n"), "held")
            assert db.status()["jobs_failed"] == failed + 1  # turned away, and counted so, as any job
            # the pool's one connection is the COPY's: a job waits for it
            waiting = threading.Thread(target=other.fetchval, args=("select 1",))
            waiting.start()
            wait_until(lambda: db.status()["queue_depth"] == 1, message="a job waiting for the COPY's connection")
        finally:
            source.release.set()
            holder.join(30)
        waiting.join(30)
        assert db.fetchall("select n, word from held") == [(1, "held")]
        assert other.copy_from(io.StringIO("2\troom\n"), "held") == 1
        db.execute("drop table held")


# -- a client dies mid-COPY ----------------------------------------------------------

DYING_CLIENT = """
import sys, dbservice

class Endless:
    def read(self, size):
        print("copying", flush=True)
        return b"1\\tendless\\n" * 1000

class Slow:
    def write(self, data):
        print("copying", flush=True)
        sys.stdin.readline()  # never answered: the client stalls here until it is killed

db = dbservice.connect(socket=sys.argv[1], authkey=sys.argv[2].encode())
if sys.argv[3] == "in":
    db.copy_from(Endless(), "dying")
else:
    db.copy_expert("COPY (SELECT a FROM generate_series(1, 100000) a, generate_series(1, 100) b) TO STDOUT", Slow())
"""


def _copies_running(admin):
    cur = admin.cursor()
    cur.execute("select count(*) from pg_stat_activity where query like 'COPY%%' and state = 'active'")
    return cur.fetchone()[0]


@pytest.mark.parametrize("direction", ["in", "out"])
def test_a_client_that_dies_mid_copy_has_it_stopped(copy_service, db, admin, direction):
    db.execute("drop table if exists dying; create table dying (n int, word text)")
    client = subprocess.Popen(
        [sys.executable, "-c", DYING_CLIENT, copy_service.socket, copy_service.authkey.decode(), direction],
        stdout=subprocess.PIPE, stdin=subprocess.PIPE,
    )
    try:
        assert client.stdout.readline().strip() == b"copying"
        wait_until(lambda: _copies_running(admin) == 1, message="the COPY to run")
        os.kill(client.pid, signal.SIGKILL)
        client.wait(10)
    finally:
        client.kill()
    wait_until(lambda: _copies_running(admin) == 0, message="the COPY to be stopped on the server")
    wait_until(lambda: db.status()["copies_running"] == 0, message="the daemon to forget it")
    assert db.fetchval("select count(*) from dying") == 0  # a COPY FROM that never ended commits nothing
    wait_until(lambda: _at_rest(db.status()), message="every connection back in the pool, idle")
    db.execute("drop table dying")


def _at_rest(status):
    return status["jobs_running"] == 0 and status["pool_available"] == status["pool_size"]


# -- bounded memory -------------------------------------------------------------------


class Rows(io.RawIOBase):
    """*total* bytes of 1 kB rows, made as they are read."""

    ROW = b"1\t" + b"x" * 1021 + b"\n"

    def __init__(self, total):
        self.left = total

    def readable(self):
        return True

    def read(self, size=-1):
        count = min(self.left, max(size, len(self.ROW))) // len(self.ROW)
        self.left -= count * len(self.ROW)
        return self.ROW * count


class Sink(io.RawIOBase):
    """Counts what it is given, pausing now and then: a disk slower than the server."""

    def __init__(self):
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        self.size += len(data)
        if self.size % (4 * 1024 * 1024) < len(data):
            time.sleep(0.05)
        return len(data)


def rss(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024


class PeakRss:
    """The largest RSS of *pids* while it runs, sampled every 20 ms, over what each had when it began."""

    def __init__(self, *pids):
        self.pids = pids
        self.before = [rss(pid) for pid in pids]
        self.peak = list(self.before)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self):
        while not self._done.wait(0.02):
            self.peak = [max(peak, rss(pid)) for peak, pid in zip(self.peak, self.pids)]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._done.set()
        self._thread.join()

    @property
    def growth(self):
        return [peak - before for peak, before in zip(self.peak, self.before)]


class Served:
    """Point reads on another client while it runs: how long each took to be answered."""

    def __init__(self, svc):
        self.client = svc.client(timeout=60)
        self.latencies = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._done.is_set():
            began = time.perf_counter()
            assert self.client.fetchval("select 1") == 1
            self.latencies.append(time.perf_counter() - began)

    @property
    def count(self):
        return len(self.latencies)

    def percentile(self, p):
        """The *p*th percentile latency, in milliseconds."""
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]

    def __str__(self):
        return "%d point reads served, p50 %.2f ms, p99 %.2f ms" % (self.count, self.percentile(50), self.percentile(99))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._done.set()
        self._thread.join(30)
        self.client.close()


@pytest.mark.parametrize("size", [
    64 * 1024 * 1024,
    pytest.param(1024 * 1024 * 1024, marks=pytest.mark.slow, id="1GiB"),
])
def test_copies_of_any_size_hold_a_window_of_memory_and_others_are_served(copy_service, db, size, capsys):
    db.execute("drop table if exists bulk; create unlogged table bulk (n int, word text)")
    try:
        pids = (copy_service.process.pid, os.getpid())
        with Served(copy_service) as alone:  # the point reads' latency without a COPY, to compare
            wait_until(lambda: alone.count >= 500, message="500 point reads")
        with PeakRss(*pids) as copy_in, Served(copy_service) as served_in:
            rows = db.copy_from(Rows(size), "bulk", size=65536)
        assert rows == size // len(Rows.ROW)
        sink = Sink()
        with PeakRss(*pids) as copy_out, Served(copy_service) as served_out:
            assert db.copy_to(sink, "bulk") == rows
        assert sink.size == rows * len(Rows.ROW)
        with capsys.disabled():
            print("\nCOPY of %d MiB: daemon RSS +%.1f MiB in, +%.1f MiB out; this client +%.1f MiB in, "
                  "+%.1f MiB out; without a COPY: %s; meanwhile, in: %s; out: %s"
                  % (size >> 20, copy_in.growth[0] / 2**20, copy_out.growth[0] / 2**20,
                     copy_in.growth[1] / 2**20, copy_out.growth[1] / 2**20, alone, served_in, served_out))
        for growth in copy_in.growth + copy_out.growth:
            assert growth < 16 * 1024 * 1024
        assert served_in.count > 0 and served_out.count > 0
    finally:
        db.execute("drop table if exists bulk")
