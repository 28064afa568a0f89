"""Intake (a): jobs from a multiprocessing queue, each with its own reply pipe.

This is the original design, for an app that starts the service as its own
child: processes of the same app put ``(job, pipe)`` on one
``multiprocessing.Queue`` and wait on their pipe. ``Queue.get()`` and
``Connection.send()`` block, so they run on threads; the event loop only ever
sees finished jobs arrive through ``call_soon_threadsafe``. The queue is shared
only with the app's own processes, so its messages are trusted pickles.
"""

import concurrent.futures
import logging
import pickle
import threading

from .errors import JobRefused
from .jobs import Job, encode_reply

logger = logging.getLogger("dbservice.queue")

#: Threads sending replies; a client slow to read its pipe holds one of them.
REPLY_THREADS = 4


class QueueIntake:
    """Feeds jobs from *mp_queue* to *server*."""

    def __init__(self, server, mp_queue):
        self.server = server
        self.queue = mp_queue
        self._loop = None
        self._reader = None
        self._senders = concurrent.futures.ThreadPoolExecutor(REPLY_THREADS, "dbservice-reply")

    def start(self, loop):
        self._loop = loop
        self._reader = threading.Thread(target=self._read_queue, name="dbservice-queue", daemon=True)
        self._reader.start()

    def close(self):
        """Stop reading; replies still to send are sent first."""
        if self._reader is not None:
            self.queue.put(None)  # wakes the reader thread up
            self._reader.join()
            self._reader = None
        self._senders.shutdown(wait=True)

    def _read_queue(self):
        while True:
            data = self.queue.get()
            if data is None:
                return
            try:
                message, reply_pipe = pickle.loads(data)
            except Exception:
                logger.exception("dropped a queue message that could not be decoded")
                continue
            self._loop.call_soon_threadsafe(self._submit, message, reply_pipe)

    def _submit(self, message, reply_pipe):
        reply = _PipeReplier(self._senders, reply_pipe, self.server.settings.max_result_bytes)
        try:
            job = Job.from_wire(message, self.server.settings.max_params_size)
        except JobRefused as exc:
            reply(False, exc)
            return
        self.server.submit(job, reply)


class _PipeReplier:
    """Sends the one reply of one job on its pipe: a byte for ok, then the pickle."""

    __slots__ = ("senders", "pipe", "max_result_bytes")

    def __init__(self, senders, pipe, max_result_bytes):
        self.senders = senders
        self.pipe = pipe
        self.max_result_bytes = max_result_bytes

    def __call__(self, ok, value):
        ok, payload = encode_reply(ok, value, self.max_result_bytes)
        self.senders.submit(self._send, (b"\1" if ok else b"\0") + payload)

    def _send(self, data):
        try:
            self.pipe.send_bytes(data)
        except (OSError, EOFError):
            pass  # the client is gone
        finally:
            self.pipe.close()
