"""The client of intake (a): jobs on a service's job queue, replies on a channel per thread.

:class:`QueueClient` is what :meth:`DBService.client() <dbservice.DBService.client>`
returns for a service without a socket. It is thread-safe: each thread makes
its own reply channel (a FIFO, see :mod:`dbservice.queue_wire`) on its first
job and reuses it for every job after; the channel closes when the thread
ends. It is fork-safe: a process forked after the client was made makes its
own channels and never reads its parent's. Sending takes no lock that other
processes share: each frame is one write the kernel keeps whole.
"""

import itertools
import os
import select
import sys
import time
from typing import Any, Dict, List, Optional, Tuple, cast

from .queries import Blocking, ChannelLost, ThreadChannels, check_size, encode_job, reply_wait
from .errors import Error, QueryTimeout, ServiceUnavailable
from .jobs import Job, loads_reply
from .queue_wire import JobQueue, channel_path, job_frames
from .wire import MSG_ERROR, MSG_JOB, MSG_STATUS, FrameReader

#: Bytes asked of the reply channel at a time: most replies come in one read.
RECEIVE_BYTES = 65536
#: Seconds :meth:`QueueClient.status` waits for the service's figures.
STATUS_TIMEOUT = 10.0

DROPPED = (
    "the dbservice process closed this thread's reply channel before the reply came: it stops, or "
    "the reply went unread past its unread_reply_timeout (a stopped or stalled process); the job "
    "may have run. The next job gets a new channel"
)


class _ReplyChannel:
    """One thread's reply channel, and the job queue it sends on."""

    fd: Optional[int] = None  # until the FIFO is open, and once it is closed

    def __init__(self, queue: JobQueue, sentinel: int) -> None:
        self.id = int.from_bytes(os.urandom(8), "big")
        self.path = channel_path(queue.directory, self.id)
        try:
            os.mkfifo(self.path, 0o600)
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            finally:
                if self.fd is None:
                    os.unlink(self.path)
        except FileNotFoundError:
            raise ServiceUnavailable(
                "the dbservice process has stopped: its directory %s is gone" % queue.directory
            ) from None
        except OSError as exc:
            raise ServiceUnavailable("cannot make a reply channel in %s: %s" % (queue.directory, exc)) from None
        self._queue = queue  # holds the job queue's writing end open
        self._jobs = queue.writer.fileno()  # type: ignore[union-attr]  # a client's queue has its writer
        self._sentinel = sentinel
        self._replies = select.poll()
        self._replies.register(self.fd, select.POLLIN)
        self._replies.register(sentinel, select.POLLIN)
        self._room: Optional[select.poll] = None  # a poll for room on the job queue, made if it ever fills
        self._frames = FrameReader(sys.maxsize)  # the service is trusted: no limit
        self._ids = itertools.count(1)

    @property
    def closed(self) -> bool:
        return self.fd is None

    def call(self, kind: int, payload: bytes, timeout: Optional[float]) -> Tuple[bool, Any]:
        """Send one message and return its reply as ``(ok, value)``; ChannelLost if the channel is unusable."""
        job_id = next(self._ids)
        wait = reply_wait(timeout)
        deadline = None if wait is None else time.monotonic() + wait
        for part in job_frames(self.id, job_id, kind, payload):
            self._send(part, deadline, wait)
        while True:
            frame = self._frames.next_frame()
            if frame is not None:
                break
            self._receive(deadline, wait)
        reply_id, kind, body = frame
        if reply_id != job_id:
            raise ChannelLost(Error("dbservice internal error: a reply to job %d came for job %d" % (reply_id, job_id)))
        return kind != MSG_ERROR, loads_reply(body)

    def _send(self, frame: bytes, deadline: Optional[float], wait: Optional[float]) -> None:
        while True:
            try:
                os.write(self._jobs, frame)
                return
            except BlockingIOError:
                pass  # the job queue is full: wait for room
            except BrokenPipeError:
                raise ChannelLost(ServiceUnavailable("the dbservice process has exited")) from None
            if self._room is None:
                self._room = select.poll()
                self._room.register(self._jobs, select.POLLOUT)
                self._room.register(self._sentinel, select.POLLIN)
            ready = self._room.poll(_milliseconds(deadline))
            if not ready:  # only with a deadline: *wait* is a number
                raise ChannelLost(
                    QueryTimeout("the dbservice process took no job for %.1f s: its job queue stayed full"
                                 % wait)  # type: ignore[str-format]
                )
            if not _includes(ready, self._jobs):
                raise ChannelLost(ServiceUnavailable("the dbservice process has exited"))

    def _receive(self, deadline: Optional[float], wait: Optional[float]) -> None:
        """Wait for the next bytes of a reply and take them in."""
        ready = self._replies.poll(_milliseconds(deadline))
        if not ready:  # only with a deadline: *wait* is a number
            raise ChannelLost(
                QueryTimeout("no reply from the dbservice process within %.1f s" % wait)  # type: ignore[str-format]
            )
        if self.fd is None:
            raise ChannelLost(Error("this dbservice client was closed while the job ran"))
        if not _includes(ready, self.fd):
            raise ChannelLost(ServiceUnavailable("the dbservice process has exited"))
        try:
            data = os.read(self.fd, RECEIVE_BYTES)
        except BlockingIOError:
            return
        if not data:
            exited = _includes(self._replies.poll(0), self._sentinel)
            raise ChannelLost(ServiceUnavailable("the dbservice process has exited" if exited else DROPPED))
        self._frames.feed(data)

    def close(self) -> None:
        """Hang up: the service sees it, and cancels what this channel still has in flight."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.unlink(self.path)  # only there if the service never opened it
            except FileNotFoundError:
                pass

    __del__ = close  # its thread ended

    def forget(self) -> None:
        """In a forked child: close our copy of the parent's channel, leave the parent's be."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _includes(ready: List[Tuple[int, int]], fd: int) -> bool:
    """Whether poll()'s *ready* events include one of *fd*."""
    for ready_fd, _ in ready:
        if ready_fd == fd:
            return True
    return False


