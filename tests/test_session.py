"""No client sees another client's session state: a pooled connection is reset after a job that may change it."""

import psycopg2
import pytest

from conftest import start_service

# What one client leaves in the session, and how the next one would see it.
LEAKS = {
    "set": ("set application_name = 'leaked'", "select current_setting('application_name')", ""),
    "set_config": (
        "select set_config('search_path', 'leaked', false)",
        "select current_setting('search_path')",
        '"$user", public',
    ),
    "role": ("set role lowpriv", "select current_user::text", "postgres"),
    "session_authorization": ("set session authorization lowpriv", "select session_user::text", "postgres"),
    "advisory_lock": (
        "select pg_advisory_lock(4242)",
        "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()",
        0,
    ),
    "temporary_table": (
        "create temporary table leaked as select 'secret' as word",
        "select count(*) from pg_class where relname = 'leaked' and relpersistence = 't'",
        0,
    ),
    "prepare": (  # the daemon's own prepared statements (prepared.py) aside
        "prepare leaked as select 'secret'",
        "select count(*) from pg_prepared_statements where name not like 'dbservice\\_%%'",
        0,
    ),
    "with_hold_cursor": (
        "declare leaked cursor with hold for select 'secret'",
        "select count(*) from pg_cursors",
        0,
    ),
    "listen": ("listen leaked", "select count(*) from pg_listening_channels()", 0),
}


@pytest.fixture(scope="module")
def one_connection(dsn, tmp_path_factory, admin_module):
    """A daemon whose pool has one connection, so that consecutive jobs share a session."""
    admin_module.cursor().execute(
        "do $$ begin if not exists (select from pg_roles where rolname = 'lowpriv') then "
        "create role lowpriv; end if; end $$"
    )
    directory = tmp_path_factory.mktemp("sess")
    svc = start_service(dsn, str(directory / "s.sock"), min_size=1, max_size=1)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def admin_module(dsn):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_the_next_client_never_sees_a_jobs_session_state(one_connection, case):
    change, look, clean = LEAKS[case]
    with one_connection.client(timeout=30) as first, one_connection.client(timeout=30) as second:
        backend = first.fetchval("select pg_backend_pid()")
        resets = _resets(first)
        first.fetchall(change)
        assert second.fetchval("select pg_backend_pid()") == backend  # the same pooled connection...
        assert second.fetchval(look) == clean  # ...and a clean session
        assert _resets(first) == resets + 1


@pytest.mark.parametrize("case", ["set", "temporary_table", "advisory_lock"])
def test_a_transactions_session_state_is_gone_after_it_ends(one_connection, case):
    change, look, clean = LEAKS[case]
    with one_connection.client(timeout=30) as first, one_connection.client(timeout=30) as second:
        with first.transaction() as tx:
            tx.fetchall(change)
            assert tx.fetchval(look) != clean  # the transaction itself sees its change
        assert second.fetchval(look) == clean


def test_set_local_and_plain_reads_cost_no_reset(one_connection):
    with one_connection.client(timeout=30) as c:
        resets = _resets(c)
        for i in range(20):
            assert c.fetchval("select %s::int", [i]) == i
            c.execute("update pg_settings set setting = setting where false")
            with c.transaction() as tx:
                tx.execute("set local statement_timeout = 5000")
        assert _resets(c) == resets


def _resets(client):
    return client.status()["sessions_reset"]


def test_notifications_do_not_pile_up_on_a_pooled_connection(one_connection, admin_module):
    with one_connection.client(timeout=60) as c:
        c.execute("listen piling")
        pid = one_connection.process.pid
        before = _rss_kib(pid)
        admin_module.cursor().execute("select pg_notify('piling', repeat('x', 7999)) from generate_series(1, 5000)")
        assert c.fetchval("select count(*) from pg_listening_channels()") == 0
        # 40 MB of notifications were sent; the daemon holds none of them
        assert _rss_kib(pid) - before < 16 * 1024


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def test_session_reset_always_resets_after_every_job(dsn, socket_path, admin_module):
    """What the text of a job cannot show: a function that changes the session from inside."""
    admin_module.cursor().execute(
        "create or replace function sneaky_set() returns void language plpgsql as "
        "$$ begin perform set_config('application_name', 'sneaky', false); end $$"
    )
    with start_service(dsn, socket_path, min_size=1, max_size=1, session_reset="always") as svc:
        with svc.client(timeout=30) as first, svc.client(timeout=30) as second:
            first.fetchval("select sneaky_set()")
            assert second.fetchval("select current_setting('application_name')") == ""
