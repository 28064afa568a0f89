"""LISTEN/NOTIFY through the daemon: subscribers, slow ones, and restarts of the daemon and of the database."""

import asyncio
import os
import queue
import select
import threading

import psycopg2
import pytest

import dbservice
from conftest import start_service, wait_until
from dbservice import dbapi
from dbservice.embedded import Cluster


@pytest.fixture(scope="module")
def notify_service(dsn, tmp_path_factory):
    directory = tmp_path_factory.mktemp("n")
    os.chmod(directory, 0o700)
    svc = start_service(dsn, str(directory / "dbservice.sock"), min_size=1, max_size=2)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def db(notify_service):
    with notify_service.client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def sender(dsn):
    """A plain psycopg2 connection, in autocommit, that NOTIFYs as any other application would."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    yield conn.cursor()
    conn.close()


def received(subscription, count, timeout=10):
    """The next *count* items of *subscription*, waiting at most *timeout* seconds for each."""
    items = []
    for _ in range(count):
        item = subscription.receive(timeout)
        assert item is not None, "only %d of %d notifications within %.0f s: %r" % (len(items), count, timeout, items)
        items.append(item)
    return items


def until_fence(subscription, fence="fence", timeout=10):
    """What arrives up to the notification on channel *fence*, which is sent after what the test looks for."""
    items = []
    while True:
        item = subscription.receive(timeout)
        assert item is not None, "no %r notification within %.0f s; got %r" % (fence, timeout, items)
        if item.channel == fence:
            return items
        items.append(item)


def test_a_subscriber_hears_what_is_sent_after_it_subscribed(db, sender):
    sender.execute("select pg_notify('greetings', 'before')")
    with db.listen("greetings", "Other Case") as subscription:
        db.notify("greetings", "hello")
        sender.execute("select pg_notify('greetings', 'from psycopg2'), pg_backend_pid()")
        backend = sender.fetchone()[1]
        sender.execute("""NOTIFY "Other Case", 'quoted'""")
        sender.execute("select pg_notify('not listened', 'x')")
        db.notify("greetings")
        first, second, third, fourth = received(subscription, 4)
    assert first[:2] == ("greetings", "hello") and isinstance(first, dbservice.Notification)
    assert second == dbservice.Notification("greetings", "from psycopg2", backend)
    assert third[:2] == ("Other Case", "quoted")  # names are exact, as pg_notify() takes them
    assert fourth[:2] == ("greetings", "")


def test_notifications_sent_in_a_transaction_arrive_when_it_commits(db, sender):
    with db.listen("orders", "fence") as subscription:
        with db.transaction() as tx:
            tx.notify("orders", "in the transaction")
            sender.execute("select pg_notify('fence', '')")
            assert until_fence(subscription) == []  # not before the commit
        sender.execute("select pg_notify('fence', '')")
        assert [n.payload for n in until_fence(subscription)] == ["in the transaction"]
        with pytest.raises(ZeroDivisionError):
            with db.transaction() as tx:
                tx.notify("orders", "rolled back")
                raise ZeroDivisionError
        sender.execute("select pg_notify('fence', '')")
        assert until_fence(subscription) == []  # never


def test_listening_pins_no_pooled_connection_and_takes_one_of_its_own(notify_service, db, sender):
    before = db.status()
    subscriptions = [db.listen("many %d" % (n % 5)) for n in range(40)]
    try:
        sender.execute("select count(*) from pg_stat_activity where query like 'LISTEN%%' and pid <> pg_backend_pid()")
        assert sender.fetchone()[0] == 1  # one listening connection for all of them
        status = db.status()
        assert (status["subscriptions"], status["channels_listened"]) == (40, 5)
        assert status["pool_size"] == before["pool_size"]
        assert db.fetchval("select 'jobs run as before'") == "jobs run as before"
        sender.execute("select pg_notify('many 3', 'all hear it')")
        for subscription in subscriptions[3::5]:
            assert received(subscription, 1)[0].payload == "all hear it"
    finally:
        for subscription in subscriptions:
            subscription.close()
    wait_until(lambda: db.status()["subscriptions"] == 0, message="the subscriptions to end with their sockets")
    # nobody listens: the listening connection is closed
    wait_until(lambda: db.status()["channels_listened"] == 0, message="the listening connection to close")


def test_a_timeout_ends_the_iteration_and_the_subscription_goes_on(db, sender):
    with db.listen("ticks", timeout=0.2) as subscription:
        assert list(subscription) == []
        sender.execute("select pg_notify('ticks', '1')")
        wait_until(lambda: _drained(subscription), message="the notification")


def _drained(subscription):
    return [n.payload for n in subscription] == ["1"]


def test_bad_channel_names_are_refused(db):
    with pytest.raises(dbservice.JobRefused, match="one or more channels"):
        db.listen()
    with pytest.raises(dbservice.JobRefused, match="63 bytes"):
        db.listen("x" * 64)
    with pytest.raises(dbservice.JobRefused, match="non-empty string"):
        db.listen(42)


def test_the_asyncio_client_listens_with_async_for(notify_service, sender):
    async def main():
        async with dbservice.connect_async(notify_service.socket, notify_service.authkey, timeout=30) as client:
            subscription = await client.listen("async news", timeout=0.3)
            await client.notify("async news", "one")
            sender.execute("select pg_notify('async news', 'two')")
            got = [n.payload async for n in subscription]
            assert await client.fetchval("select 'the connection still runs jobs'") is not None
            subscription.close()
            async with client.listen("async other") as other:  # subscribed on entering
                await client.notify("async other", "three")
                got.append((await other.receive(10)).payload)
            return got

    assert asyncio.run(main()) == ["one", "two", "three"]


def test_an_asyncio_app_that_reads_slowly_is_told_what_it_lost(notify_service, sender):
    count, size = 300, 7900  # 2.4 MB of notifications, past the subscription's own MAX_BUFFERED

    async def main():
        async with dbservice.connect_async(notify_service.socket, notify_service.authkey, timeout=30) as client:
            async with client.listen("slow app") as slow, client.listen("fence") as fence:
                sender.execute("select pg_notify('slow app', lpad(n::text, %s, '.')) from generate_series(1, %s) n",
                               [size, count])
                sender.execute("select pg_notify('fence', '')")
                # The fence comes on the same connection after the burst: all of it has arrived, nothing read.
                assert (await fence.receive(10)).channel == "fence"
                items = []
                while not any(isinstance(item, dbservice.NotificationsLost) for item in items):
                    item = await slow.receive(10)
                    assert item is not None, "no NotificationsLost marker after %d notifications" % len(items)
                    items.append(item)
                await client.notify("slow app", "caught up")
                return items, await slow.receive(10)

    items, after = asyncio.run(main())
    heard = [int(item.payload.strip(".")) for item in items[:-1]]
    assert 0 < len(heard) < count and heard == list(range(1, len(heard) + 1))  # in order, up to the bound
    assert items[-1].count == count - len(heard) and "more slowly than they came" in items[-1].reason
    assert after.payload == "caught up"


def test_the_dbapi_connection_has_psycopg2s_notifies(notify_service, sender):
    conn = dbapi.connect(socket=notify_service.socket, authkey=notify_service.authkey, autocommit=True)
    try:
        conn.listen("dbapi")
        conn.listen("dbapi 2")
        sender.execute("select pg_notify('dbapi', 'a'), pg_notify('dbapi 2', 'b')")
        wait_until(lambda: _polled(conn, 2), message="two notifications in conn.notifies")
        first = conn.notifies.pop(0)
        assert (first.channel, first.payload) == ("dbapi", "a")
        assert conn.notifies.pop(0).payload == "b"
        conn.poll()
        assert conn.notifies == []
    finally:
        conn.close()


def _polled(conn, count):
    if select.select([conn], [], [], 1)[0]:
        conn.poll()
    return len(conn.notifies) >= count


# -- a slow subscriber ---------------------------------------------------------------


def daemon_rss_peak(svc):
    with open("/proc/%d/status" % svc.process.pid) as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024


def test_a_slow_subscriber_is_told_what_it_lost_and_holds_up_nobody(dsn, socket_path, sender):
    rounds, count, size = 80, 100, 7900  # 63 MB of notifications, 790 kB at a time
    with start_service(dsn, socket_path, min_size=1, max_size=2, max_client_buffer=1024 * 1024,
                       client_stall_timeout=120) as svc, svc.client(timeout=30) as db:
        slow = db.listen("burst")  # and read by nobody, for now
        fast = db.listen("burst")
        peak_before = daemon_rss_peak(svc)
        for first in range(1, rounds * count, count):
            sender.execute("select pg_notify('burst', lpad(n::text, %s, '.')) from generate_series(%s, %s) n",
                           [size, first, first + count - 1])
            heard = [int(n.payload.strip(".")) for n in received(fast, count)]
            assert heard == list(range(first, first + count))
        assert db.fetchval("select 'served meanwhile'") == "served meanwhile"
        # the daemon held about max_client_buffer for the slow one, not its 63 MB
        assert daemon_rss_peak(svc) - peak_before < 24 * 1024 * 1024
        status = db.status()
        assert status["notifications_dropped"] > 0
        items = []
        while not any(isinstance(item, dbservice.NotificationsLost) for item in items):
            items += received(slow, 1)
        heard = [int(item.payload.strip(".")) for item in items[:-1]]
        lost = items[-1]
        assert heard == list(range(1, len(heard) + 1))  # in order, up to the bound
        assert lost.count == rounds * count - len(heard) == status["notifications_dropped"]
        assert "did not read them in time" in lost.reason
        sender.execute("select pg_notify('burst', 'caught up')")
        assert received(slow, 1)[0].payload == "caught up"
        slow.close()
        fast.close()


# -- restarts ------------------------------------------------------------------------


def test_a_subscriber_gets_a_marker_after_the_daemon_restarts(dsn, socket_path):
    svc = start_service(dsn, socket_path, min_size=1, max_size=2)
    try:
        db = svc.client(timeout=30)
        subscription = db.listen("across restarts")
        async_items = queue.Queue()
        listening = threading.Thread(target=asyncio.run, args=(_listen_async(svc, async_items, 2),))
        listening.start()
        assert async_items.get(timeout=30) == "subscribed"
        svc.stop()
        svc.start()  # the same socket and secret
        marker = subscription.receive(30)
        assert isinstance(marker, dbservice.NotificationsLost) and marker.count is None
        assert "connection to the dbservice daemon was lost" in marker.reason
        async_marker = async_items.get(timeout=30)
        assert isinstance(async_marker, dbservice.NotificationsLost) and async_marker.count is None
        db.notify("across restarts", "after")
        assert subscription.receive(10).payload == "after"
        assert async_items.get(timeout=10).payload == "after"
        listening.join(10)
        subscription.close()
        db.close()
    finally:
        svc.stop()


async def _listen_async(svc, items, count):
    """Subscribe with an AsyncClient and put what the subscription yields in *items*, *count* of them."""
    async with dbservice.connect_async(svc.socket, svc.authkey, timeout=30) as client:
        async with client.listen("across restarts") as subscription:
            items.put("subscribed")
            for _ in range(count):
                items.put(await subscription.receive(30))


@pytest.fixture(scope="module")
def restartable_postgresql():
    """A cluster of this module's own, which a test may stop and start."""
    server = Cluster.temporary()
    yield server
    server.stop()


