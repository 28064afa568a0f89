"""The sync client is fork-safe: a forked child never shares its parent's socket."""

import multiprocessing
import os


def _child(client, parent_fds, results):
    try:
        inherited = {channel.sock.fileno() for channel in client._channels}
        values = [client.fetchval("select %s::int + %s::int", [os.getpid(), i]) for i in range(50)]
        ok = values == [os.getpid() + i for i in range(50)]
        mine = {channel.sock.fileno() for channel in client._channels}
        results.put((ok, inherited, bool(mine), client.fetchval("select pg_backend_pid()") > 0))
    except BaseException as exc:
        results.put(("error", repr(exc), None, None))


def test_forked_children_get_their_own_connections(socket_service):
    client = socket_service.client(timeout=30)
    assert client.fetchval("select 1") == 1  # the parent's thread now has a channel
    parent_fds = {channel.sock.fileno() for channel in client._channels}
    assert parent_fds
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    children = [ctx.Process(target=_child, args=(client, parent_fds, results)) for _ in range(3)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(10)
    # each child started with no channel of the parent's and opened its own
    assert outcomes == [(True, set(), True, True)] * 3
    # and the parent's connection was left untouched by them
    assert client.fetchval("select 2") == 2
    assert {channel.sock.fileno() for channel in client._channels} == parent_fds
    client.close()