def _milliseconds(deadline: Optional[float]) -> Optional[int]:
    """What poll() takes for *deadline*: milliseconds from now, or None for no limit."""
    if deadline is None:
        return None
    return max(0, int((deadline - time.monotonic()) * 1000.0 + 0.999))


class QueueClient(Blocking, ThreadChannels[_ReplyChannel]):
    """A thread-safe, fork-safe client of a :class:`~dbservice.DBService` without a socket.

    Get it from ``svc.client()``. *queue* is the service's
    :class:`~dbservice.queue_wire.JobQueue`; *sentinel* (the service process's
    sentinel) tells a dead service from a slow one, so no caller waits
    forever. A job larger than *max_frame* bytes is refused before it is sent.
    """

    def __init__(
        self, queue: JobQueue, sentinel: int, timeout: Optional[float] = None, max_frame: Optional[int] = None
    ) -> None:
        self.queue = queue
        self.sentinel = sentinel
        self.timeout = timeout
        self.max_frame = max_frame
        self.closed = False
        self._init_channels()

    def __repr__(self) -> str:
        return "<dbservice.QueueClient %s%s>" % (self.queue.directory, " closed" if self.closed else "")

    def status(self) -> Dict[str, Any]:
        """The service's figures: pool, queue, jobs, latency, and its open reply channels."""
        return cast(Dict[str, Any], self._request(MSG_STATUS, b"", STATUS_TIMEOUT))

    def _run(self, job: Job) -> Any:
        payload = encode_job(job)
        if self.max_frame is not None:
            check_size(payload, self.max_frame)
        return self._request(MSG_JOB, payload, job.timeout)

    def _request(self, kind: int, payload: bytes, timeout: Optional[float]) -> Any:
        if self.closed:
            raise Error("this dbservice client is closed")
        channel = self._channel()
        try:
            ok, value = channel.call(kind, payload, timeout)
        except ChannelLost as lost:
            self._drop(channel)
            raise lost.error from None
        except BaseException:
            self._drop(channel)  # interrupted mid-call: what is on the channel now is unknown
            raise
        if not ok:
            raise value
        return value

    def _open_channel(self) -> _ReplyChannel:
        return _ReplyChannel(self.queue, self.sentinel)
