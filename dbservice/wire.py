"""The Unix-socket protocol: framing and the shared-secret handshake.

Every message is a frame: a 13-byte header (payload length, job id, message
kind) and the payload. The job id sits outside the payload so that a job whose
payload cannot be decoded still gets its one reply.

Before any frame is decoded, the two sides prove to each other that they hold
the same secret, in the way of ``multiprocessing.connection``'s authkey: each
sends a random challenge and checks the HMAC the other returns. The daemon
reads nothing but these fixed, small, raw frames from a peer that has not
passed, and never unpickles them.
"""

import hashlib
import hmac
import os
import socket
import struct
from typing import Optional, Tuple, Union

from .errors import AuthenticationError, ServiceBusy, ServiceUnavailable

#: One frame as read: (job id, message kind, payload).
Frame = Tuple[int, int, bytes]

HEADER = struct.Struct("!IQB")  # payload length, job id, kind

# Message kinds, client to daemon.
MSG_JOB = 1
MSG_CANCEL = 3  # cancel the job with this id, if it is still in flight
MSG_STATUS = 4  # answered with the daemon's figures, as `dbserviced status` shows them
# Message kinds, daemon to client.
MSG_RESULT = 1
MSG_ERROR = 2
MSG_REFUSED = 5  # instead of a challenge: why the daemon takes no more clients, as text
# Handshake frames carry kind MSG_AUTH and job id 0.
MSG_AUTH = 0
# (6 is intake (a)'s part of a job, queue_wire.MSG_JOB_PART.)
# LISTEN/NOTIFY (listener.py, subscriptions.py): a subscription is named by the job id of its MSG_LISTEN.
MSG_LISTEN = 16  # client to daemon: subscribe to these channels; answered once they are listened to
MSG_UNLISTEN = 17  # client to daemon: end that subscription; not answered
MSG_NOTIFICATION = 18  # daemon to client: a notification for that subscription
MSG_NOTIFICATIONS_LOST = 19  # daemon to client: notifications for it were lost, and why
# COPY (copying.py, copy_client.py): a COPY job, then its data both ways, in frames of its job id.
MSG_COPY = 20  # client to daemon: a COPY job; its one reply is its rowcount or its error
MSG_COPY_STARTED = 21  # daemon to client: the server copies now: direction, encoding, window
MSG_COPY_DATA = 22  # either way: a chunk of the data
MSG_COPY_DONE = 23  # client to daemon: the data ended
MSG_COPY_CREDIT = 24  # either way: the receiver took this many more bytes: the sender may send as many more
COPY_IN, COPY_OUT = "in", "out"  # a MSG_COPY_STARTED's direction: from STDIN, to STDOUT
COPY_CREDIT = struct.Struct("!Q")  # a MSG_COPY_CREDIT's payload
# The operator's commands (maintenance.py), answered with figures.
MSG_PAUSE = 25  # payload: the seconds to wait for the pause to be complete, as ASCII
MSG_RESUME = 26
MSG_HANDOVER = 27  # from a new daemon (handover.py): the connection then carries the handover's frames
#: The client's frames that get no reply of their own: every other one is answered once, under its job id.
UNANSWERED = frozenset((MSG_CANCEL, MSG_UNLISTEN, MSG_COPY_DATA, MSG_COPY_DONE, MSG_COPY_CREDIT))

PROTOCOL = b"dbservice/1"
CHALLENGE_PREFIX = b"#CHALLENGE#" + PROTOCOL + b"#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
MAX_AUTH_FRAME = 128
MAX_REFUSAL_FRAME = 512
_NONCE_BYTES = 32
_DIGEST_BYTES = hashlib.sha256().digest_size
_LIMIT = struct.Struct("!Q")  # after the welcome's answer: the daemon's max_frame


class FrameError(Exception):
    """The peer broke the framing; the connection cannot be trusted any more."""


class OversizedFrame(FrameError):
    """A frame announced more than the limit; its payload is skipped, the stream goes on."""

    def __init__(self, job_id: int, size: int, limit: int) -> None:
        super().__init__(
            "the job takes %d bytes, more than the daemon takes in one job (max_frame %d): send fewer or "
            "smaller parameters, or raise --max-frame" % (size, limit)
        )
        self.job_id = job_id


def encode_frame(job_id: int, kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), job_id, kind) + payload


def new_challenge() -> bytes:
    return CHALLENGE_PREFIX + os.urandom(_NONCE_BYTES)


def answer_challenge(authkey: bytes, kind: int, challenge: bytes) -> bytes:
    """Our answer to the daemon's first frame: its challenge, or its refusal."""
    if kind == MSG_REFUSED:
        raise ServiceBusy(challenge.decode("utf-8", "replace"))
    if not challenge.startswith(CHALLENGE_PREFIX):
        raise AuthenticationError(
            "the peer does not speak %s (got %r)" % (PROTOCOL.decode(), challenge[:40])
        )
    return hmac.new(authkey, challenge, hashlib.sha256).digest()


def check_answer(authkey: bytes, challenge: bytes, answer: bytes) -> bool:
    expected = hmac.new(authkey, challenge, hashlib.sha256).digest()
    return hmac.compare_digest(expected, answer)


# -- the blocking side, used by the client ------------------------------------


def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise ServiceUnavailable("the dbservice daemon closed the connection")
        got += n
    return buf


def recv_frame(sock: socket.socket, max_size: Optional[int] = None) -> Frame:
    """Read one frame: (job_id, kind, payload)."""
    size, job_id, kind = HEADER.unpack(recv_exactly(sock, HEADER.size))
    if max_size is not None and size > max_size:
        raise FrameError("frame of %d bytes exceeds the limit of %d" % (size, max_size))
    return job_id, kind, bytes(recv_exactly(sock, size)) if size else b""


