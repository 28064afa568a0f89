"""Intake (b): jobs from unrelated processes over a Unix domain socket.

Each client connection carries many jobs in turn, each tagged with an id and
answered on the same connection, possibly out of order. A client first proves
it holds the shared secret; until then nothing it sends is decoded. Job
payloads are decoded by the restricted unpickler of :mod:`dbservice.jobs`.
A client that stalls or sends garbage only loses its own connection, and
one that does not read its replies only holds what backpressure.py allows.
A job or request the daemon itself fails on, decoding it, handling its
frame or encoding its reply, is answered with an InternalError; its
connection goes on.
"""

import asyncio
import errno
import functools
import logging
import os
import socket
import stat

from .backpressure import ResultGate
from .copying import ClientCopies, CopySlots
from .answering import FrameAnswers, reply_error
from .errors import JobCancelled, JobRefused
from .jobs import encode_reply, loads_job
from .wire import (
    HEADER,
    MAX_AUTH_FRAME,
    MSG_AUTH,
    MSG_CANCEL,
    MSG_COPY,
    MSG_COPY_CREDIT,
    MSG_COPY_DATA,
    MSG_COPY_DONE,
    MSG_ERROR,
    MSG_HANDOVER,
    MSG_JOB,
    MSG_LISTEN,
    MSG_PAUSE,
    MSG_REFUSED,
    MSG_RESULT,
    MSG_RESUME,
    MSG_STATUS,
    MSG_UNLISTEN,
    UNANSWERED,
    FrameError,
    FrameReader,
    OversizedFrame,
    encode_frame,
    new_challenge,
    verdict,
)

logger = logging.getLogger("dbservice.socket")

#: Replies of this many bytes or more are written without joining them to their header.
LARGE_REPLY = 65536
#: Clients accepted in one turn of the loop at most, and seconds before accepting again when out of descriptors.
ACCEPTS_PER_TURN = 100
ACCEPT_RETRY_DELAY = 1.0
#: What the client sends of a COPY under way (copying.py).
COPY_FRAMES = frozenset((MSG_COPY_DATA, MSG_COPY_DONE, MSG_COPY_CREDIT))
#: A subscription's beginning and end (listener.py).
SUBSCRIPTION_FRAMES = frozenset((MSG_LISTEN, MSG_UNLISTEN))
#: The frames that are jobs, counted by the engine however they end.
JOB_FRAMES = frozenset((MSG_JOB, MSG_COPY))


