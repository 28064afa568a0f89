"""dbservice.dbapi against a real daemon: the PEP 249 suite, transactions, named cursors, errors, faults."""

import asyncio
import datetime
import enum
import os
import pickle
import threading
import zoneinfo

import dbapi20
import psycopg2
import psycopg2.errors
import pytest

import dbservice
from conftest import active, start_service, wait_until
from dbservice import dbapi


@pytest.fixture(scope="module")
def service(socket_service):
    return socket_service


@pytest.fixture
def connect(service):
    """dbapi.connect() on the module's daemon; every connection made is closed after the test."""
    made = []

    def connect(**options):
        options.setdefault("timeout", 30)
        made.append(dbapi.connect(socket=service.socket, authkey=service.authkey, **options))
        return made[-1]

    yield connect
    for conn in made:
        if not conn.closed:
            conn.close()


def open_transactions(service):
    with service.client() as client:
        return client.status()["transactions_open"]


class TestDBAPI20(dbapi20.DatabaseAPI20Test):
    """Stuart Bishop's PEP 249 compliance suite, as psycopg runs it."""

    driver = dbapi

    @pytest.fixture(autouse=True)
    def _daemon(self, service):
        self.connect_kw_args = {"socket": service.socket, "authkey": service.authkey, "timeout": 30}

    def test_nextset(self):
        pass  # optional, and not implemented (psycopg skips it too)

    def test_setoutputsize(self):
        pass  # optional; a no-op here, as in psycopg2


def test_a_server_error_is_psycopg2s_own_class(connect):
    cur = connect(autocommit=True).cursor()
    cur.execute("drop table if exists dbapi_unique; create table dbapi_unique (id int primary key)")
    cur.execute("insert into dbapi_unique values (1)")
    with pytest.raises(dbapi.IntegrityError) as caught:
        cur.execute("insert into dbapi_unique values (%s)", [1])
    assert type(caught.value) is psycopg2.errors.UniqueViolation
    assert caught.value.pgcode == "23505"
    cur.execute("drop table dbapi_unique")