def test_a_subscriber_gets_a_marker_after_the_database_restarts(restartable_postgresql, socket_path):
    with start_service(restartable_postgresql.dsn(), socket_path, min_size=1, max_size=2) as svc:
        db = svc.client(timeout=30)
        with db.listen("across database restarts", "fence") as subscription:
            restartable_postgresql.shut_down()
            restartable_postgresql.start()
            marker = subscription.receive(30)
            assert isinstance(marker, dbservice.NotificationsLost), marker
            assert "connection to the database was lost" in marker.reason and marker.count is None
            wait_until(lambda: _served(db), timeout=30, message="jobs served again")
            db.notify("across database restarts", "heard again")
            db.notify("fence")
            assert [n.payload for n in until_fence(subscription)] == ["heard again"]
        db.close()


def _served(db):
    try:
        return db.fetchval("select 1") == 1
    except (dbservice.ServiceUnavailable, psycopg2.OperationalError):
        return False


# -- pauses --------------------------------------------------------------------------


def test_a_pause_closes_the_listening_connection_and_resume_tells_each_subscriber(dsn, socket_path, admin, sender):
    name = "notify-pause-test"
    cur = admin.cursor()

    def daemons_connections():
        cur.execute("select count(*) from pg_stat_activity where application_name = %s", [name])
        return cur.fetchone()[0]

    with start_service(psycopg2.extensions.make_dsn(dsn, application_name=name), socket_path,
                       min_size=1, max_size=2) as svc, svc.client(timeout=30) as db:
        with db.listen("before the pause", "fence") as subscription:
            assert daemons_connections() == 2  # the pool's and the listening one
            assert db.pause(timeout=10)["pause"] == "paused"
            # closed by the daemon: each backend leaves pg_stat_activity a moment later, as it exits
            wait_until(lambda: daemons_connections() == 0, timeout=3, message="the daemon's backends to exit")
            status = db.status()
            assert (status["pause"], status["subscriptions"], status["channels_listened"]) == ("paused", 1, 0)
            sender.execute("select pg_notify('before the pause', 'while paused')")
            with db.listen("made while paused", "fence") as made_while_paused:  # answered, not held up
                assert daemons_connections() == 0
                sender.execute("select pg_notify('made while paused', 'while paused')")
                db.resume()
                for each in (subscription, made_while_paused):
                    marker = each.receive(10)
                    assert isinstance(marker, dbservice.NotificationsLost), marker
                    assert "was paused" in marker.reason and marker.count is None
                assert db.status()["channels_listened"] == 3  # every channel subscribed to, listened again
                sender.execute("select pg_notify('before the pause', 'after')")
                sender.execute("select pg_notify('made while paused', 'after')")
                sender.execute("select pg_notify('fence', '')")
                assert [n.payload for n in until_fence(subscription)] == ["after"]
                assert [n.payload for n in until_fence(made_while_paused)] == ["after"]


def test_a_resume_before_the_pause_completed_listens_again_too(notify_service, db, sender):
    with db.listen("resumed early") as subscription, notify_service.client(timeout=30) as operator:
        with db.transaction() as tx:
            tx.execute("select 1")  # holds its connection: the pause cannot complete
            assert operator.pause(timeout=0.2)["pause"] == "pausing"
            assert db.status()["channels_listened"] == 0  # the listening connection closed at once
            operator.resume()
        marker = subscription.receive(10)
        assert isinstance(marker, dbservice.NotificationsLost) and "was paused" in marker.reason, marker
        sender.execute("select pg_notify('resumed early', 'heard')")
        assert subscription.receive(10).payload == "heard"