class SocketIntake:
    """Serves the Unix socket at *path* for *engine*."""

    def __init__(self, engine, path, authkey):
        self.engine = engine
        self.path = path
        self.authkey = authkey
        self.settings = engine.settings
        self._listener = None
        self._clients = set()  # the _ClientProtocol of every connected client
        # Since start, for the metrics: what they read is counted where it happens.
        self.clients_accepted = 0
        self.clients_refused = 0  # beyond max_clients
        self.bytes_received = 0
        self.bytes_sent = 0  # of replies
        #: handover.Predecessor.begin, to hand this daemon over to a new one; None: refused
        self.on_handover = None
        self.path_handed_over = False  # the listener went to a new daemon: its path is not ours to remove
        self._hand_over = None  # while handing the clients over: what each one is given to
        self._client_gone = None  # and what is told of each that disconnects
        self.connecting = 0  # accepted (or handed over to us), their connection_made not yet run
        self._connecting_tasks = set()
        self.copy_slots = CopySlots(self.settings.max_copies)

    async def start(self, sock=None):
        """Listen on our path, or on *sock*, the listening socket a daemon handed over to us.

        We accept ourselves rather than through ``loop.create_unix_server``:
        an asyncio server closed to stop accepting drops the connections it
        accepted in the same turn, before their protocol was made, and a
        restart (handover.py) must stop accepting without dropping any.
        """
        if sock is None:
            check_socket_dir(os.path.dirname(self.path))
            remove_stale_socket(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)  # the socket itself: owner only
            try:
                sock.bind(self.path)
            except BaseException:
                sock.close()
                raise
            finally:
                os.umask(old_umask)
            # A backlog for a burst of max_clients connecting at once (the
            # kernel caps it at net.core.somaxconn).
            sock.listen(self.settings.max_clients)
            logger.info("serving jobs on %s", self.path)
        else:
            logger.info("serving jobs on %s, handed over", self.path)
        sock.setblocking(False)
        self._listener = sock
        self._accept_again()

    def _accept_again(self):
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

    def _accept(self):
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors or memory: as asyncio does, try again in a while
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                logger.error("cannot accept a client (%s); trying again in %.0f s", exc, ACCEPT_RETRY_DELAY)
                loop.remove_reader(self._listener.fileno())
                loop.call_later(ACCEPT_RETRY_DELAY, self._accept_again)
                return
            self._connect(conn, lambda: _ClientProtocol(self))

    def _connect(self, sock, protocol_factory):
        """Serve *sock*, accepted: its protocol is made in a turn to come, counted meanwhile as connecting."""
        self.connecting += 1
        task = asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().connect_accepted_socket(protocol_factory, sock)
        )
        self._connecting_tasks.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task):
        self._connecting_tasks.discard(task)
        self.connecting -= 1
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not serve a client that connected: %s", task.exception())
        if self._client_gone is not None:
            self._client_gone()

    @property
    def listening_socket(self):
        return self._listener

    def stop_accepting(self):
        """Accept no more clients, leaving the path to the daemon we handed the listener to; the listener."""
        asyncio.get_running_loop().remove_reader(self._listener.fileno())
        return self._listener

    async def stop_listening(self):
        """Accept no more clients; those connected keep getting their replies."""
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            if self.path_handed_over:
                return
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def drain(self, hand_over, client_gone=None):
        """Give each client to ``hand_over(client)`` once it is at a job boundary (None: keep them); how many.

        Those accepted and not yet connected are given too, once they are.
        ``client_gone()`` is called meanwhile for each client that disconnects.
        """
        self._hand_over = hand_over
        self._client_gone = client_gone
        for client in list(self._clients):
            client.drain(hand_over)
        return len(self._clients) + self.connecting

    @property
    def drained(self):
        """No client is left, nor accepted on its way to connection_made."""
        return not self._clients and not self.connecting

    def adopt(self, sock, unread, skipping):
        """Serve a client connection a daemon handed over to us, authenticated already, from where it stands."""
        self._connect(sock, lambda: _ClientProtocol(self, adopted=(unread, skipping)))

    async def close(self):
        """Stop accepting and close every client connection, once replies are flushed."""
        await self.stop_listening()
        await self.engine.listener.close()
        for client in list(self._clients):
            client.transport.close()  # writes what is buffered first

    @property
    def clients(self):
        return len(self._clients)

    def status(self):
        """The engine's figures, and this socket's."""
        return dict(self.engine.status(), socket=self.path, socket_clients=self.clients,
                    copies_running=self.copy_slots.running, **self.engine.listener.status())


