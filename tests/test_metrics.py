"""The Prometheus endpoint, scraped over HTTP from running daemons and read with prometheus_client's parsers."""

import asyncio
import concurrent.futures
import os
import re
import socket
import urllib.error
import urllib.request

import psycopg2
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

import dbservice
from conftest import start_service, wait_until
from dbservice.display import format_status
from proxy import TcpProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The labels of the pool's figures: with no replica, the one pool is the primary's.
POOL = {"pool": "pool", "role": "primary"}


@pytest.fixture(scope="module")
def service(dsn, tmp_path_factory):
    """One connection and room for one job waiting for it, so that a second one waiting is busy."""
    directory = tmp_path_factory.mktemp("m")
    os.chmod(directory, 0o700)
    svc = start_service(dsn, str(directory / "dbservice.sock"), min_size=1, max_size=1, max_queue=1,
                        metrics="127.0.0.1:0")
    yield svc
    svc.stop()


def address(svc):
    with svc.client(timeout=10) as db:
        return db.status()["metrics"]


def get(svc, path="/metrics", **request):
    with urllib.request.urlopen(urllib.request.Request("http://%s%s" % (address(svc), path), **request),
                                timeout=10) as response:
        return response.headers, response.read().decode()


def samples(svc):
    """Every sample of a scrape: {(name, (label, value) pairs): value}."""
    _, text = get(svc)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped, name, **labels):
    return scraped[(name, tuple(sorted(labels.items())))]


def test_every_outcome_of_a_job_is_counted_and_timed(service):
    before = samples(service)
    with service.client(timeout=30) as db, concurrent.futures.ThreadPoolExecutor(2) as executor:
        assert db.fetchval("select 1") == 1 and db.execute("select 2") == 1
        with pytest.raises(psycopg2.errors.DivisionByZero):
            db.fetchval("select 1 / 0")
        with pytest.raises(dbservice.QueryTimeout):
            db.fetchval("select pg_sleep(5)", timeout=0.2)
        with pytest.raises(dbservice.JobRefused):
            db.fetchval("select %s", [1, 2])  # more parameters than placeholders
        asyncio.run(_cancel_a_running_job(service, db.status))
        # The one connection busy for a second, one job waiting for it: a third finds the queue full.
        running = executor.submit(db.fetchval, "select 'slept' from pg_sleep(1)")
        wait_until(lambda: db.status()["jobs_running"] == 1, message="the slow job to run")
        waiting = executor.submit(db.fetchval, "select 'waited'")
        wait_until(lambda: db.status()["requests_waiting"] == 1, message="the next job to wait")
        with pytest.raises(dbservice.ServiceBusy):
            db.fetchval("select 'no room'")
        assert (running.result(), waiting.result()) == ("slept", "waited")
    after = samples(service)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    outcomes = {"done": 4, "failed": 1, "timed_out": 1, "cancelled": 1, "refused": 1, "busy": 1}
    assert {outcome: delta("dbservice_jobs_total", outcome=outcome) for outcome in outcomes} == outcomes
    jobs = sum(outcomes.values())
    assert delta("dbservice_job_duration_seconds_count") == jobs
    assert delta("dbservice_job_duration_seconds_bucket", le="+Inf") == jobs
    # the second of sleep, and the timeout's fifth of one, took longer than 0.1 s; the others not
    assert jobs - delta("dbservice_job_duration_seconds_bucket", le="0.1") >= 3
    assert delta("dbservice_job_duration_seconds_sum") > 1.2
    # every job that asked the pool for a connection; one waited about a second for it
    waits = delta("dbservice_pool_wait_seconds_count", **POOL)
    assert waits >= jobs - 1  # the busy one never waited
    assert waits - delta("dbservice_pool_wait_seconds_bucket", le="0.5", **POOL) == 1
    assert 0.5 < delta("dbservice_pool_wait_seconds_sum", **POOL) < 1.5
    assert delta("dbservice_received_bytes_total") > 0 and delta("dbservice_sent_bytes_total") > 0
    assert delta("dbservice_client_connections_accepted_total") >= 2


async def _cancel_a_running_job(service, status):
    async with dbservice.connect_async(socket=service.socket, authkey=service.authkey, timeout=30) as db:
        task = asyncio.ensure_future(db.fetchval("select pg_sleep(5)"))
        await _until(lambda: status()["jobs_running"] == 1)  # on the pool's one connection
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the daemon answers the cancelled job once the server has cancelled its query
        await _until(lambda: status()["jobs_running"] == 0)


