"""One authenticated, blocking connection to the daemon: a sync Client thread's, or a DB-API connection's."""

import contextlib
import itertools
import socket as socketlib
import sys
import threading
import time
from typing import Any, Iterator, Optional, Tuple

import psycopg2

from .errors import Error, QueryTimeout, ServiceUnavailable
from .jobs import loads_reply
from .queries import ChannelLost, check_size, connect_error, reply_wait
from .wire import MSG_ERROR, MSG_JOB, Frame, FrameReader, client_handshake, encode_frame

#: Bytes asked of the socket at a time: most replies come in one receive.
RECEIVE_BYTES = 65536


class Channel:
    """One authenticated socket connection to the daemon: a thread's, and its transactions'.

    A call interrupted midway (KeyboardInterrupt, a signal's exception)
    leaves the stream in an unknown state, so it closes the socket: the
    daemon then cancels the job and rolls back the channel's transactions.
    """

    def __init__(self, path: str, authkey: bytes, connect_timeout: float) -> None:
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        try:
            sock.settimeout(connect_timeout)
            _connect_unix(sock, path, time.monotonic() + connect_timeout)
            max_frame = client_handshake(sock, authkey)
        except OSError as exc:
            sock.close()
            raise connect_error(path, exc, connect_timeout) from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.max_frame = max_frame  # the largest job the daemon takes
        self._timeout: Optional[float] = connect_timeout
        self._frames = FrameReader(sys.maxsize)  # the daemon is trusted: no limit
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # a transaction may be ended from another thread

    @property
    def closed(self) -> bool:
        return self.sock is None or self.sock.fileno() == -1

    def call(self, payload: bytes, timeout: Optional[float], kind: int = MSG_JOB) -> Any:
        with self._lock:
            try:
                return self._call(payload, timeout, kind)
            except BaseException as exc:
                if not isinstance(exc, (Error, psycopg2.Error)) or isinstance(exc, ChannelLost):
                    self.close()  # not a reply: the stream is in an unknown state
                raise

    def _call(self, payload: bytes, timeout: Optional[float], kind: int) -> Any:
        if self.closed:
            raise ChannelLost(ServiceUnavailable("the connection to the dbservice daemon was closed"), unsent=True)
        check_size(payload, self.max_frame)
        job_id = next(self._ids)
        wait = reply_wait(timeout)
        if wait != self._timeout:  # settimeout costs syscalls: only when it changes
            self.sock.settimeout(wait)
            self._timeout = wait
        try:
            self.sock.sendall(encode_frame(job_id, kind, payload))
        except OSError as exc:
            raise ChannelLost(
                ServiceUnavailable("cannot send to the dbservice daemon: %s" % exc), unsent=True
            ) from None
        try:
            while True:
                reply_id, kind, body = self._next_frame()
                if reply_id == job_id:
                    break
                if reply_id == 0 and kind == MSG_ERROR:  # the daemon dropped us
                    raise ChannelLost(loads_reply(body))
                # else: a late reply to an earlier job that timed out here; skip it
        except socketlib.timeout:
            raise ChannelLost(QueryTimeout("no reply from the dbservice daemon within %.1f s" % wait)) from None
        except OSError as exc:
            raise ChannelLost(
                ServiceUnavailable("lost the connection to the dbservice daemon: %s" % exc)
            ) from None
        value = loads_reply(body)
        if kind == MSG_ERROR:
            raise value
        return value

    @contextlib.contextmanager
    def exchange(self, timeout: Optional[float]) -> Iterator["Link"]:
        """The channel, held for one job that takes more than a frame each way (a COPY): its :class:`Link`.

        *timeout* bounds each wait for a frame. As with :meth:`call`, an
        exception that is not a reply leaves the stream in an unknown state,
        and closes the channel.
        """
        with self._lock:
            self._ready(timeout, unsent=True)
            try:
                yield Link(self, next(self._ids), timeout)
            except BaseException as exc:
                if not isinstance(exc, (Error, psycopg2.Error)) or isinstance(exc, ChannelLost):
                    self.close()
                raise

    # A channel of subscriptions carries frames nobody waits for: it is read
    # frame by frame, for whichever of its jobs each is.

    def send(self, kind: int, payload: bytes) -> int:
        """Send one frame of a new job and return its id, without waiting for anything; ChannelLost if it cannot."""
        with self._lock:
            self._ready(self._timeout)
            job_id = next(self._ids)
            try:
                self.sock.sendall(encode_frame(job_id, kind, payload))
            except OSError as exc:
                self.close()
                raise ChannelLost(ServiceUnavailable("cannot send to the dbservice daemon: %s" % exc)) from None
            return job_id

    def receive(self, timeout: Optional[float]) -> Optional[Frame]:
        """The next frame, of any job, as (job_id, kind, payload), or None after *timeout* seconds (0: now).

        ChannelLost once the daemon is gone.
        """
        with self._lock:
            self._ready(timeout)
            try:
                return self._next_frame()
            except (socketlib.timeout, BlockingIOError):
                return None
            except OSError as exc:
                self.close()
                raise ChannelLost(ServiceUnavailable("lost the connection to the dbservice daemon: %s" % exc)) from None
            except ChannelLost:
                self.close()
                raise

    def _ready(self, timeout: Optional[float], unsent: bool = False) -> None:
        if self.closed:
            raise ChannelLost(ServiceUnavailable("the connection to the dbservice daemon was closed"), unsent=unsent)
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def _next_frame(self) -> Frame:
        """The next reply, read in as few receives as it takes (one, mostly)."""
        while True:
            frame = self._frames.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(RECEIVE_BYTES)
            if not data:
                raise ChannelLost(ServiceUnavailable("the dbservice daemon closed the connection"))
            self._frames.feed(data)

    sock: Optional[socketlib.socket] = None  # until the handshake succeeded

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    __del__ = close  # its thread ended: hang up rather than wait for the daemon to notice
    forget = close  # in a forked child: closing our copy of the socket leaves the parent's be