class _ClientProtocol(FrameAnswers, asyncio.Protocol):
    """One client connection: the handshake, then its jobs and their replies.

    Frames are cut from what arrives in :meth:`data_received` and handled at
    once, with no task or stream in between: a job goes from the socket to
    the dispatcher in the same turn of the loop.
    """

    def __init__(self, intake, adopted=None):
        self.intake = intake
        self.engine = intake.engine
        self.settings = intake.settings
        self.transport = None
        self.frames = FrameReader(MAX_AUTH_FRAME)
        self.trusted = False
        self.in_flight = {}  # job id -> PendingJob
        self.gate = ResultGate()  # its turn to read large results, and whether it is backed up
        self.copies = None  # its COPYs (ClientCopies), from its first
        self.subscriptions = None  # its subscriptions (listener.ClientSubscriptions), from its first
        self._challenge = None
        self._auth_timer = None
        self._stall_timer = None  # while backed up: when to give up on it
        self._reading = True  # the transport reads
        self._cutting = False  # inside _cut_frames: replies sent meanwhile need not call it again
        self._answering = None  # the job id of the frame being handled, until it is answered
        self._adopted = adopted  # (unread, skipping) of a connection handed over to us, authenticated already
        self.hand_over = None  # while this daemon hands its clients over: called once we are at a job boundary

    def connection_made(self, transport):
        self.transport = transport
        clients = self.intake._clients
        if len(clients) >= self.settings.max_clients:
            # Said in plain text: the client reads it before any trust exists.
            logger.warning("refused a client: already %d (max_clients)", len(clients))
            self.intake.clients_refused += 1
            transport.write(
                encode_frame(0, MSG_REFUSED, b"the dbservice daemon has max_clients (%d) clients "
                             b"already; try again later" % self.settings.max_clients)
            )
            transport.close()
            return
        clients.add(self)
        self.intake.clients_accepted += 1
        transport.set_write_buffer_limits(high=self.settings.max_client_buffer)
        if self._adopted is not None:
            self._trust()
            self.frames.take_over(*self._adopted)
            if self.intake._hand_over is not None:  # we hand our clients over already
                self.drain(self.intake._hand_over)
            else:
                self._cut_frames()
            return
        self._challenge = new_challenge()
        transport.write(encode_frame(0, MSG_AUTH, self._challenge))
        loop = asyncio.get_running_loop()
        self._auth_timer = loop.call_later(self.settings.auth_timeout, self._auth_timed_out)
        if self.intake._hand_over is not None:  # accepted before we stopped accepting
            self.drain(self.intake._hand_over)

    def data_received(self, data):
        self.intake.bytes_received += len(data)
        self.frames.feed(data)
        self._cut_frames()

    def _cut_frames(self):
        """Handle the frames that arrived, as many as the client's bounds let in (backpressure.py).

        An error while cutting a frame drops the connection: with the framing
        broken, what follows cannot be tied to any job. A frame the daemon
        fails on once it is cut is answered alone, with an InternalError
        (:meth:`_dispatch`, :meth:`reply`); the connection goes on.
        """
        self._cutting = True
        try:
            while not self.transport.is_closing():
                if self.gate.backed_up or len(self.in_flight) >= self.settings.max_client_jobs:
                    self._read(False)  # the rest waits, unread, until replies go out
                    return
                if self.hand_over is not None and self.trusted and not self._held_here():
                    self._read(False)  # what comes now is for the daemon we hand it to
                    return
                try:
                    frame = self.frames.next_frame()
                except OversizedFrame as exc:  # its payload is skipped: the client goes on
                    logger.warning("refused a job: %s", exc)
                    self.engine.refuse(self.reply, exc.job_id, JobRefused(str(exc)))
                    continue
                if frame is None:
                    self._read(True)
                    return
                if self.trusted:
                    self._dispatch(*frame)
                else:
                    self._authenticate(*frame)
        except FrameError as exc:  # before the handshake: nothing of it is read
            logger.warning("dropping a client that broke the framing: %s", exc)
            self.transport.close()
        finally:
            self._cutting = False

    def _read(self, reading):
        if reading != self._reading and not self.transport.is_closing():
            self._reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def connection_lost(self, exc):
        self.intake._clients.discard(self)
        for timer in (self._auth_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        # Nobody is left to read these jobs' results: cancel them, so a query
        # of a client that died does not run on for nothing. A large result
        # under way would be read to its end by a cancel: close instead.
        for conn in self.gate.close():
            conn.close()
        for pending in list(self.in_flight.values()):
            self.engine.cancel(pending, JobCancelled("the client went away"))
        self.engine.transactions.abandon(self)
        if self.subscriptions is not None:
            self.subscriptions.close()
        if self.intake._client_gone is not None:
            self.intake._client_gone()

    # More than max_client_buffer bytes of replies wait: the client is backed
    # up, and is given client_stall_timeout to read them.
    def pause_writing(self):
        self.gate.set_backed_up(True)
        loop = asyncio.get_running_loop()
        self._stall_timer = loop.call_later(self.settings.client_stall_timeout, self._stalled)

    def resume_writing(self):
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.gate.set_backed_up(False)
        if self.subscriptions is not None:
            self.subscriptions.resumed()  # what they lost while it was backed up
        self._cut_frames()
        self._check_idle()

    def _stalled(self):
        self._stall_timer = None
        logger.warning(
            "dropping a client that read none of its replies for %.0f s (%d bytes waiting; "
            "client_stall_timeout); its %d jobs are cancelled",
            self.settings.client_stall_timeout, self.transport.get_write_buffer_size(), len(self.in_flight),
        )
        self.transport.abort()

    def _authenticate(self, job_id, kind, payload):
        trusted, answer = verdict(self.intake.authkey, self._challenge, kind, payload, self.settings.max_frame)
        self.transport.write(answer)
        self._auth_timer.cancel()
        self._auth_timer = None
        if not trusted:
            logger.warning("a client failed authentication (wrong secret); dropped")
            self.transport.close()
            return
        self._trust()
        self._check_idle()

    def _trust(self):
        self.trusted = True
        self.frames.max_size = self.settings.max_frame
        self.frames.skip_oversized = True

    def _auth_timed_out(self):
        logger.warning("a client did not authenticate within %.1f s; dropped", self.settings.auth_timeout)
        self._auth_timer = None
        self.transport.close()

    def _dispatch(self, job_id, kind, payload):
        """Handle a frame; should the daemon fail on it (a bug of ours), the request still gets one reply.

        That reply is an InternalError (answering.py), unless the frame's
        request had one already. A job in flight under the frame's id (the
        frame was its CANCEL or its COPY's data), or a LISTEN not answered
        yet, ends with it, as its reply. A frame that has no reply
        (wire.UNANSWERED) and no job in flight, such as an UNLISTEN, is only
        logged.
        """
        self.answer(job_id, kind, payload, self._handle, "a client")

    def _failed(self, job_id, kind, error):
        """Answer with *error* the frame the daemon failed on (see :meth:`_dispatch`)."""
        pending = self.in_flight.get(job_id)
        if pending is not None:
            self.engine.cancel(pending, error)
        elif self.subscriptions is not None and self.subscriptions.fail(job_id, error):
            pass  # a LISTEN taken in, answered with the error instead of later
        elif not self.unanswered(job_id) or kind in UNANSWERED:
            return  # answered already, or never
        elif kind in JOB_FRAMES:
            self.engine.refuse(self.reply, job_id, error)  # counted as failed, as a job
        else:
            self.reply(job_id, False, error)

    def _handle(self, job_id, kind, payload):
        if kind == MSG_JOB:
            self._submit(job_id, payload)
        elif kind == MSG_CANCEL:
            pending = self.in_flight.get(job_id)
            if pending is not None:
                self.engine.cancel(pending, JobCancelled("the client cancelled the job"))
        elif kind == MSG_STATUS:
            self.reply(job_id, True, self.intake.status())
        elif kind == MSG_PAUSE:
            self._pause(job_id, payload)
        elif kind == MSG_RESUME:
            self.reply(job_id, True, self.engine.maintenance.resume())
        elif kind == MSG_HANDOVER and self.intake.on_handover is not None:
            self.intake.on_handover(self, job_id, payload)
        elif kind == MSG_COPY:
            if self.copies is None:
                self.copies = ClientCopies(self, self.intake.copy_slots)
            self.copies.start(job_id, payload)
        elif kind in COPY_FRAMES:
            if self.copies is not None:
                self.copies.receive(job_id, kind, payload)
        elif kind in SUBSCRIPTION_FRAMES:
            if self.subscriptions is None:
                self.subscriptions = self.engine.listener.client(self)
            self.subscriptions.receive(job_id, kind, payload)
        else:
            self.reply(job_id, False, JobRefused("unknown message kind %d" % kind))

    def _submit(self, job_id, payload):
        try:
            job = loads_job(payload, self.settings.max_params_size)
        except JobRefused as exc:  # any other exception is a bug of ours: see _dispatch
            logger.warning("refused a job: %s", exc)
            self.engine.refuse(self.reply, job_id, exc)
            return
        pending = self.engine.submit(job, self.reply, job_id, owner=self)
        if not pending.done:
            self.in_flight[job_id] = pending

    def _pause(self, job_id, payload):
        try:
            timeout = float(payload.decode("ascii"))
        except ValueError:
            self.reply(job_id, False, JobRefused("a pause needs its timeout in seconds, not %r" % payload[:40]))
            return
        self.engine.maintenance.pause(timeout, functools.partial(self.reply, job_id))

    def reply(self, job_id, ok, value):
        """Send the one reply of job *job_id* back on this connection; the ``(ok, value)`` it sent.

        A result too large or that cannot be pickled is replaced by the
        error saying so (encode_reply); a reply the daemon fails to encode
        (a bug of ours), by an InternalError. What was sent is what the
        engine counts the job by. A reply the daemon fails to write drops
        the connection: part of it may be in the stream already, so the
        client could not tell where the next frame begins.
        """
        full = len(self.in_flight) >= self.settings.max_client_jobs
        self.in_flight.pop(job_id, None)
        self.answered(job_id)
        if self.transport.is_closing():
            return ok, value
        try:
            ok, value, frames = self._reply_frames(job_id, ok, value)
        except Exception as exc:
            ok, value, frames = self._reply_frames(job_id, False, reply_error(exc, "the reply of job %d", job_id))
        try:
            for frame in frames:
                self.transport.write(frame)
        except Exception:
            logger.exception("failed writing the reply of job %d; dropping its client", job_id)
            self.transport.abort()
            return ok, value
        if full and not self._cutting:
            asyncio.get_running_loop().call_soon(self._cut_frames)  # room for one more of its jobs
        if self.hand_over is not None:
            asyncio.get_running_loop().call_soon(self._check_idle)  # once its transaction, if any, is gone too
        return ok, value

    def _reply_frames(self, job_id, ok, value):
        """A reply's ``(ok, value, frames)``: as sent (see encode_reply), in one frame or, large, two.

        A large reply's header and payload are not joined: that would be one more copy of it.
        """
        ok, value, payload = encode_reply(ok, value, self.settings.max_result_bytes)
        kind = MSG_RESULT if ok else MSG_ERROR
        self.intake.bytes_sent += HEADER.size + len(payload)
        if len(payload) < LARGE_REPLY:
            return ok, value, (encode_frame(job_id, kind, payload),)
        return ok, value, (HEADER.pack(len(payload), job_id, kind), payload)

    # -- handing the connection over to a new daemon (handover.py) ------------------

    def drain(self, hand_over):
        """Call ``hand_over(self)`` once at a job boundary; None: serve on here."""
        self.hand_over = hand_over
        # Replies not sent yet hold it back: with no room in the buffer, the
        # transport says when they are gone (resume_writing).
        self.transport.set_write_buffer_limits(high=0 if hand_over else self.settings.max_client_buffer)
        if hand_over is None:
            self._cut_frames()
        else:
            self._check_idle()

    def _check_idle(self):
        """Hand the connection over if nothing of it is left here; with a transaction or a COPY open, read on.

        A connection with subscriptions is closed instead: they are this
        daemon's, and its client subscribes again, to the new daemon, with
        the marker of a daemon restart (subscriptions.py).
        """
        if self.hand_over is None or self.transport.is_closing() or not self.trusted:
            return
        if self._held_here():
            self._cut_frames()  # its transaction's statements, its COPY's data: here, to their end
        elif not self.in_flight and not self.transport.get_write_buffer_size():
            if self.subscriptions is not None and len(self.subscriptions):
                self.transport.close()
            else:
                self.hand_over(self)

    def _held_here(self):
        """Whether it has a transaction open or a COPY under way, which go on here to their end."""
        return self.engine.transactions.holds(self) or bool(self.copies is not None and self.copies.streams)

    def detach(self):
        """Take the socket away from this daemon; with it, what the client sent that is not a job yet."""
        sock = socket.socket(fileno=os.dup(self.transport.get_extra_info("socket").fileno()))
        unread = self.frames.detach()
        self.intake._clients.discard(self)
        self.hand_over = None
        self.transport.abort()
        return sock, unread


def check_socket_dir(directory):
    """Create the socket's directory 0700, or refuse one others can enter."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    if mode & 0o077:
        raise PermissionError(
            "the socket directory %s has mode %04o; other users could reach the socket. "
            "Run `chmod 700 %s` and start again" % (directory, mode, directory)
        )


def check_private_file(path):
    """Refuse a secret that others than its owner may read or that is not ours."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise PermissionError(
            "the secret %s has mode %04o; other users could read it and talk to the daemon. "
            "Run `chmod 600 %s` and start again" % (path, mode, path)
        )
    if st.st_uid != os.geteuid():
        raise PermissionError(
            "the secret %s belongs to uid %d, not to us (uid %d); run the daemon as its owner"
            % (path, st.st_uid, os.geteuid())
        )


def remove_stale_socket(path):
    """Remove an old socket left at *path*; refuse to remove anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError("%s exists and is not a socket; move it away or choose another path" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left behind by a daemon that died
    else:
        raise FileExistsError("another process already serves %s; stop it first" % path)
    finally:
        probe.close()
