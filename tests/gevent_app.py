"""A WSGI app for tests/test_gevent.py: each request sleeps in PostgreSQL through dbservice.

/client goes through one dbservice.connect() client, shared by the worker's
greenlets; /dbapi opens a DB-API connection per request, as an app on a
driver would. Both find the daemon through $DBSERVICE_SOCKET.
"""

import dbservice
from dbservice import dbapi

SLEEP = "select pg_sleep(0.5)"

_client = None


def app(environ, start_response):
    global _client
    if environ["PATH_INFO"] == "/client":
        if _client is None:
            _client = dbservice.connect(timeout=30)
        _client.fetchall(SLEEP)
    elif environ["PATH_INFO"] == "/dbapi":
        with dbapi.connect(timeout=30) as conn:
            conn.cursor().execute(SLEEP)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slept\n"]