class Link:
    """The frames of one job on a held channel (see :meth:`Channel.exchange`)."""

    def __init__(self, channel: Channel, job_id: int, timeout: Optional[float]) -> None:
        self.job_id = job_id
        self._channel = channel
        self._timeout = timeout
        self._sent = False

    def send(self, kind: int, payload: bytes) -> None:
        """Send a frame of the job; ChannelLost if the daemon is gone (*unsent* if this was its first)."""
        try:
            self._channel.sock.sendall(encode_frame(self.job_id, kind, payload))
        except OSError as exc:
            raise ChannelLost(
                ServiceUnavailable("cannot send to the dbservice daemon: %s" % exc), unsent=not self._sent
            ) from None
        self._sent = True

    def receive(self) -> Tuple[int, bytes]:
        """The job's next frame, as (kind, payload); ChannelLost if the daemon is gone or silent past the timeout."""
        try:
            while True:
                job_id, kind, payload = self._channel._next_frame()
                if job_id == self.job_id:
                    return kind, payload
                if job_id == 0 and kind == MSG_ERROR:  # the daemon dropped us
                    raise ChannelLost(loads_reply(payload))
        except socketlib.timeout:
            raise ChannelLost(
                QueryTimeout("no reply from the dbservice daemon within %.1f s" % self._timeout)
            ) from None
        except OSError as exc:
            raise ChannelLost(ServiceUnavailable("lost the connection to the dbservice daemon: %s" % exc)) from None


def _connect_unix(sock: socketlib.socket, path: str, deadline: float) -> None:
    """Connect, waiting while the daemon's listen backlog is full.

    With a timeout set, a Unix socket's connect fails at once with EAGAIN
    when the backlog is full (many clients connecting together), where a TCP
    one would wait: so wait here, until *deadline*.
    """
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise socketlib.timeout("the daemon's listen backlog stayed full") from None
            time.sleep(0.002)
