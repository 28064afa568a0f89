"""Each pooled connection prepares the statements it runs: invisible to clients but for the server's work."""

import datetime
import decimal
import uuid

import psycopg2.errors
import pytest

from conftest import start_service

VALUES = [
    ("select %s", [42]),
    ("select %s", [2 ** 40]),
    ("select %s", [2 ** 70]),
    ("select %s", [4.25]),
    ("select %s", [float("inf")]),
    ("select %s", [decimal.Decimal("1.50")]),
    ("select %s", [True]),
    ("select %s", ["text"]),
    ("select %s", [None]),
    ("select %s", [b"\x00\xff"]),
    ("select %s", [datetime.date(2020, 1, 2)]),
    ("select %s", [datetime.datetime(2020, 1, 2, 3, 4, 5)]),
    ("select %s", [datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)]),
    ("select %s", [datetime.time(1, 2, 3)]),
    ("select %s", [datetime.timedelta(days=1, seconds=2)]),
    ("select %s", [uuid.UUID("12345678-1234-5678-1234-567812345678")]),
    ("select %s + 1, %s || 'x'", [1, "a"]),
    ("select %(a)s, %(a)s, %(b)s", {"a": 1, "b": "two"}),
    ("select 100 %% 7, %s", [3]),
    ("select %s is null", [None]),
    ("select '%%s' || %s", ["x"]),
    ("select 1 where %s", [False]),
]


@pytest.fixture(scope="module")
def both(dsn, tmp_path_factory):
    """Two daemons of one connection each, one preparing statements and one not."""
    directory = tmp_path_factory.mktemp("prep")
    prepared = start_service(dsn, str(directory / "p.sock"), min_size=1, max_size=1)
    plain = start_service(dsn, str(directory / "n.sock"), min_size=1, max_size=1, max_prepared=0)
    yield prepared, plain
    prepared.stop()
    plain.stop()


def _typed(rows):
    return [tuple((type(v).__name__, v) for v in row) for row in rows]


@pytest.mark.parametrize("sql, params", VALUES, ids=[str(i) for i in range(len(VALUES))])
def test_prepared_statements_give_the_results_and_types_of_plain_text(both, sql, params):
    prepared, plain = both
    with prepared.client(timeout=30) as p, plain.client(timeout=30) as n:
        expected = _typed(n.fetchall(sql, params))
        for _ in range(3):  # the first prepares it; then it is executed
            assert _typed(p.fetchall(sql, params)) == expected
            assert p.fetchtable(sql, params)[0] == n.fetchtable(sql, params)[0]  # the columns' names


def _ours(client):
    return client.fetchval("select count(*) from pg_prepared_statements where name like 'dbservice\\_%%'")


def test_a_statement_runs_prepared_from_its_second_time(both):
    prepared, plain = both
    with prepared.client(timeout=30) as p, plain.client(timeout=30) as n:
        before = _ours(p)
        for i in range(5):
            assert p.fetchval("select %s::int * 3 /* prepared-marker */", [i]) == i * 3
        assert _ours(p) == before + 1  # one statement, prepared once
        assert _ours(n) == 0  # max_prepared 0 prepares none


def test_the_same_errors_come_back(both):
    prepared, _ = both
    with prepared.client(timeout=30) as p:
        for _ in range(3):
            with pytest.raises(psycopg2.errors.DivisionByZero):
                p.fetchval("select 1 / %s", [0])
            with pytest.raises(psycopg2.errors.UndefinedTable):
                p.fetchall("select * from no_such_table where id = %s", [1])
            with pytest.raises(psycopg2.errors.SyntaxError):
                p.fetchall("selec %s", [1])
        assert p.fetchval("select 'served'") == "served"


def test_a_statement_whose_result_changed_under_it_is_prepared_again(both, admin):
    prepared, _ = both
    admin.cursor().execute("drop table if exists reshaped; create table reshaped (id int, a text)")
    admin.cursor().execute("insert into reshaped values (1, 'x')")
    sql = "select * from reshaped /* reshaped-marker */ where id = %s"
    # what this connection prepared for *sql* since the change (the text a PREPARE came in holds its values)
    fresh = (
        "select count(*) from pg_prepared_statements where prepare_time > %s and statement like %s"
        " and statement not like '%%pg_prepared_statements%%'"
    )
    with prepared.client(timeout=30) as p:
        for _ in range(2):
            assert p.fetchall(sql, [1]) == [(1, "x")]
        cur = admin.cursor()
        cur.execute("alter table reshaped add column b int; select clock_timestamp()")
        altered = cur.fetchone()[0]
        for _ in range(2):  # the stale plan fails and the job runs as plain text; then it is prepared anew
            assert p.fetchall(sql, [1]) == [(1, "x", None)]
        assert p.fetchval(fresh, [altered, "%reshaped-" + "marker%"]) == 1
    admin.cursor().execute("drop table reshaped")


def test_transactions_and_executemany_run_prepared_statements(both, admin):
    prepared, _ = both
    admin.cursor().execute("drop table if exists batch; create table batch (id int primary key, label text)")
    with prepared.client(timeout=30) as p:
        assert p.executemany("insert into batch values (%s, %s)", [(i, "l%d" % i) for i in range(50)]) == 50
        assert p.executemany("insert into batch values (%s, %s)", [(i, None) for i in range(50, 60)]) == 10
        # one the server will not prepare ($2 is null: no type for $2), in the executemany's own transaction
        assert p.executemany("insert into batch select %s, 'n' where %s is null", [(100, None), (101, 1)]) == 1
        with p.transaction() as tx:
            for i in range(3):
                assert tx.fetchval("select label from batch where id = %s", [i]) == "l%d" % i
        with pytest.raises(psycopg2.errors.UniqueViolation):
            p.executemany("insert into batch values (%s, %s)", [(200, "a"), (1, "dup")])
    cur = admin.cursor()
    cur.execute("select count(*) from batch")
    assert cur.fetchone()[0] == 61
    cur.execute("drop table batch")


def test_each_connection_keeps_at_most_max_prepared(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_prepared=2) as svc, svc.client(timeout=30) as c:
        for round_ in range(3):
            for n in range(5):
                assert c.fetchval("select %%s::int + %d" % n, [round_]) == round_ + n
        assert _ours(c) <= 2


def test_a_session_reset_forgets_the_prepared_statements(both):
    """Prepared anew, not an EXECUTE of what is gone: that fails, and runs again as plain text, unprepared."""
    prepared, _ = both
    sql = "select count(*) from pg_prepared_statements where name like 'dbservice\\_%%' and %s"
    with prepared.client(timeout=30) as p:
        for _ in range(2):
            assert p.fetchval(sql, [True]) >= 1  # itself among them
        p.execute("set application_name = 'reset me'")  # DISCARD ALL after it
        assert p.fetchval(sql, [True]) == 1  # itself alone
