"""The blog's dbservice client: one per worker process, shared by its threads."""

import threading

import dbservice

#: Seconds one query may take, its wait in the daemon's queue included: a page
#: fails fast with 503 rather than holding a worker thread.
QUERY_TIMEOUT = 5.0

_client = None
_lock = threading.Lock()


def get_db():
    """The worker's client of the daemon found by ``dbservice.connect()``.

    It is opened on first use, not at import: the app then loads without a
    daemon (``flask routes``), and a worker started before the daemon serves
    as soon as it is up. The client is thread-safe (each thread gets its own
    connection to the daemon) and fork-safe, so one per process is enough.
    """
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                _client = dbservice.connect(timeout=QUERY_TIMEOUT)
    return _client
