"""Under gunicorn -k gevent, the sync client and the DB-API module yield to other greenlets while they wait.

Fifty requests that each sleep 0.5 s in PostgreSQL overlap as far as the
daemon's pool lets them: its ten connections are all busy at once, which one
greenlet blocking the worker could never make them.
"""

import collections
import concurrent.futures
import importlib.util
import os

import pytest

from conftest import active, start_service, wait_until, write_secret
from webserver import get, gunicorn

# Not imported here: only gunicorn's worker needs it, and patches itself with it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gevent") is None, reason="gevent is not installed")

POOL = 10
REQUESTS = 50
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def site(dsn, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gv")
    os.chmod(directory, 0o700)
    service = write_secret(start_service(dsn, str(directory / "dbservice.sock"), min_size=POOL, max_size=POOL))
    env = dict(os.environ, DBSERVICE_SOCKET=service.socket)
    args = ["--worker-class", "gevent", "--workers", "1", "--worker-connections", "200",
            "--pythonpath", TESTS, "gevent_app:app"]
    try:
        with gunicorn(args, env, tmp_path_factory.mktemp("gunicorn"), ready_path="/health") as url:
            yield url
    finally:
        service.stop()


@pytest.mark.parametrize("path", ["/client", "/dbapi"])
def test_concurrent_requests_overlap_up_to_the_pool_size(site, admin, path):
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        replies = [pool.submit(get, site + path) for _ in range(REQUESTS)]
        wait_until(lambda: active(admin, "pg_sleep(0.5)") == POOL, timeout=20,
                   message="all %d pooled connections sleeping at once" % POOL)
        statuses = collections.Counter(reply.result()[0] for reply in replies)
    assert statuses == {200: REQUESTS}
