"""Intake (a): jobs from the app's own processes on one pipe, replies on each client thread's FIFO.

This is the original design, for an app that starts the service as its own
child (:class:`~dbservice.DBService` without a socket); the protocol is in
:mod:`dbservice.queue_wire`. It all runs on the event loop, with no thread:
the job queue is read when it is readable, many jobs a read under load, and
each reply is written to its channel without blocking.

Nothing a client process does can hold up the others. Its frames arrive
whole or not at all. A channel whose client does not read (a stopped
process, a slow one) keeps one reply's worth of bytes here, at most
``max_result_bytes``, and is dropped once its replies went unread for
``unread_reply_timeout``. A channel whose thread or process ended makes its
FIFO report an error, and is dropped at once. Either way the channel's jobs
are cancelled, as the socket intake does for a client that goes away. The
job queue is shared only with the app's own processes, so its messages are
trusted pickles; they go through :meth:`Job.from_wire`'s checks all the same.
A job that does not decode is refused, saying why; one the daemon itself
fails on, as the socket intake does, gets an InternalError.
"""

import asyncio
import errno
import logging
import os
from typing import Any

from .answering import FrameAnswers, reply_error
from .errors import JobCancelled, JobRefused
from .jobs import encode_reply, loads_job
from .queue_wire import FRAME_BYTES, JOB_ID, MSG_JOB_PART, JobQueue, channel_path
from .wire import HEADER, MSG_ERROR, MSG_JOB, MSG_RESULT, MSG_STATUS, FrameError, FrameReader, OversizedFrame, encode_frame

logger = logging.getLogger("dbservice.queue")

#: Bytes read from the job queue at a time: many jobs, under load.
READ_BYTES = 256 * 1024


