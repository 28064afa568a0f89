"""Intake (a)'s protocol: the pipe jobs travel on, and each client thread's reply channel.

Every client process of the app writes its jobs into one pipe, the job queue,
that only the service reads. Each write is one frame of :mod:`dbservice.wire`
of at most ``PIPE_BUF`` bytes, which the kernel writes whole or not at all, so
no lock is shared between the writers: a client process stopped or killed at
any point holds up nobody. A frame's id is the sender's channel id; its
payload is the job id and (a part of) the job's pickle. A job too large for
one frame goes as parts, the last one of kind ``MSG_JOB``.

Each client thread owns a reply channel: a FIFO in a private directory the
service created (0700), named after the channel id. The thread creates it and
opens its reading end before it sends its first job, so the daemon can open
the writing end on its own, without the client's help, when that job
arrives; it then unlinks the name. Replies are wire frames, tagged with the
job id.
"""

import multiprocessing
import os
import select
import shutil
import struct
import tempfile
from multiprocessing.connection import Connection
from typing import List, Optional

from .wire import HEADER, encode_frame

#: The job id at the head of every frame's payload on the job queue.
JOB_ID = struct.Struct("!Q")
#: A part of a job; the job's last (or only) part is a MSG_JOB.
MSG_JOB_PART = 6
#: The largest write the kernel keeps whole among concurrent writers.
FRAME_BYTES = select.PIPE_BUF
PART_BYTES = FRAME_BYTES - HEADER.size - JOB_ID.size


def channel_path(directory: str, channel_id: int) -> str:
    """Where the FIFO of reply channel *channel_id* is created."""
    return os.path.join(directory, "%016x" % channel_id)


class JobQueue:
    """The job queue's pipe and the reply channels' directory, as one service holds them.

    Made by :class:`~dbservice.DBService` before it starts the service, which
    takes the reading end; the app's processes keep the writing end, made
    non-blocking so that a client waiting for room can time out.
    """

    def __init__(self, reader: Connection, writer: Optional[Connection], directory: str) -> None:
        self.reader = reader
        self.writer = writer
        self.directory = directory

    @classmethod
    def create(cls) -> "JobQueue":
        reader, writer = multiprocessing.Pipe(duplex=False)
        os.set_blocking(writer.fileno(), False)
        return cls(reader, writer, tempfile.mkdtemp(prefix="dbservice-replies-"))

    def for_service(self) -> "JobQueue":
        """What the service process needs: the reading end and the directory."""
        return JobQueue(self.reader, None, self.directory)

    def close_reader(self) -> None:
        """Once the service holds its copy: a write then fails when the service is gone."""
        self.reader.close()

    def remove_directory(self) -> None:
        """Remove the reply channels' directory, with any FIFO left in it.

        The writing end stays open as long as a client holds it: a write
        then fails cleanly (EPIPE), where a closed descriptor's number could
        meanwhile belong to another file.
        """
        shutil.rmtree(self.directory, ignore_errors=True)

def job_frames(channel_id: int, job_id: int, kind: int, payload: bytes) -> List[bytes]:
    """The frames that carry one message of *kind* on the job queue, each small enough to stay whole."""
    head = JOB_ID.pack(job_id)
    if len(payload) <= PART_BYTES:
        return [encode_frame(channel_id, kind, head + payload)]
    view = memoryview(payload)
    starts = range(0, len(payload), PART_BYTES)
    last = starts[-1]
    return [
        encode_frame(channel_id, kind if start == last else MSG_JOB_PART, head + view[start : start + PART_BYTES])
        for start in starts
    ]

