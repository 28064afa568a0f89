"""Transactions that span jobs: commit, rollback, isolation, idle timeout; streaming."""

import asyncio
import concurrent.futures
import contextlib
import pickle

import psycopg2.errors
import pytest

import dbservice
from conftest import active, start_service, wait_until
from dbservice import jobs, wire
from dbservice.jobs import BEGIN, Job
from test_security import raw_connect


@pytest.fixture
def ledger(admin):
    admin.cursor().execute("drop table if exists ledger; create table ledger (id int primary key, amount int)")
    yield
    admin.cursor().execute("drop table if exists ledger")


def count(admin):
    cur = admin.cursor()
    cur.execute("select count(*) from ledger")
    return cur.fetchone()[0]


@pytest.fixture(scope="module")
def tx_service(dsn, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tx")
    svc = start_service(dsn, str(directory / "s.sock"), min_size=1, max_size=3, idle_in_transaction_timeout=1.0)
    yield svc
    svc.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_async_transaction_commits_on_success(tx_service, ledger, admin):
    async def main():
        async with await dbservice.connect_async(tx_service.socket, tx_service.authkey) as db:
            async with db.transaction() as tx:
                await tx.execute("insert into ledger values (1, 10)")
                pid1 = await tx.fetchval("select pg_backend_pid()")
                await tx.execute("insert into ledger values (2, 20)")
                pid2 = await tx.fetchval("select pg_backend_pid()")
                inside = await tx.fetchval("select count(*) from ledger")
            return pid1 == pid2, inside

    assert run(main()) == (True, 2)
    assert count(admin) == 2


def test_async_transaction_rolls_back_on_exception(tx_service, ledger, admin):
    async def main():
        async with await dbservice.connect_async(tx_service.socket, tx_service.authkey) as db:
            with pytest.raises(RuntimeError):
                async with db.transaction() as tx:
                    await tx.execute("insert into ledger values (1, 10)")
                    raise RuntimeError("the app changed its mind")
            with pytest.raises(psycopg2.errors.UniqueViolation):
                async with db.transaction() as tx:
                    await tx.execute("insert into ledger values (2, 10)")
                    await tx.execute("insert into ledger values (2, 10)")
            return await db.fetchval("select count(*) from ledger")

    assert run(main()) == 0
    assert count(admin) == 0


def test_transaction_options_reach_the_server(tx_service):
    async def main():
        async with await dbservice.connect_async(tx_service.socket, tx_service.authkey) as db:
            async with db.transaction(isolation_level="serializable", readonly=True) as tx:
                level = await tx.fetchval("show transaction_isolation")
                readonly = await tx.fetchval("show transaction_read_only")
                with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                    await tx.execute("create temporary table t (x int)")
            return level, readonly

    assert run(main()) == ("serializable", "on")


def test_idle_transaction_is_rolled_back_and_the_client_told(tx_service, ledger, admin):
    async def main():
        async with await dbservice.connect_async(tx_service.socket, tx_service.authkey) as db:
            tx = db.transaction()
            await tx.__aenter__()
            await tx.execute("insert into ledger values (1, 10)")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            # the daemon rolls it back after 1 s idle and returns the connection
            while loop.time() < deadline:
                status = await loop.run_in_executor(None, _open_transactions, tx_service)
                if status == 0:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(dbservice.Error, match="idle"):
                await tx.commit()
            return status

    assert run(main()) == 0
    assert count(admin) == 0


def test_a_transaction_idle_right_after_begin_is_rolled_back_too(tx_service):
    with tx_service.client(timeout=30) as db:
        with db.transaction() as tx:
            wait_until(lambda: db.status()["transactions_open"] == 0, message="the idle transaction's rollback")
            tx.rollback()  # what the client meant to do anyway: no error
        assert db.fetchval("select 'the connection is back'") == "the connection is back"


def _open_transactions(svc):
    with svc.client() as c:
        return c.status()["transactions_open"]


def test_async_iterate_streams_rows_in_batches(tx_service):
    async def main():
        async with await dbservice.connect_async(tx_service.socket, tx_service.authkey) as db:
            rows = [row async for row in db.iterate("select g from generate_series(1, %s) g", [2500], batch=1000)]
            async with contextlib.aclosing(db.iterate("select generate_series(1, 10000)", batch=100)) as stream:
                first = [row async for row, _ in zip_async(stream, range(5))]
            return rows, first, await db.fetchval("select 1")

    rows, first, after = run(main())
    assert rows == [(g,) for g in range(1, 2501)]
    assert first == [(1,), (2,), (3,), (4,), (5,)]
    assert after == 1


async def zip_async(stream, numbers):
    for number in numbers:
        yield await stream.__anext__(), number


def test_sync_transaction_commits_and_rolls_back(tx_service, ledger, admin):
    with tx_service.client(timeout=30) as db:
        with db.transaction() as tx:
            tx.executemany("insert into ledger values (%s, %s)", [(1, 10), (2, 20)])
            assert tx.fetchval("select sum(amount) from ledger") == 30
            assert count(admin) == 0  # not yet visible outside
        assert count(admin) == 2
        with pytest.raises(ZeroDivisionError):
            with db.transaction() as tx:
                tx.execute("delete from ledger")
                1 / 0
        assert count(admin) == 2
        with pytest.raises(dbservice.Error, match="not open"):
            tx.fetchval("select 1")


def test_a_failed_statement_fails_the_transaction_like_psycopg2(tx_service, ledger, admin):
    with tx_service.client(timeout=30) as db:
        tx = db.transaction()
        with tx:
            tx.execute("insert into ledger values (1, 10)")
            with pytest.raises(psycopg2.errors.UniqueViolation):
                tx.execute("insert into ledger values (1, 10)")
            with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
                tx.fetchval("select 1")
            tx.rollback()
        assert count(admin) == 0
        assert db.fetchval("select 'connection returned clean'") == "connection returned clean"
        assert db.status()["transactions_open"] == 0


def test_sync_iterate_streams_without_materialising(tx_service):
    with tx_service.client(timeout=30) as db:
        rows = db.iterate("select g, repeat('x', 100) from generate_series(1, %s) g", [5000], batch=500)
        total = 0
        for number, (g, text) in enumerate(rows, 1):
            assert g == number and len(text) == 100
            total += 1
            if number == 1:
                # streamed: the daemon runs our cursor inside one open transaction
                assert db.status()["transactions_open"] == 1
        assert total == 5000
        assert db.status()["transactions_open"] == 0
        stream = db.iterate("select generate_series(1, 100000)", batch=1000)
        assert next(stream) == (1,)
        stream.close()  # stopping early ends the transaction at once
        assert db.status()["transactions_open"] == 0


def test_transactions_need_the_socket(dsn):
    """The queue intake has a pipe per job: nothing to pin a transaction to."""
    with dbservice.DBService(dsn, min_size=1, max_size=1) as svc:
        client = svc.client(timeout=10)
        assert not hasattr(client, "transaction")
        with pytest.raises(dbservice.JobRefused, match="socket"):
            client._run(Job("", {}, BEGIN, 10, 1))


def test_a_job_cancelled_while_it_waits_behind_its_transactions_previous_job_gets_its_reply(tx_service):
    """Two statements of one transaction in flight at once: the second waits for the first."""
    sock = raw_connect(tx_service.socket)
    wire.client_handshake(sock, tx_service.authkey)
    sock.settimeout(10)
    sock.sendall(wire.encode_frame(1, wire.MSG_JOB, jobs.dumps_job(Job("", {}, BEGIN, None, 7))))
    assert wire.recv_frame(sock)[:2] == (1, wire.MSG_RESULT)
    slow = Job("select pg_sleep(1)::text || 'slept'", None, "value", None, 7)
    sock.sendall(  # in one write: the second job waits for the first, then is cancelled
        wire.encode_frame(2, wire.MSG_JOB, jobs.dumps_job(slow))
        + wire.encode_frame(3, wire.MSG_JOB, jobs.dumps_job(Job("select 42", None, "value", None, 7)))
        + wire.encode_frame(3, wire.MSG_CANCEL, b"")
    )
    replies = [wire.recv_frame(sock) for _ in range(2)]
    assert [job_id for job_id, _, _ in replies] == [3, 2]  # 3 answered at once, not after 2
    assert isinstance(pickle.loads(replies[0][2]), dbservice.JobCancelled)
    assert pickle.loads(replies[1][2]) == "slept"
    sock.sendall(wire.encode_frame(4, wire.MSG_JOB, jobs.dumps_job(Job("", None, "rollback", None, 7))))
    assert wire.recv_frame(sock)[:2] == (4, wire.MSG_RESULT)
    sock.close()


@pytest.fixture
def one_connection_service(dsn, socket_path):
    """One pooled connection and the default idle_in_transaction_timeout (60 s): nothing frees it early."""
    svc = start_service(dsn, socket_path, min_size=1, max_size=1)
    yield svc
    svc.stop()


def _no_transaction_left(svc, admin):
    with svc.client(timeout=10) as c:
        figures = c.status()
    cur = admin.cursor()
    cur.execute("select count(*) from pg_stat_activity where state like 'idle in transaction%%'")
    return figures["transactions_open"] == 0 and figures["pool_available"] == 1 and cur.fetchone()[0] == 0


def test_transactions_cancelled_while_they_begin_leave_no_connection_pinned(one_connection_service, admin):
    """300 transactions cut by random timeouts left 2 of 4 connections idle in transaction for 60 s."""
    import random

    svc = one_connection_service

    async def main():
        async with dbservice.connect_async(svc.socket, svc.authkey, timeout=10) as db:

            async def tx():
                async with db.transaction() as t:
                    await t.execute("select 1")

            for _ in range(300):
                try:
                    await asyncio.wait_for(tx(), random.uniform(0.0001, 0.003))
                except asyncio.TimeoutError:
                    pass
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, lambda: wait_until(lambda: _no_transaction_left(svc, admin), message="every transaction to end")
            )
            return await db.fetchval("select 'served'", timeout=2)

    assert run(main()) == "served"