class QueueIntake:
    """Feeds jobs from *queue* (a :class:`~dbservice.queue_wire.JobQueue`) to *engine*."""

    def __init__(self, engine: Any, queue: JobQueue) -> None:
        self.engine = engine
        self.directory = queue.directory
        self._reader = queue.reader
        self._fd = queue.reader.fileno()
        self._frames = FrameReader(FRAME_BYTES)
        self._channels = {}  # channel id -> _ReplyChannel
        self._loop = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._read_jobs)

    async def close(self) -> None:
        """Stop reading jobs; send the replies still unsent, then close every channel.

        The jobs on the queue now (at most a pipe's capacity, less than a
        read) are answered first: the engine, stopping, refuses them. A
        channel whose client does not read is waited for no longer than its
        ``unread_reply_timeout``.
        """
        self._loop.remove_reader(self._fd)
        self._read_jobs()
        unsent = [channel.drained() for channel in self._channels.values() if channel.unsent is not None]
        if unsent:
            await asyncio.wait(unsent)
        for channel in list(self._channels.values()):
            channel.close()
        self._reader.close()

    @property
    def channels(self):
        return len(self._channels)

    def status(self):
        """The engine's figures, and this queue's."""
        return dict(self.engine.status(), queue_channels=self.channels)

    def _read_jobs(self):
        """Take in what the job queue holds."""
        try:
            data = os.read(self._fd, READ_BYTES)
        except BlockingIOError:
            return
        if not data:  # every process of the app is gone
            self._loop.remove_reader(self._fd)
            return
        self._frames.feed(data)
        try:
            while True:
                frame = self._frames.next_frame()
                if frame is None:
                    return
                self._handle(*frame)
        except FrameError as exc:
            # Only QueueClient writes here, a frame at a time: this is a bug.
            logger.error("the job queue carries a frame that is no job's (%s); what was buffered is dropped", exc)
            self._frames = FrameReader(FRAME_BYTES)

    def _handle(self, channel_id, kind, payload):
        channel = self._channels.get(channel_id)
        if channel is None:
            channel = self._open(channel_id)
            if channel is None:
                return
        channel.receive(kind, payload)

    def _open(self, channel_id):
        """The daemon's end of a new channel, or None if its client is gone already."""
        path = channel_path(self.directory, channel_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            # ENOENT: its thread ended, or we dropped the channel; ENXIO: nobody reads it any more.
            if exc.errno not in (errno.ENOENT, errno.ENXIO):
                logger.error(
                    "cannot open a queue client's reply channel, so its job is dropped and the client "
                    "times out: %s. If it says 'Too many open files', raise the service's limit (ulimit -n)", exc,
                )
            return None
        try:
            os.unlink(path)  # nobody else may open it now
        except FileNotFoundError:
            pass  # its thread is ending: the FIFO will report it
        channel = self._channels[channel_id] = _ReplyChannel(self, channel_id, fd)
        return channel


class _ReplyChannel(FrameAnswers):
    """The daemon's end of one client thread's reply channel: its jobs in flight, its unsent replies."""

    __slots__ = (
        "intake", "engine", "settings", "loop", "id", "fd", "in_flight", "part", "unsent", "closed",
        "_progress_at", "_stall_timer", "_drained", "_answering",
    )

    def __init__(self, intake, channel_id, fd):
        self.intake = intake
        self.engine = intake.engine
        self.settings = intake.engine.settings
        self.loop = intake._loop
        self.id = channel_id
        self.fd = fd
        self.in_flight = {}  # job id -> PendingJob
        self.part = None  # [job id, the bytes so far, or None once refused] of a job arriving in parts
        self.unsent = None  # a memoryview of the replies the FIFO had no room for yet
        self.closed = False
        self._progress_at = 0.0
        self._stall_timer = None
        self._drained = None  # a future close() waits on
        self._answering = None  # the job id of the frame being handled, until it is answered
        # The writing end of a FIFO reports an error once no reader is left.
        self.loop.add_reader(fd, self._drop, JobCancelled("the client went away"))

    def receive(self, kind, payload):
        """Handle a frame; should the daemon fail on it (a bug of ours), its job or request still gets one reply.

        That reply is an InternalError, as on the socket (answering.py),
        unless it had one already; a job in flight under the frame's id ends
        with it. Either way the frames after it are handled:
        they may be other clients' jobs.
        """
        (job_id,) = JOB_ID.unpack_from(payload)
        self.answer(job_id, kind, payload, self._receive, "a queue client")

    def _failed(self, job_id, kind, error):
        pending = self.in_flight.get(job_id)
        if pending is not None:
            self.engine.cancel(pending, error)
        elif not self.unanswered(job_id):
            return  # answered already
        elif kind == MSG_STATUS:
            self.reply(job_id, False, error)
        else:
            if kind == MSG_JOB_PART:
                self.part = [job_id, None]  # its remaining parts are dropped as they come
            self.engine.refuse(self.reply, job_id, error)  # counted as failed, as a job

    def _receive(self, job_id, kind, payload):
        if kind == MSG_JOB and self.part is None:  # a job in one frame: the common case
            self._submit(job_id, memoryview(payload)[JOB_ID.size :])
        elif kind == MSG_JOB or kind == MSG_JOB_PART:
            self._gather(job_id, kind, memoryview(payload)[JOB_ID.size :])
        elif kind == MSG_STATUS:
            self.reply(job_id, True, self.intake.status())
        else:
            self.reply(job_id, False, JobRefused("unknown message kind %d" % kind))

    def _gather(self, job_id, kind, data):
        """Add a part to the job arriving in parts; submit it once its last part came."""
        if self.part is None or self.part[0] != job_id:
            self.part = [job_id, bytearray()]
        parts = self.part[1]
        if parts is not None:
            parts += data
            if len(parts) > self.settings.max_frame:
                self.part[1] = None  # its remaining parts are dropped as they come
                too_large = OversizedFrame(job_id, len(parts), self.settings.max_frame)
                self.engine.refuse(self.reply, job_id, JobRefused(str(too_large)))
                parts = None  # refused: even if this was its last part, it is not run
        if kind == MSG_JOB:
            self.part = None
            if parts is not None:
                self._submit(job_id, parts)

    def _submit(self, job_id, data):
        try:
            job = loads_job(data, self.settings.max_params_size, trusted=True)
        except JobRefused as exc:
            logger.warning("refused a job: %s", exc)
            self.engine.refuse(self.reply, job_id, exc)
            return
        except Exception as exc:  # from our own code: a bug of ours, not the job's
            self.engine.refuse(self.reply, job_id, reply_error(exc, "job %d of a queue client", job_id))
            return
        pending = self.engine.submit(job, self.reply, job_id)
        if not pending.done:
            self.in_flight[job_id] = pending

    def reply(self, job_id, ok, value):
        """Send the one reply of job *job_id* on this channel; the ``(ok, value)`` it sent (see encode_reply)."""
        self.in_flight.pop(job_id, None)
        self.answered(job_id)
        if self.closed:
            return ok, value
        try:
            ok, value, payload = encode_reply(ok, value, self.settings.max_result_bytes)
        except Exception as exc:  # a bug of ours: the job still gets its one reply, as on the socket
            error = reply_error(exc, "the reply of job %d of a queue client", job_id)
            ok, value, payload = encode_reply(False, error, self.settings.max_result_bytes)
        self._write(encode_frame(job_id, MSG_RESULT if ok else MSG_ERROR, payload))
        return ok, value

    def _write(self, data):
        if self.unsent is not None:
            # Its client has not read the last reply yet (a QueueClient never
            # sends before it has): keep no more than one reply's worth.
            if len(self.unsent) + len(data) > self.settings.max_result_bytes + HEADER.size:
                logger.warning("dropped a queue client's reply channel: it left more replies unread than one")
                self._drop(JobCancelled("the client left more replies unread than one"))
            else:
                self.unsent = memoryview(bytes(self.unsent) + data)
            return
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # EPIPE: its reader is gone
            self._drop(JobCancelled("the client went away"))
            return
        if written < len(data):
            self.unsent = memoryview(data)[written:]
            self._progress_at = self.loop.time()
            self.loop.add_writer(self.fd, self._flush)
            self._stall_timer = self.loop.call_later(self.settings.unread_reply_timeout, self._check_stall)

    def _flush(self):
        try:
            written = os.write(self.fd, self.unsent)
        except BlockingIOError:
            return
        except OSError:
            self._drop(JobCancelled("the client went away"))
            return
        self._progress_at = self.loop.time()
        self.unsent = self.unsent[written:]
        if not self.unsent:
            self.unsent = None
            self.loop.remove_writer(self.fd)
            self._stall_timer.cancel()
            self._stall_timer = None
            if self._drained is not None:
                self._drained.set_result(None)
                self._drained = None

    def _check_stall(self):
        """Drop the channel if its client read nothing for unread_reply_timeout."""
        timeout = self.settings.unread_reply_timeout
        stalled = self.loop.time() - self._progress_at
        if stalled < timeout:
            self._stall_timer = self.loop.call_later(timeout - stalled, self._check_stall)
            return
        self._stall_timer = None
        logger.warning(
            "dropped a queue client's reply channel: %d bytes of replies went unread for %.1f s "
            "(unread_reply_timeout); its jobs are cancelled", len(self.unsent), stalled,
        )
        self._drop(JobCancelled("the client read no reply for %.1f s" % stalled))

    def drained(self):
        """A future done once the unsent replies are written, or the channel dropped."""
        if self._drained is None:
            self._drained = self.loop.create_future()
        return self._drained

    def _drop(self, error):
        """Close the channel and cancel its jobs with *error*: nobody will read their replies."""
        if self.closed:
            return
        self.close()
        for pending in list(self.in_flight.values()):
            self.engine.cancel(pending, error)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        if self.unsent is not None:
            self.loop.remove_writer(self.fd)
            self.unsent = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        os.close(self.fd)
        del self.intake._channels[self.id]
        self.part = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
