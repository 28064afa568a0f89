"""The sync client is fork-safe: a forked child talks to the daemon on connections of its own."""

import multiprocessing
import os

from conftest import wait_until

JOBS = 200


def _child(client, clients_before, go, results):
    """Run jobs alongside the parent; report whether each answer was ours, and what the daemon saw."""
    try:
        go.wait(30)
        pid = os.getpid()
        answers = [client.fetchval("select %s::int + %s::int", [pid, i]) for i in range(JOBS)]
        # The daemon counts the clients it has: ours is one more than the parent had.
        ours = client.status()["socket_clients"] > clients_before
        results.put((answers == [pid + i for i in range(JOBS)], ours))
    except BaseException as exc:  # report, never hang the parent
        results.put((repr(exc), None))


def test_forked_children_get_connections_of_their_own(socket_service, admin):
    admin.cursor().execute("drop table if exists forked; create table forked (note text)")
    client = socket_service.client(timeout=30)
    clients_before = client.status()["socket_clients"]
    # The parent's connection carries an open transaction: a child that used or
    # closed that connection would end it (rolled back) or mix its replies in.
    with client.transaction() as tx:
        tx.execute("insert into forked values ('before the fork')")
        ctx = multiprocessing.get_context("fork")
        go, results = ctx.Event(), ctx.Queue()
        children = [ctx.Process(target=_child, args=(client, clients_before, go, results)) for _ in range(3)]
        for child in children:
            child.start()
        go.set()
        # the parent goes on with its own jobs meanwhile, on its own connection
        mine = [tx.fetchval("select %s::int * 2", [i]) for i in range(JOBS)]
        outcomes = [results.get(timeout=60) for _ in children]
        for child in children:
            child.join(10)
        tx.execute("insert into forked values ('after the children')")
    assert outcomes == [(True, True)] * 3
    assert mine == [i * 2 for i in range(JOBS)]
    cur = admin.cursor()
    cur.execute("select note from forked order by note")
    assert cur.fetchall() == [("after the children",), ("before the fork",)]  # the transaction committed whole
    wait_until(  # the children's connections closed with them
        lambda: client.status()["socket_clients"] == clients_before, message="the children's connections to close"
    )
    client.close()
    admin.cursor().execute("drop table forked")
