"""Faults with real processes: what happens when a part dies."""

import os
import signal
import subprocess
import sys

from conftest import wait_until
from test_async_client import active

CLIENT = """
import sys, dbservice
db = dbservice.connect(socket=sys.argv[1], authkey=sys.argv[2].encode())
print("connected", flush=True)
db.fetchval("select pg_sleep(60) /* marker-client-death */")
"""


def test_a_client_that_dies_mid_query_has_its_query_cancelled(dsn, socket_path, admin):
    import dbservice

    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1) as svc:
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, svc.socket, svc.authkey.decode()], stdout=subprocess.PIPE
        )
        try:
            assert client.stdout.readline().strip() == b"connected"
            wait_until(lambda: active(admin, "marker-client-death") == 1, message="the query to run")
            os.kill(client.pid, signal.SIGKILL)
            client.wait(10)
        finally:
            client.kill()
        wait_until(lambda: active(admin, "marker-client-death") == 0, message="the query to be cancelled")
        # the pool's only connection came back and serves the next job
        with svc.client(timeout=10) as db:
            assert db.fetchval("select 'next'") == "next"