@pytest.mark.parametrize(
    "error, dbapi_class",
    [
        (dbservice.ServiceUnavailable("the daemon went away"), dbapi.OperationalError),
        (dbservice.ServiceBusy("the queue stayed full"), dbapi.OperationalError),
        (dbservice.QueryTimeout("the job's timeout passed"), dbapi.OperationalError),
        (dbservice.JobCancelled("the client cancelled the job"), dbapi.OperationalError),
        (dbservice.ResultTooLarge("the result takes 9 bytes"), dbapi.OperationalError),
        (dbservice.AuthenticationError("wrong secret"), dbapi.OperationalError),
        (dbservice.JobRefused("the parameters do not fit"), dbapi.ProgrammingError),
        (dbservice.Error("the transaction is already over"), dbapi.Error),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value.__name__,
)
def test_dbservice_errors_are_dbapi_errors_and_survive_the_trip_from_the_daemon(error, dbapi_class):
    assert isinstance(error, dbapi_class) and isinstance(error, dbservice.Error)
    again = pickle.loads(pickle.dumps(error, pickle.HIGHEST_PROTOCOL))  # as the daemon sends them
    assert type(again) is type(error) and again.args == error.args and str(again) == str(error)


def test_a_statement_timeout_is_both_a_query_timeout_and_query_canceled(connect):
    conn = connect()
    cur = conn.cursor()
    cur.execute("set local statement_timeout = 50")
    with pytest.raises(dbservice.StatementTimeout) as caught:
        cur.execute("select pg_sleep(5)")
    assert isinstance(caught.value, psycopg2.errors.QueryCanceled)
    assert isinstance(caught.value, dbapi.OperationalError) and caught.value.pgcode == "57014"
    conn.rollback()


def test_the_daemons_own_errors_arrive_as_dbapi_classes(connect):
    cur = connect().cursor()
    with pytest.raises(dbapi.ProgrammingError) as refused:
        cur.execute("select %s, %s", [1])  # one parameter short: refused, nothing ran
    assert isinstance(refused.value, dbservice.JobRefused)
    with pytest.raises(dbapi.ProgrammingError):
        cur.execute("select %s", [object()])  # cannot be sent
    with pytest.raises(dbapi.OperationalError) as timed_out:
        connect(autocommit=True, timeout=0.2).cursor().execute("select pg_sleep(5)")
    assert isinstance(timed_out.value, dbservice.QueryTimeout)


def test_no_daemon_is_an_operational_error(tmp_path):
    with pytest.raises(dbapi.OperationalError) as caught:
        dbapi.connect(socket=str(tmp_path / "nobody.sock"), authkey=b"x")
    assert isinstance(caught.value, dbservice.ServiceUnavailable)


def test_statements_share_one_transaction_until_commit(connect, service):
    writer, reader = connect(), connect(autocommit=True)
    w, r = writer.cursor(), reader.cursor()
    r.execute("drop table if exists dbapi_tx; create table dbapi_tx (n int)")
    w.execute("insert into dbapi_tx values (1)")
    w.execute("insert into dbapi_tx values (2)")
    w.execute("select count(*) from dbapi_tx")
    assert w.fetchone() == (2,)  # its own writes, on its pinned connection
    r.execute("select count(*) from dbapi_tx")
    assert r.fetchone() == (0,)  # nobody else's
    assert open_transactions(service) == 1
    writer.commit()
    assert open_transactions(service) == 0
    r.execute("select count(*) from dbapi_tx")
    assert r.fetchone() == (2,)
    w.execute("delete from dbapi_tx")
    writer.rollback()
    r.execute("select count(*) from dbapi_tx")
    assert r.fetchone() == (2,)
    r.execute("drop table dbapi_tx")


def test_autocommit_pins_nothing(connect, service):
    conn = connect(autocommit=True)
    cur = conn.cursor()
    cur.execute("select 1")
    assert open_transactions(service) == 0
    conn.autocommit = False
    cur.execute("select 1")
    assert open_transactions(service) == 1
    with pytest.raises(dbapi.ProgrammingError):
        conn.autocommit = True  # not inside a transaction
    conn.rollback()
    assert open_transactions(service) == 0


def test_isolation_level_and_readonly_apply_to_the_next_transaction(connect):
    conn = connect()
    conn.set_session(isolation_level="repeatable read", readonly=True)
    cur = conn.cursor()
    cur.execute("show transaction_isolation")
    assert cur.fetchone() == ("repeatable read",)
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        cur.execute("create temporary table never (n int)")
    conn.rollback()

    class IsolationLevel(enum.IntEnum):  # as psycopg 3 numbers them: taken by name
        SERIALIZABLE = 4

    conn.set_session(readonly=False)
    conn.isolation_level = IsolationLevel.SERIALIZABLE
    assert conn.isolation_level == "SERIALIZABLE"
    cur.execute("show transaction_isolation")
    assert cur.fetchone() == ("serializable",)
    conn.rollback()
    conn.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED
    assert conn.isolation_level == "READ COMMITTED"
    with pytest.raises(dbapi.ProgrammingError):
        conn.isolation_level = "sometimes"


def test_a_connection_handed_from_thread_to_thread_keeps_its_transaction(connect, service):
    """What SQLAlchemy's pool does: the transaction is the connection's, not a thread's."""
    conn = connect()
    steps = [
        lambda cur: cur.execute("create temporary table handed (n int)"),
        lambda cur: cur.execute("insert into handed values (1)"),
        lambda cur: cur.execute("select count(*) from handed"),
    ]
    for step in steps:
        thread = threading.Thread(target=step, args=(conn.cursor(),))
        thread.start()
        thread.join()
    cur = conn.cursor()
    cur.execute("select count(*) from handed")  # a temporary table: only its own backend sees it
    assert cur.fetchone() == (1,)
    conn.rollback()


def test_closing_rolls_back_what_is_open(connect, service):
    conn = connect()
    conn.cursor().execute("select 1")
    assert open_transactions(service) == 1
    conn.close()
    assert open_transactions(service) == 0
    with pytest.raises(dbapi.InterfaceError):
        conn.cursor()


def test_framework_subclasses_of_plain_values_are_sent_as_those_values(connect):
    class Status(str, enum.Enum):
        DRAFT = "draft"

    class Stars(enum.IntEnum):
        FIVE = 5

    class Safe(str):
        pass

    cur = connect().cursor()
    cur.execute("select %s, %s, %s, %s", [Status.DRAFT, Stars.FIVE, Safe("<b>"), bytearray(b"\x00\x01")])
    assert cur.fetchone() == ("draft", 5, "<b>", b"\x00\x01")
    cur.execute("select %(s)s, 5 in %(t)s", {Safe("s"): Status.DRAFT, "t": (Stars.FIVE, Stars.FIVE)})
    assert cur.fetchone() == ("draft", True)
    paris = datetime.datetime(2026, 3, 29, 3, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))  # just past DST
    cur.execute("select %s", [paris])
    assert cur.fetchone() == (paris,)  # the same instant (at its offset then, +02:00)


def test_a_named_cursor_streams_in_batches(connect, service):
    conn = connect()
    cur = conn.cursor("rows")
    cur.itersize = 100
    cur.execute("select g, repeat('x', 10) from generate_series(1, 1000) g")
    assert cur.fetchone() == (1, "xxxxxxxxxx")
    assert [c.name for c in cur.description] == ["g", "repeat"]
    assert cur.description[0].type_code == dbapi.NUMBER
    assert len(cur._rows) == 100  # one batch in hand, the rest on the server
    assert cur.fetchmany(150)[-1][0] == 151
    assert len(cur._rows) == cur.rownumber  # it fetched the 51 missing rows, no more
    assert [row[0] for row in cur] == list(range(152, 1001))
    cur.close()
    conn.commit()
    # A named cursor lives in the transaction it was declared in.
    stale = conn.cursor("stale")
    stale.itersize = 1
    stale.execute("select 1 union all select 2")
    conn.commit()
    with pytest.raises(dbapi.ProgrammingError):
        stale.fetchall()
    with pytest.raises(dbapi.NotSupportedError):
        conn.cursor("held", withhold=True).execute("select 1")
    conn.rollback()


