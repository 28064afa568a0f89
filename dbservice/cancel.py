"""Cancelling a running query with libpq's cancel request: no connection slot, no blocked loop.

A cancel request is a 16-byte message on a new socket to the server, naming
the backend and its secret key; the server needs no free connection slot and
no login for it. ``pg_cancel_backend()`` on a new connection does need a slot,
and a server at ``max_connections`` refuses it ("too many clients"): the query
then ran on, and could commit after its client was told it timed out.
psycopg2's own ``connection.cancel()`` sends the request, but blocks holding
the GIL until the server answers, so a stalled network would freeze the
daemon.

So the request is sent through the libpq psycopg2 is linked with, by ctypes:
with libpq 17 or newer by its non-blocking cancel API (``PQcancelStart`` and
``PQcancelPoll``), driven on the event loop like any socket; with an older
libpq by ``PQcancel`` in a worker thread, ctypes releasing the GIL around it.
"""

import asyncio
import concurrent.futures
import ctypes

import psycopg2

from . import libpq
from .errors import QueryTimeout
from .wait import wait_readable, wait_writable

# PostgresPollingStatusType
_POLLING_FAILED, _POLLING_READING, _POLLING_WRITING, _POLLING_OK = 0, 1, 2, 3

#: Threads sending cancel requests with an older libpq; a stalled network holds one each.
CANCEL_THREADS = 4


def _load_libpq():
    lib = libpq.load()
    if hasattr(lib, "PQcancelCreate"):
        lib.PQcancelCreate.restype = ctypes.c_void_p
        lib.PQcancelCreate.argtypes = [ctypes.c_void_p]
        for name in ("PQcancelStart", "PQcancelPoll", "PQcancelSocket"):
            getattr(lib, name).restype = ctypes.c_int
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.PQcancelErrorMessage.restype = ctypes.c_char_p
        lib.PQcancelErrorMessage.argtypes = [ctypes.c_void_p]
        lib.PQcancelFinish.restype = None
        lib.PQcancelFinish.argtypes = [ctypes.c_void_p]
    lib.PQgetCancel.restype = ctypes.c_void_p
    lib.PQgetCancel.argtypes = [ctypes.c_void_p]
    lib.PQcancel.restype = ctypes.c_int
    lib.PQcancel.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.PQfreeCancel.restype = None
    lib.PQfreeCancel.argtypes = [ctypes.c_void_p]
    return lib


_libpq = _load_libpq()
#: libpq 17's non-blocking cancel API is there (else: PQcancel in a thread)
NONBLOCKING = hasattr(_libpq, "PQcancelCreate")
_threads = None  # for an older libpq, made on first use


async def cancel_query(pgconn: "psycopg2.extensions.connection", timeout: float) -> None:
    """Ask the server to cancel what *pgconn* runs; raise OperationalError if that fails.

    The request itself is all this waits for, up to *timeout* seconds: the
    query then ends with QueryCanceled, unless it was ending anyway.
    """
    loop = asyncio.get_running_loop()
    try:
        if NONBLOCKING:
            await _cancel_nonblocking(loop, pgconn.pgconn_ptr, loop.time() + timeout)
        else:
            await asyncio.wait_for(_cancel_in_thread(loop, pgconn.pgconn_ptr), timeout)
    except (asyncio.TimeoutError, QueryTimeout):
        raise psycopg2.OperationalError("the cancel request got no answer within %.1f s" % timeout) from None


async def _cancel_nonblocking(loop, pgconn_ptr, deadline):
    cancel = _libpq.PQcancelCreate(pgconn_ptr)
    if not cancel:
        raise psycopg2.OperationalError("libpq could not make a cancel request (out of memory)")
    try:
        if not _libpq.PQcancelStart(cancel):
            raise psycopg2.OperationalError(_message(cancel))
        state = _POLLING_WRITING  # libpq's rule: wait for writing before the first poll
        while state != _POLLING_OK:
            fd = _libpq.PQcancelSocket(cancel)
            if state == _POLLING_READING:
                await wait_readable(loop, fd, deadline)
            elif state == _POLLING_WRITING:
                await wait_writable(loop, fd, deadline)
            else:
                raise psycopg2.OperationalError(_message(cancel))
            state = _libpq.PQcancelPoll(cancel)
    finally:
        _libpq.PQcancelFinish(cancel)


def _message(cancel):
    text = _libpq.PQcancelErrorMessage(cancel) or b"the cancel request failed"
    return " ".join(text.decode("utf-8", "replace").split())


async def _cancel_in_thread(loop, pgconn_ptr):
    global _threads
    if _threads is None:
        _threads = concurrent.futures.ThreadPoolExecutor(CANCEL_THREADS, "dbservice-cancel")
    cancel = _libpq.PQgetCancel(pgconn_ptr)
    if not cancel:
        raise psycopg2.OperationalError("libpq could not make a cancel request")
    error = await loop.run_in_executor(_threads, _send_and_free, cancel)
    if error is not None:
        raise psycopg2.OperationalError(error)


def _send_and_free(cancel):
    """PQcancel, in a worker thread: it may outlive the wait for it, so it frees its own request."""
    error = ctypes.create_string_buffer(256)
    try:
        if _libpq.PQcancel(cancel, error, len(error)):
            return None
        return " ".join(error.value.decode("utf-8", "replace").split())
    finally:
        _libpq.PQfreeCancel(cancel)
