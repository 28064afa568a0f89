"""Waiting for a psycopg2 async connection without blocking the event loop.

psycopg2's asynchronous mode is a state machine: ``conn.poll()`` says whether
libpq next needs the socket readable or writable, or is done. We wait for that
readiness on the event loop's selector (epoll on Linux, ``select`` as the
fallback), so thousands of jobs wait at once and none freezes the loop.
"""

import asyncio
import selectors

import psycopg2.extensions as ext

from .errors import QueryTimeout

SELECTORS = {
    "epoll": getattr(selectors, "EpollSelector", None),
    "select": selectors.SelectSelector,
}


def new_event_loop(selector="auto"):
    """An event loop: "auto" (epoll where there is one), "epoll", "select", or "uvloop".

    uvloop (libuv; ``pip install dbservice[uvloop]``) costs the daemon less CPU
    per job; the standard loop needs nothing beyond Python.
    """
    if selector == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ValueError("selector 'uvloop' needs the uvloop package: pip install 'dbservice[uvloop]'") from None
        return uvloop.new_event_loop()
    if selector == "auto":
        selector = "epoll" if SELECTORS["epoll"] else "select"
    try:
        selector_class = SELECTORS[selector]
    except KeyError:
        raise ValueError("unknown selector %r; use auto, epoll, select or uvloop" % (selector,)) from None
    if selector_class is None:
        raise ValueError("this platform has no %s; use selector='select'" % selector)
    return asyncio.SelectorEventLoop(selector_class())


async def wait_ready(conn, deadline=None):
    """Drive ``conn.poll()`` until the current operation is done.

    Raises whatever the operation raised (a psycopg2 error), or QueryTimeout
    when the loop's clock passes *deadline*; the operation is then still under
    way on the server, and the caller must cancel it or drop the connection.
    """
    loop = asyncio.get_running_loop()
    fd = conn.fileno()
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        if state == ext.POLL_READ:
            await wait_readable(loop, fd, deadline)
        elif state == ext.POLL_WRITE:
            await wait_writable(loop, fd, deadline)
        else:  # pragma: no cover - psycopg2 documents no other state
            raise ext.OperationalError("unexpected poll() state %r" % (state,))


async def wait_readable(loop, fd, deadline=None):
    """Wait until *fd* is readable; QueryTimeout at *deadline*."""
    await _wait_fd(loop, fd, loop.add_reader, loop.remove_reader, deadline)


async def wait_writable(loop, fd, deadline=None):
    """Wait until *fd* is writable; QueryTimeout at *deadline*."""
    await _wait_fd(loop, fd, loop.add_writer, loop.remove_writer, deadline)


async def until(loop, future, deadline):
    """Await *future*; at *deadline* (None: never) it fails with QueryTimeout."""
    timer = None if deadline is None else loop.call_at(deadline, _set_timeout, future)
    try:
        await future
    finally:
        if timer is not None:
            timer.cancel()


async def _wait_fd(loop, fd, add, remove, deadline):
    ready = loop.create_future()
    add(fd, set_done, ready)
    try:
        await until(loop, ready, deadline)
    finally:
        # Never leave a callback behind: the fd is polled again by the next wait.
        remove(fd)


def set_done(fut):
    """Mark *fut* done, unless a timeout got there first."""
    if not fut.done():
        fut.set_result(None)


def _set_timeout(fut):
    if not fut.done():
        fut.set_exception(QueryTimeout("the job's timeout passed"))