def test_a_named_cursor_in_autocommit_holds_a_transaction_of_its_own_while_it_has_rows(connect, service):
    conn = connect(autocommit=True)
    cur = conn.cursor("own", withhold=True)  # as Django asks for one in autocommit
    cur.itersize = 10
    cur.execute("select g from generate_series(1, 25) g")
    assert open_transactions(service) == 1
    conn.cursor().execute("select 1")  # meanwhile, statements of its connection run as ever
    assert len(cur.fetchall()) == 25
    assert open_transactions(service) == 0  # ended with its last row
    early = conn.cursor("early")
    early.execute("select g from generate_series(1, 5000) g")
    assert early.fetchone() == (1,)
    early.close()
    assert open_transactions(service) == 0
    with pytest.raises(dbapi.ProgrammingError):
        bad = conn.cursor("bad")
        bad.execute("select * from no_such_table")
    assert open_transactions(service) == 0
    failing = conn.cursor("failing")
    failing.execute("select 1 / (g - 3) from generate_series(1, 5) g")  # fails as the rows are made
    with pytest.raises(psycopg2.errors.DivisionByZero):
        failing.fetchall()
    assert open_transactions(service) == 0  # ended at once, not when the cursor is closed


def test_a_restarted_daemon_loses_open_transactions_and_nothing_else(dsn, socket_path):
    svc = start_service(dsn, socket_path, min_size=1, max_size=2)
    try:
        idle = dbapi.connect(socket=socket_path, authkey=svc.authkey, timeout=30, autocommit=True)
        busy = dbapi.connect(socket=socket_path, authkey=svc.authkey, timeout=30)
        idle.cursor().execute("select 1")
        busy.cursor().execute("create temporary table lost (n int)")
        svc.stop()
        svc.start()
        cur = idle.cursor()
        cur.execute("select 2")  # a new socket, unnoticed
        assert cur.fetchone() == (2,)
        cur = busy.cursor()
        for _ in range(2):  # the transaction is gone: no statement may run as if it were not
            with pytest.raises(dbapi.OperationalError) as caught:
                cur.execute("insert into lost values (1)")
            assert isinstance(caught.value, dbservice.ServiceUnavailable)
        with pytest.raises(dbapi.OperationalError):
            busy.commit()
        busy.rollback()
        cur.execute("select 3")  # a new transaction, on a new socket
        assert cur.fetchone() == (3,)
        busy.commit()
        idle.close()
        busy.close()
    finally:
        svc.stop()


def test_a_forked_child_uses_a_socket_of_its_own(connect):
    conn = connect(autocommit=True)
    conn.cursor().execute("select 1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        code = 1
        try:
            cur = conn.cursor()
            cur.execute("select %s", [41])
            code = 0 if cur.fetchone() == (41,) else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    assert os.read(read, 1) == b"\x00"
    os.waitpid(pid, 0)
    cur = conn.cursor()
    cur.execute("select 42")
    assert cur.fetchone() == (42,)


async def until(condition, timeout=10.0):
    """Wait on the event loop until *condition* holds; fail the test after *timeout* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail("timed out after %.1f s waiting for a condition" % timeout)
        await asyncio.sleep(0.02)


def test_the_asyncio_connection(service, admin):
    async def main():
        conn = await dbapi.connect_async(socket=service.socket, authkey=service.authkey, timeout=30)
        async with conn.cursor() as cur:
            await cur.execute("create temporary table a (n int)")
            await cur.executemany("insert into a values (%s)", [(1,), (2,), (3,)])
            assert cur.rowcount == 3
            await cur.execute("select n from a order by n")
            assert cur.description[0].name == "n"
            assert await cur.fetchone() == (1,)
            assert await cur.fetchall() == [(2,), (3,)]
        named = conn.cursor("arows")
        named.itersize = 2
        await named.execute("select n from a order by n")
        assert [row async for row in named] == [(1,), (2,), (3,)]
        await named.close()
        await conn.rollback()
        # Cancelling a task inside a transaction cancels its statement; the transaction is the caller's to end.
        cur = conn.cursor()
        await cur.execute("select 1")
        task = asyncio.ensure_future(cur.execute("select pg_sleep(30)"))
        await until(lambda: active(admin, "pg_sleep(30)") == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: active(admin, "pg_sleep(30)") == 0)  # cancelled on the server
        await conn.rollback()
        await cur.execute("select 2")
        assert await cur.fetchone() == (2,)
        await conn.close()
        with pytest.raises(dbapi.InterfaceError):
            await conn.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    wait_until(lambda: open_transactions(service) == 0, message="the asyncio transactions to end")