def test_a_sync_transaction_interrupted_while_it_begins_is_rolled_back(one_connection_service, admin):
    import signal

    svc = one_connection_service

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted()

    with svc.client(timeout=30) as holder, svc.client(timeout=30) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            held = executor.submit(holder.fetchval, "select pg_sleep(1) /* marker-hold-begin */")
            wait_until(lambda: active(admin, "marker-hold-begin") == 1, message="the connection to be held")
            previous = signal.signal(signal.SIGALRM, interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            try:
                with pytest.raises(Interrupted):
                    with c.transaction() as tx:  # its BEGIN waits in the queue: interrupted there
                        tx.execute("select 1")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
            held.result(timeout=30)
        wait_until(lambda: _no_transaction_left(svc, admin), message="no transaction to be left")
        assert c.fetchval("select 'served'", timeout=2) == "served"


def test_a_begin_reusing_an_open_transaction_id_is_refused(tx_service, admin, ledger):
    sock = raw_connect(tx_service.socket)
    wire.client_handshake(sock, tx_service.authkey)

    def call(job_id, job):
        sock.sendall(wire.encode_frame(job_id, wire.MSG_JOB, jobs.dumps_job(job)))
        reply_id, kind, body = wire.recv_frame(sock)
        assert reply_id == job_id
        return kind, pickle.loads(body)

    assert call(1, Job("", None, BEGIN, None, 7)) == (wire.MSG_RESULT, None)
    assert call(2, Job("insert into ledger values (1, 10)", None, "rowcount", None, 7)) == (wire.MSG_RESULT, 1)
    kind, error = call(3, Job("", None, BEGIN, None, 7))
    assert kind == wire.MSG_ERROR and isinstance(error, dbservice.JobRefused) and "already open" in str(error)
    assert call(4, Job("", None, "commit", None, 7)) == (wire.MSG_RESULT, None)
    sock.close()
    cur = admin.cursor()
    cur.execute("select count(*) from pg_stat_activity where state like 'idle in transaction%%'")
    assert cur.fetchone()[0] == 0
    assert count(admin) == 1


def test_an_iterate_closed_from_another_thread_ends_its_transaction(one_connection_service, admin):
    import threading

    svc = one_connection_service
    with svc.client(timeout=30) as c:
        rows = c.iterate("select g from generate_series(1, 10000) g", batch=100)
        first, done = [], threading.Event()

        def begin_and_stay():  # the thread that began it lives on, its connection with it
            first.extend(next(rows) for _ in range(5))
            done.wait(30)

        beginner = threading.Thread(target=begin_and_stay)
        beginner.start()
        try:
            wait_until(lambda: len(first) == 5, message="the first rows")
            rows.close()  # here, in another thread than the one that began it
            assert _no_transaction_left(svc, admin)
            assert c.fetchval("select 'served'", timeout=2) == "served"
        finally:
            done.set()
            beginner.join(30)
