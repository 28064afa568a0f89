"""Waiting for a file descriptor, or a future, on the event loop, up to a deadline.

The pieces the one driver of a pooled connection (``connection.py``) and the
cancel request (``cancel.py``) wait with: readiness on the event loop's
selector (epoll on Linux, ``select`` as the fallback), so thousands of jobs
wait at once and none freezes the loop.
"""

import socket

from .errors import QueryTimeout


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


def hung_up(loop, sock, timeout):
    """A future done once the peer of *sock* has closed its end too, or after *timeout* seconds.

    *sock* is shut down for writing at once, so the peer reads its end, and
    closed once the future is done (or cancelled); what the peer still sends
    is read and dropped. None: nothing to wait for, the future is done.
    """
    gone = loop.create_future()
    if sock is None:
        gone.set_result(None)
        return gone

    def read():
        try:
            if sock.recv(65536):
                return  # sent before it hung up: for nobody now
        except BlockingIOError:
            return
        except OSError:
            pass  # reset: hung up all the same
        set_done(gone)

    def release(_):
        timer.cancel()
        loop.remove_reader(sock.fileno())
        sock.close()

    try:
        sock.setblocking(False)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the peer is gone already
        sock.close()
        gone.set_result(None)
        return gone
    timer = loop.call_later(timeout, set_done, gone)
    loop.add_reader(sock.fileno(), read)
    gone.add_done_callback(release)
    return gone


def set_done(fut):
    """Mark *fut* done, unless a timeout got there first."""
    if not fut.done():
        fut.set_result(None)


def _set_timeout(fut):
    if not fut.done():
        fut.set_exception(QueryTimeout("the job's timeout passed"))
