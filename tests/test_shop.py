"""The example shop (Django, served by gunicorn: 4 workers x 4 threads) end to end over HTTP.

PostgreSQL, the dbservice daemon and gunicorn run as real processes; the
tests check the pages against the database, and that orders racing for the
last units from every worker and thread never sell more than there is.
"""

import collections
import concurrent.futures
import csv
import io
import json
import os
import subprocess
import sys

import psycopg2
import psycopg2.extensions
import pytest

from conftest import start_service, write_secret
from webserver import get, gunicorn, post

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOP = os.path.join(ROOT, "examples", "shop")
STOCK = 40


@pytest.fixture(scope="module")
def shop_dsn(dsn):
    """A database of the shop's own in the session's PostgreSQL."""
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    admin.cursor().execute("drop database if exists shop")
    admin.cursor().execute("create database shop")
    yield psycopg2.extensions.make_dsn(dsn, dbname="shop")
    admin.cursor().execute("drop database shop with (force)")
    admin.close()


@pytest.fixture(scope="module")
def shop_db(shop_dsn):
    """A plain psycopg2 connection to the shop's database: what the pages should show."""
    conn = psycopg2.connect(shop_dsn)
    conn.autocommit = True
    yield conn.cursor()
    conn.close()


@pytest.fixture(scope="module")
def service(shop_dsn, tmp_path_factory):
    """A daemon on the shop's database, with 4 pooled connections for 16 request threads."""
    directory = tmp_path_factory.mktemp("shop")
    os.chmod(directory, 0o700)
    service = write_secret(start_service(shop_dsn, str(directory / "dbservice.sock"), min_size=2, max_size=4))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def env(service):
    """The environment the shop runs in: it finds the daemon through $DBSERVICE_SOCKET."""
    return dict(os.environ, DBSERVICE_SOCKET=service.socket, DJANGO_SETTINGS_MODULE="shop.settings")


def manage(env, *args):
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=SHOP, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


@pytest.fixture(scope="module")
def site(env, tmp_path_factory):
    manage(env, "migrate", "--verbosity", "0")
    with gunicorn(["-c", os.path.join(SHOP, "gunicorn.conf.py")], env, tmp_path_factory.mktemp("gunicorn"),
                  ready_path="/products") as url:
        yield url


@pytest.fixture
def stocked(env, site):
    manage(env, "seed", "--stock", str(STOCK))
    return site


def _json(reply, status=200):
    assert reply[0] == status, reply
    return json.loads(reply[1])


def test_the_product_pages_show_the_database(stocked, shop_db):
    shop_db.execute("select id, name, price::text, stock from store_product order by name")
    expected = [dict(zip(("id", "name", "price", "stock"), row)) for row in shop_db.fetchall()]
    assert _json(get(stocked + "/products"))["products"] == expected
    assert _json(get(stocked + "/products/%d" % expected[0]["id"])) == expected[0]
    assert get(stocked + "/products/999999")[0] == 404


def test_a_bad_order_is_refused_with_a_reason(stocked, shop_db):
    shop_db.execute("select min(id) from store_product")
    product = shop_db.fetchone()[0]
    assert "at least 1" in _json(post(stocked + "/orders", {"product": product, "quantity": 0}), 400)["error"]
    assert "send JSON" in _json(post(stocked + "/orders", {"product": "x"}), 400)["error"]
    assert post(stocked + "/orders", {"product": 999999, "quantity": 1})[0] == 404
    too_many = post(stocked + "/orders", {"product": product, "quantity": STOCK + 1})
    assert "only %d left" % STOCK in _json(too_many, 409)["error"]
    shop_db.execute("select count(*) from store_order")
    assert shop_db.fetchone() == (0,)


def test_orders_racing_for_the_last_units_never_oversell(stocked, shop_db):
    shop_db.execute("select min(id) from store_product")
    product = shop_db.fetchone()[0]
    buyers = STOCK + 24

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        order = {"product": product, "quantity": 1}
        replies = list(pool.map(lambda _: post(stocked + "/orders", order), range(buyers)))
    statuses = collections.Counter(status for status, _ in replies)
    assert statuses == {201: STOCK, 409: buyers - STOCK}, replies
    left = sorted(json.loads(body)["left"] for status, body in replies if status == 201)
    assert left == list(range(STOCK))  # each sale saw the one before it
    shop_db.execute("select stock from store_product where id = %s", [product])
    assert shop_db.fetchone() == (0,)
    shop_db.execute("select count(*), sum(quantity) from store_order where product_id = %s", [product])
    assert shop_db.fetchone() == (STOCK, STOCK)


def test_the_csv_export_streams_every_order(stocked, shop_db):
    shop_db.execute(
        "insert into store_order (product_id, quantity, placed_at)"
        " select (select min(id) from store_product), 1 + g % 3, now() from generate_series(1, 1200) g"
    )
    status, body = get(stocked + "/orders.csv")
    assert status == 200
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == ["order", "product", "quantity", "placed_at"]
    shop_db.execute("select id, quantity from store_order order by id")
    assert [(int(r[0]), int(r[2])) for r in rows[1:]] == shop_db.fetchall()


def _jobs_per_connection(service):
    with service.client() as client:
        return {c["number"]: c["jobs_done"] for c in client.status()["connections"]}


def test_many_concurrent_requests_all_succeed_over_the_daemons_pool(stocked, shop_db, service):
    shop_db.execute("select id from store_product")
    paths = ["/products"] + ["/products/%d" % row[0] for row in shop_db.fetchall()]
    before = _jobs_per_connection(service)

    def client(number):
        return [get(stocked + paths[(number + i) % len(paths)])[0] for i in range(20)]

    with concurrent.futures.ThreadPoolExecutor(32) as executor:
        statuses = collections.Counter(s for each in executor.map(client, range(32)) for s in each)
    assert statuses == {200: 32 * 20}
    after = _jobs_per_connection(service)
    assert len(after) <= 4  # 16 request threads, never more than the pool's connections
    busy = [number for number, done in after.items() if done > before.get(number, 0)]
    assert len(busy) > 1, "jobs per connection before %s, after %s" % (before, after)
