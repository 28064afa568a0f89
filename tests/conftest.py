"""Shared fixtures: one real PostgreSQL for the whole run, and services on it."""

import concurrent.futures
import contextlib
import os
import time

import psycopg2
import pytest

import dbservice
from daemons import ensure_stopped
from dbservice.embedded import Cluster


@pytest.fixture(scope="session")
def postgresql():
    server = Cluster.temporary()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dsn(postgresql):
    return postgresql.dsn()


@pytest.fixture(scope="session")
def replicated():
    """A primary and two streaming standbys of it, for the whole run: ``(primary, [standby, standby])``.

    Apart from ``postgresql``, since tests kill, pause and restart these.
    """
    primary = Cluster.temporary()
    standbys = []
    try:
        for _ in range(2):
            standbys.append(primary.standby())
        wait_until(lambda: all(standby.streaming() for standby in standbys), timeout=30,
                   message="both standbys to stream")
        yield primary, standbys
    finally:
        for standby in standbys:
            standby.stop()
        primary.stop()


@pytest.fixture
def admin(dsn):
    """A plain psycopg2 connection, in autocommit, to look at the server directly."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def socket_path(tmp_path_factory):
    # Unix socket paths are limited to ~107 bytes: keep them short.
    directory = tmp_path_factory.mktemp("s", numbered=True)
    os.chmod(directory, 0o700)
    return str(directory / "dbservice.sock")


def start_service(dsn, socket=None, **options):
    return dbservice.DBService(dsn, socket=socket, **options).start()


@pytest.fixture(params=["socket", "queue"])
def service(request, dsn, socket_path):
    """A running service on each intake: the Unix socket (b) and the multiprocessing queue (a)."""
    svc = start_service(dsn, socket_path if request.param == "socket" else None, max_size=4)
    yield svc
    svc.stop()


@pytest.fixture
def client(service):
    with service.client(timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def socket_service(dsn, tmp_path_factory):
    """One socket service shared by a module's tests."""
    directory = tmp_path_factory.mktemp("m")
    os.chmod(directory, 0o700)
    svc = start_service(dsn, str(directory / "dbservice.sock"), max_size=4)
    yield svc
    svc.stop()


def write_secret(service):
    """Put *service*'s secret next to its socket, where a client given only the socket finds it."""
    path = os.path.join(os.path.dirname(service.socket), "secret")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(service.authkey)
    return service


def wait_until(condition, timeout=10.0, interval=0.02, message="condition"):
    """Poll *condition* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.1f s waiting for %s" % (timeout, message))
        time.sleep(interval)


def active(admin, marker):
    """How many queries containing *marker* the server is running right now."""
    cur = admin.cursor()
    cur.execute(
        "select count(*) from pg_stat_activity where state = 'active' and query like %s"
        " and pid <> pg_backend_pid()",
        ["%" + marker + "%"],
    )
    return cur.fetchone()[0]


@pytest.fixture
def state_dir(tmp_path_factory):
    # Unix socket paths are limited to ~107 bytes: keep them short.
    return tmp_path_factory.mktemp("d")


@pytest.fixture
def daemon_dir(dsn, state_dir):
    """A state directory whose daemon, if a test starts one, is stopped at the end."""
    yield state_dir
    ensure_stopped(state_dir)


@contextlib.contextmanager
def held_jobs(admin, client, count=1, lock=4700):
    """*count* jobs of *client*, each holding a pooled connection until the block ends.

    They wait on an advisory lock *admin* holds for the block, so they run as
    long as the test needs, and no longer: no sleep to outlast. Yields their
    futures; each job's result is 'held'.
    """
    marker = "held-job-%d" % lock
    sql = "select pg_advisory_xact_lock_shared(%s)::text || 'held' /* " + marker + " */"
    with concurrent.futures.ThreadPoolExecutor(count) as executor:
        admin.cursor().execute("select pg_advisory_lock(%s)", [lock])
        try:
            jobs = [executor.submit(client.fetchval, sql, [lock]) for _ in range(count)]
            wait_until(lambda: active(admin, marker) == count, message="%d jobs to hold their connections" % count)
            yield jobs
        finally:
            admin.cursor().execute("select pg_advisory_unlock(%s)", [lock])
        assert [job.result(timeout=30) for job in jobs] == ["held"] * count