class ClientHandshake:
    """The client's side of the handshake, with no I/O: the sync and the asyncio drivers feed it.

    Give each frame the daemon sends to :meth:`receive`, which returns the
    frame to send back, if any; once :attr:`max_frame` is set, the daemon is
    trusted. :attr:`frame_limit` is how large the next frame from it may be.
    """

    def __init__(self, authkey: bytes) -> None:
        self.authkey = authkey
        self.max_frame: Optional[int] = None
        self._ours: Optional[bytes] = None  # our challenge, once we answered the daemon's

    @property
    def frame_limit(self) -> int:
        return MAX_REFUSAL_FRAME if self._ours is None else MAX_AUTH_FRAME

    def receive(self, kind: int, payload: bytes) -> Optional[bytes]:
        """Take the daemon's challenge (answered), or its verdict; raise AuthenticationError or ServiceBusy."""
        if self._ours is None:
            answer = answer_challenge(self.authkey, kind, payload)
            self._ours = new_challenge()
            return encode_frame(0, MSG_AUTH, answer + self._ours)
        self.max_frame = check_verdict(self.authkey, self._ours, payload)
        return None


def client_handshake(sock: socket.socket, authkey: bytes) -> int:
    """Prove we hold *authkey* on the blocking socket *sock* and check that the daemon does too; its max_frame."""
    handshake = ClientHandshake(authkey)
    while handshake.max_frame is None:
        _, kind, payload = recv_frame(sock, handshake.frame_limit)
        answer = handshake.receive(kind, payload)
        if answer is not None:
            sock.sendall(answer)
    return handshake.max_frame


def check_verdict(authkey: bytes, our_challenge: bytes, verdict: bytes) -> int:
    """The daemon's max_frame, or AuthenticationError unless it welcomed us and answered our challenge."""
    if not verdict.startswith(WELCOME):
        raise AuthenticationError(
            "the dbservice daemon refused our secret; pass the daemon's authkey "
            "or check the secret file next to its socket"
        )
    answer = verdict[len(WELCOME):len(WELCOME) + _DIGEST_BYTES]
    if not check_answer(authkey, our_challenge, answer):
        raise AuthenticationError("the process behind the socket does not know our secret")
    (max_frame,) = _LIMIT.unpack_from(verdict, len(WELCOME) + _DIGEST_BYTES)
    return max_frame


# -- the daemon's side -----------------------------------------------------


def verdict(authkey: bytes, our_challenge: bytes, kind: int, payload: bytes, max_frame: int) -> Tuple[bool, bytes]:
    """The daemon's side of the handshake: (trusted, the frame to send back).

    *payload* is the client's first frame: its answer to *our_challenge*,
    then a challenge of its own, which we answer when we welcome it, with
    the largest job we take (*max_frame*), so that the client refuses a
    larger one itself.
    """
    digest, theirs = payload[:_DIGEST_BYTES], payload[_DIGEST_BYTES:]
    if (
        kind != MSG_AUTH
        or not theirs.startswith(CHALLENGE_PREFIX)
        or not check_answer(authkey, our_challenge, digest)
    ):
        return False, encode_frame(0, MSG_AUTH, FAILURE)
    welcome = WELCOME + answer_challenge(authkey, MSG_AUTH, theirs) + _LIMIT.pack(max_frame)
    return True, encode_frame(0, MSG_AUTH, welcome)


class FrameReader:
    """Cuts a byte stream into frames, with no I/O of its own.

    Feed it what arrives; take the complete frames with :meth:`next_frame`.
    A frame announcing more than *max_size* bytes raises FrameError before
    any of it is buffered; with *skip_oversized* it raises OversizedFrame
    instead, and its payload is skipped as it arrives, never buffered.
    """

    def __init__(self, max_size: int, skip_oversized: bool = False) -> None:
        self.max_size = max_size
        self.skip_oversized = skip_oversized
        self._buffer = bytearray()
        self._start = 0
        self._skipping = 0  # bytes still to come of an oversized frame

    def feed(self, data: Union[bytes, memoryview]) -> None:
        if self._skipping:
            skipped = min(self._skipping, len(data))
            self._skipping -= skipped
            data = memoryview(data)[skipped:]
        self._buffer += data

    def next_frame(self) -> Optional[Frame]:
        """The next complete frame as (job_id, kind, payload), or None."""
        buffer, start = self._buffer, self._start
        if len(buffer) - start < HEADER.size:
            return self._compact()
        size, job_id, kind = HEADER.unpack_from(buffer, start)
        if size > self.max_size:
            if not self.skip_oversized:
                raise FrameError("frame of %d bytes exceeds the limit of %d bytes" % (size, self.max_size))
            buffered = min(size, len(buffer) - start - HEADER.size)
            self._start = start + HEADER.size + buffered
            self._skipping = size - buffered
            raise OversizedFrame(job_id, size, self.max_size)
        end = start + HEADER.size + size
        if end > len(buffer):
            return self._compact()
        self._start = end
        return job_id, kind, bytes(buffer[start + HEADER.size : end])

    def detach(self) -> Tuple[bytes, int]:
        """What was fed and not yet cut into frames, and the bytes of an oversized frame still to skip.

        For a reader that goes on with the same stream elsewhere (:meth:`take_over`).
        """
        return bytes(self._buffer[self._start:]), self._skipping

    def take_over(self, unread: bytes, skipping: int) -> None:
        """Go on with a stream another reader has :meth:`detach`-ed."""
        self._buffer = bytearray(unread)
        self._start = 0
        self._skipping = skipping

    def _compact(self) -> None:
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        return None
