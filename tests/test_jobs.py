"""Jobs: transactions, errors as their psycopg2 classes, bound parameters."""

import hashlib
import time

import psycopg2
import psycopg2.errors
import pytest

import dbservice
from conftest import start_service


@pytest.fixture
def table(admin):
    admin.cursor().execute("drop table if exists items; create table items (id int primary key, label text)")
    yield "items"
    admin.cursor().execute("drop table if exists items")


def count(admin, sql="select count(*) from items"):
    cur = admin.cursor()
    cur.execute(sql)
    return cur.fetchone()[0]


def test_execute_returns_rowcount_and_commits(client, table, admin):
    assert client.execute("insert into items values (1, 'a'), (2, 'b')") == 2
    assert count(admin) == 2  # committed: another connection sees it
    assert client.execute("update items set label = 'z'") == 2


def test_server_error_arrives_as_its_psycopg2_class(client, table):
    client.execute("insert into items values (1, 'a')")
    with pytest.raises(psycopg2.errors.UniqueViolation) as info:
        client.execute("insert into items values (1, 'again')")
    assert info.value.pgcode == "23505"
    assert "duplicate key" in str(info.value)
    with pytest.raises(psycopg2.errors.SyntaxError):
        client.fetchall("selec 1")
    with pytest.raises(psycopg2.errors.DivisionByZero):
        client.fetchval("select 1 / %s", [0])
    with pytest.raises(psycopg2.errors.UndefinedTable):
        client.fetchall("select * from no_such_table")
    # and the service goes on serving
    assert client.fetchval("select 7") == 7


def test_failed_job_rolls_back_all_of_it(client, table, admin):
    with pytest.raises(psycopg2.errors.DivisionByZero):
        client.execute("insert into items values (1, 'a'); select 1 / 0")
    assert count(admin) == 0


def test_executemany_is_one_transaction(client, table, admin):
    rows = [(i, "label %d" % i) for i in range(50)]
    assert client.executemany("insert into items values (%s, %s)", rows) == 50
    assert count(admin) == 50
    with pytest.raises(psycopg2.errors.UniqueViolation):
        client.executemany("insert into items values (%s, %s)", [(100, "new"), (1, "duplicate")])
    assert count(admin, "select count(*) from items where id = 100") == 0


def test_job_that_leaves_a_transaction_open_is_rolled_back(client, table, admin):
    with pytest.raises(dbservice.Error, match="left a transaction open"):
        client.execute("begin; insert into items values (1, 'a')")
    assert count(admin) == 0
    assert client.fetchval("select count(*) from items") == 0


def test_an_error_inside_a_statements_own_begin_is_reported_and_rolled_back(client, table, admin):
    with pytest.raises(psycopg2.errors.DivisionByZero):
        client.execute("begin; insert into items values (1, 'a'); select 1/0")
    assert count(admin) == 0
    assert client.fetchval("select count(*) from items") == 0


def test_a_query_larger_than_one_send_gets_its_answer(postgresql, socket_path):
    # On the server's Unix socket: loopback TCP may buffer the whole query at once.
    dsn = postgresql.dsn(host=postgresql.socket_dir)
    text = "x" * (4 << 20)  # more than the socket takes at once: psycopg2 polls for writing
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client(timeout=30) as client:
        started = time.monotonic()
        assert client.fetchval("select length(%s)", [text]) == len(text)
        assert client.fetchval("select md5(%s)", [text]) == hashlib.md5(text.encode()).hexdigest()
        # sent as the socket drains, not left unsent until the jobs' deadline lets them go on
        assert time.monotonic() - started < 20


def test_a_failed_job_is_rolled_back_on_its_connection_which_serves_on(dsn, socket_path, table):
    """Rolled back, not closed: a connection is not worth less for a job's error."""
    with start_service(dsn, socket_path, min_size=1, max_size=1) as svc, svc.client(timeout=30) as client:
        pid = client.fetchval("select pg_backend_pid()")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            client.executemany("insert into items values (%s, %s)", [(1, "a"), (1, "again")])
        with pytest.raises(dbservice.Error, match="left a transaction open"):
            client.execute("begin; insert into items values (2, 'b')")
        assert client.fetchval("select pg_backend_pid()") == pid
        assert client.status()["connections_num"] == 1


def test_parameters_are_bound_never_interpolated(client, table, admin):
    hostile = "x'); drop table items; --"
    formats = "%s %(name)s {0} {name} %%"
    client.execute("insert into items values (%s, %s)", [1, hostile])
    client.execute("insert into items values (%(id)s, %(label)s)", {"id": 2, "label": formats})
    assert client.fetchall("select label from items order by id") == [(hostile,), (formats,)]
    assert count(admin) == 2  # the table is still there


@pytest.mark.parametrize(
    "sql, params",
    [("select %s, %s", [1]), ("select %s", [1, 2]), ("select %(a)s", {"b": 1}), ("select 5 % 2", [1])],
)
def test_parameters_that_do_not_fit_the_sql_are_refused(client, sql, params):
    with pytest.raises(dbservice.JobRefused, match="placeholders"):
        client.fetchval(sql, params)
    assert client.fetchval("select 1") == 1


def test_bad_job_is_refused_before_it_runs(client):
    with pytest.raises(dbservice.JobRefused):
        client.fetchall("select %s", object())
    with pytest.raises(dbservice.JobRefused):
        client.fetchall("select %s", [lambda: 1])
    with pytest.raises(dbservice.JobRefused, match="non-empty"):
        client.fetchall("   ")
    assert client.fetchval("select 1") == 1