async def _until(condition, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_the_pool_and_its_clients_as_gauges(service):
    with service.client(timeout=10) as db:
        db.fetchval("select 1")
        status = db.status()
        scraped = samples(service)
    assert value(scraped, "dbservice_database_reachable") == 1
    assert value(scraped, "dbservice_pool_connections", state="idle", **POOL) == status["pool_available"] == 1
    assert value(scraped, "dbservice_pool_connections", state="busy", **POOL) == 0
    assert value(scraped, "dbservice_pool_min_connections", **POOL) == value(scraped, "dbservice_pool_max_connections", **POOL) == 1
    assert value(scraped, "dbservice_client_connections") >= 1
    assert value(scraped, "dbservice_jobs_waiting", **POOL) == value(scraped, "dbservice_jobs_running") == 0
    assert value(scraped, "process_resident_memory_bytes") > 0


def test_a_pause_shows_until_resume(service):
    with service.client(timeout=10) as db:
        assert value(samples(service), "dbservice_paused") == 0
        assert db.pause(timeout=10)["pause"] == "paused"
        try:
            assert value(samples(service), "dbservice_paused") == 1
        finally:
            db.resume()
        assert value(samples(service), "dbservice_paused") == 0
        assert db.fetchval("select 1") == 1


def test_subscriptions_notifications_and_copies_show(service):
    with service.client(timeout=10) as db, db.listen("metrics_heard", timeout=10) as heard:
        db.notify("metrics_heard", "1")
        assert next(iter(heard)).payload == "1"
        status = db.status()
        scraped = samples(service)
    assert value(scraped, "dbservice_subscriptions") == status["subscriptions"] == 1
    assert value(scraped, "dbservice_channels_listened") == status["channels_listened"] == 1
    assert value(scraped, "dbservice_notifications_delivered_total") == status["notifications_delivered"] >= 1
    assert value(scraped, "dbservice_notifications_dropped_total") == status["notifications_dropped"] == 0
    assert value(scraped, "dbservice_copies_running") == status["copies_running"] == 0
    text = format_status(status)
    assert "listen       1 subscriptions on 1 channels" in text and "copy         0 running" in text


def test_the_statements_prepared_on_the_pool_are_counted(service):
    before = value(samples(service), "dbservice_prepared_statements", **POOL)
    with service.client(timeout=10) as db:
        for n in range(3):
            assert db.fetchval("select %s::int + 40 as metrics_prepared", [n]) == 40 + n
    assert value(samples(service), "dbservice_prepared_statements", **POOL) == before + 1  # one connection, one statement


def test_an_unreachable_database_and_the_reconnect_show(postgresql, socket_path):
    link = TcpProxy("127.0.0.1", postgresql.port)
    link.start()
    svc = start_service(link.dsn(dbname="test", user="postgres"), socket_path, min_size=1, max_size=2,
                        metrics="127.0.0.1:0")
    try:
        assert value(samples(svc), "dbservice_database_reachable") == 1
        link.stop()  # the pool's connection is cut and no new one can be opened
        down = wait_until(lambda: (lambda s: s if value(s, "dbservice_database_reachable") == 0 else None)(
            samples(svc)), message="the scrape to say the database is unreachable")
        assert value(down, "dbservice_pool_connections_lost_total", **POOL) == 1
        assert value(down, "dbservice_pool_connection_errors_total", **POOL) >= 1
        link.start()
        up = wait_until(lambda: (lambda s: s if value(s, "dbservice_database_reachable") == 1 else None)(
            samples(svc)), message="the scrape to say the database is back")
        assert value(up, "dbservice_pool_reconnects_total", **POOL) == 1
    finally:
        svc.stop()
        link.close()


def test_openmetrics_when_asked_not_found_elsewhere_and_garbage_is_shrugged_off(service):
    headers, text = get(service, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    names = {family.name for family in parse_openmetrics(text)}
    assert {"dbservice_jobs", "dbservice_job_duration_seconds", "dbservice_database_reachable"} <= names
    headers, text = get(service, method="HEAD")
    assert text == "" and int(headers["Content-Length"]) > 0
    with pytest.raises(urllib.error.HTTPError) as answer:
        get(service, path="/elsewhere")
    assert answer.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as answer:
        get(service, method="POST", data=b"x")
    assert answer.value.code == 405
    host, port = address(service).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as peer:
        peer.sendall(b"\x00" * 10000)  # no request line ends within the limit: the endpoint hangs up
        assert peer.recv(100) == b""
    assert "dbservice_jobs_total" in get(service)[1]


def _readme_section(title):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n%s\n" % title) + len(title) + 2
    return text[start:re.compile(r"\n##+ ").search(text, start).start()]


def test_the_readmes_alert_rules_name_what_the_daemon_exports(service):
    rules = [block for block in re.findall(r"```yaml\n(.*?)```", _readme_section("### Metrics"), re.S)
             if "alert:" in block]
    assert len(rules) == 1
    named = set(re.findall(r"\bdbservice_\w+", rules[0]))
    assert len(named) >= 3
    exported = {name for name, _ in samples(service)}
    assert named <= exported, named - exported
