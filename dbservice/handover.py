"""A restart that fails no job: the running daemon hands its socket, then each of its clients, to a new one.

``dbserviced restart`` starts a new daemon (new code, new settings) that
opens its pool, then connects to the running one's socket like any client,
proves it holds the secret and asks it to hand over. The old daemon passes
its listening sockets (the Unix socket, and the metrics port) over that
connection as file descriptors (``SCM_RIGHTS``): the listening socket is
never closed, so a client connecting meanwhile waits in its backlog, never
refused: the old daemon accepts no more once it passed the socket on, the
new one from when it serves. Then the old one hands over each client
connection itself, socket and all, at a job boundary: when it has no job in
the daemon and no transaction open, and its replies are sent. What the
client sent since and the old daemon had not yet cut into jobs travels with
it. The client sees nothing: its connection is the same, served by the new
daemon from its next job on. A client in a transaction is served by the old
daemon until the transaction ends; a new job it sends meanwhile stays
unread, for the new daemon. The old daemon exits once it has no client left,
or after ``stop_timeout``, which then ends what is left as a stop does.

Why not the other known designs: a re-exec with the socket inherited
(gunicorn's USR2) gives the new daemon the old one's environment, not the
command's new settings, and still leaves the connected clients on the old
daemon; a new socket renamed over the old path leaves the old listener's
backlog to be drained in a race, and Unix sockets have no SO_REUSEPORT.
Handing over the connections themselves is what makes them lose nothing.

If the new daemon dies before the old one is done, the old one takes its
listening socket and its pidfile back and goes on serving; a client already
handed over (its socket gone with the new daemon) reconnects on its next
job. The pidfile, one daemon per state directory, passes to the new daemon
when it serves; the embedded PostgreSQL, if the daemon runs one, passes too
(the new daemon adopts the running server and stops it at its own stop);
the secret is the state directory's, and stays.
"""

import asyncio
import collections
import json
import logging
import os
import socket
import struct
import sys
from typing import Any, Dict

from .errors import Error
from .jobs import loads_reply
from .wire import MSG_ERROR, MSG_HANDOVER, FrameReader, client_handshake, encode_frame

logger = logging.getLogger("dbservice.handover")

# Frames between the two daemons once the old one accepted; the job id field
# carries how many file descriptors come with the frame.
# The old daemon's first frame is this, or wire's MSG_ERROR saying why not.
MSG_LISTENERS = 32  # old to new, JSON {"pid", "metrics"}; fds: the socket's listener, the metrics' if any
MSG_SERVING = 33  # new to old: it accepts on the listener; the old one may stop and hand its clients over
MSG_CLIENT = 34  # old to new: a client connection; payload: bytes still to skip (8), then bytes not yet cut
MSG_DONE = 35  # old to new: no client is left

#: Seconds the new daemon waits for the old one to answer its request.
REQUEST_TIMEOUT = 10.0
#: File descriptors one receive may bring.
MAX_FDS = 64

_SKIPPING = struct.Struct("!Q")


class HandoverRefused(Error):
    """The running daemon would not hand over; the message says why and what to do."""


class Handover:
    """What the daemon (daemon.py) and its engine (service.py) share of a handover.

    *pidfile* passes from daemon to daemon; *successor*: this daemon takes
    over from the one running, instead of starting afresh.
    """

    def __init__(self, pidfile, successor=False, adopts_cluster=False):
        self.pidfile = pidfile
        self.successor = successor
        self.adopts_cluster = adopts_cluster  # the running daemon's embedded PostgreSQL becomes ours
        self.took_over = False  # as successor: we serve, the pidfile is ours
        self.cluster_adopted = False  # as predecessor: our successor took our embedded PostgreSQL over
        self.adopts_standbys = 0  # as successor: the embedded standbys we keep (1 to N), the running ones adopted
        self.standbys_adopted = 0  # as predecessor: how many of our standbys the successor took over with it
        self.predecessor_pid = None


class FdChannel:
    """Frames, each with the file descriptors it carries, between two daemons' event loops.

    ``on_frame(kind, payload, fds)`` for each frame that arrives; ``on_closed()``
    once, when the peer goes away.
    """

    def __init__(self, sock, on_frame, on_closed):
        sock.setblocking(False)
        self.sock = sock
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._on_frame = on_frame
        self._on_closed = on_closed
        self._frames = FrameReader(sys.maxsize)  # the peer proved it holds the secret
        self._fds = collections.deque()  # received, for the frames not yet cut
        self._out = collections.deque()  # [data, fds to send with its first byte, sockets to close once sent]
        self._sent = None  # a future while someone waits for what is queued to leave
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, kind, payload=b"", fds=(), close_after=()):
        """Queue a frame carrying *fds*; the sockets *close_after* are closed once they left with it."""
        self._out.append([encode_frame(len(fds), kind, payload), list(fds), list(close_after)])
        self._flush()

    def _flush(self):
        while self._out and not self.closed:
            item = self._out[0]
            data, fds, close_after = item
            try:
                sent = socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            except BlockingIOError:
                self._loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:
                self._lost()
                return
            item[1] = []  # the descriptors left with the first byte
            for sock in close_after:
                sock.close()
            item[2] = []
            if sent < len(data):
                item[0] = data[sent:]
                continue
            self._out.popleft()
        if not self.closed:
            self._loop.remove_writer(self.sock.fileno())
        if self._sent is not None and not self._sent.done() and (self.closed or not self._out):
            self._sent.set_result(None)

    async def sent(self):
        """Return once every frame queued has left (or the peer went away)."""
        if self._out and not self.closed:
            self._sent = self._loop.create_future()
            await self._sent

    def _readable(self):
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, 65536, MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            self._lost()
            return
        self._fds.extend(fds)
        if not data or flags & socket.MSG_CTRUNC:
            self._lost()
            return
        self._frames.feed(data)
        while not self.closed:
            frame = self._frames.next_frame()
            if frame is None:
                return
            count, kind, payload = frame
            if count > len(self._fds):  # the peer does not speak this protocol
                self._lost()
                return
            self._on_frame(kind, payload, [self._fds.popleft() for _ in range(count)])

    def _lost(self):
        if not self.closed:
            self.close()
            self._on_closed()

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self._loop.remove_writer(self.sock.fileno())
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())
        for _, _, close_after in self._out:
            for sock in close_after:
                sock.close()
        self._out.clear()
        if self._sent is not None and not self._sent.done():
            self._sent.set_result(None)


# -- the daemon that goes ------------------------------------------------------------


class Predecessor:
    """The running daemon's side: hands its listeners, then its idle clients, to the daemon taking over.

    *stopped(what)* ends this daemon's serving once it is done ("handed
    over"), or once *stop_timeout* has passed ("handed over late").
    """

    def __init__(self, handover, engine, intake, metrics, stopped):
        self.handover = handover
        self.engine = engine
        self.intake = intake
        self.metrics = metrics
        self.stopped = stopped
        self.channel = None
        self._kept = None  # our copy of the listening socket, until the successor is done with us
        self._deadline = None
        self._draining = False  # the successor serves: our clients go to it
        self._done = False
        self._stopping = None  # the task that stops this daemon once the last frames have left

    def begin(self, protocol, job_id, payload):
        """A client asks us to hand over (MSG_HANDOVER): start, or tell it why not."""
        refusal = self._refusal()
        if refusal is not None:
            logger.warning("refused to hand over: %s", refusal)
            protocol.reply(job_id, False, HandoverRefused(refusal))
            return
        try:
            request = json.loads(payload)
            pid = int(request["pid"])
        except (ValueError, KeyError, TypeError):
            protocol.reply(job_id, False, HandoverRefused("a handover request is JSON with the new daemon's pid"))
            return
        sock, _ = protocol.detach()
        self.channel = FdChannel(sock, self._on_frame, self._on_closed)
        self.handover.cluster_adopted = bool(request.get("adopts_cluster"))
        self.handover.standbys_adopted = int(request.get("adopts_standbys", 0))
        logger.info("handing over to the daemon with pid %d: its listeners first", pid)
        # Accept no more: a client connecting from now on waits in the
        # backlog for the new daemon. One accepted later would reach us after
        # we looked for clients to hand over, and be dropped as we exit.
        self._kept = self.intake.stop_accepting()
        listeners = [self._kept]
        if self.metrics is not None:
            listeners.append(self.metrics.socket)
        self.intake.path_handed_over = True
        info = {"pid": os.getpid(), "metrics": None if self.metrics is None else self.metrics.address}
        self.channel.send(MSG_LISTENERS, json.dumps(info).encode(), [s.fileno() for s in listeners])

    def _refusal(self):
        if self.channel is not None:
            return "a handover is under way already; try again once it is done"
        if self.handover.successor and not self.handover.took_over:
            return "this daemon is still taking over from the one before it; try again in a moment"
        if self.engine.pool.suspended:
            return "the daemon is paused: resume it (`dbserviced resume`) before a restart"
        return None

    def _on_frame(self, kind, payload, fds):
        for fd in fds:
            os.close(fd)
        if kind == MSG_SERVING:
            self._drain()

    def _drain(self):
        """The successor serves: hand each client over as it comes to rest."""
        self._draining = True
        if self.metrics is not None:
            self.metrics.close()
        clients = self.intake.drain(self._hand_over, self._check_done)
        logger.info("the new daemon serves; handing over %d clients as their jobs end", clients)
        timeout = self.engine.settings.stop_timeout
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._finish, "handed over late")
        self._check_done()

    def _hand_over(self, protocol):
        sock, (unread, skipping) = protocol.detach()
        self.channel.send(MSG_CLIENT, _SKIPPING.pack(skipping) + unread, [sock.fileno()], close_after=[sock])
        self._check_done()

    def _check_done(self):
        if self.intake.drained and not self._done:
            self.channel.send(MSG_DONE)
            self._finish("handed over")

    def _finish(self, what):
        if self._done:
            return
        self._done = True
        if self._deadline is not None:
            self._deadline.cancel()
        if what != "handed over":
            logger.warning(
                "%d clients were still busy after stop_timeout (%g s): what they have running ends as in a stop",
                self.intake.clients, self.engine.settings.stop_timeout,
            )
        self._stopping = asyncio.ensure_future(self._stop_once_sent(what))

    async def _stop_once_sent(self, what):
        await self.channel.sent()  # the clients handed over must reach the new daemon before we exit
        self.stopped(what)

    def _on_closed(self):
        """The successor went away: if it did before we were done, serve on as before."""
        if self._done:
            return
        logger.error("the new daemon went away during the handover; this daemon serves on")
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.intake.path_handed_over = False
        self.handover.cluster_adopted = False
        self.channel = None
        draining, self._draining = self._draining, False
        self.handover.pidfile.take_over()  # written by the successor already, if it got that far
        if draining:
            self.intake.drain(None)
        asyncio.ensure_future(self._serve_again(metrics_closed=draining))

    async def _serve_again(self, metrics_closed):
        kept, self._kept = self._kept, None
        await self.intake.start(sock=kept)
        if self.metrics is not None and metrics_closed:
            await self.metrics.start()


# -- the daemon that comes -----------------------------------------------------------


class Successor:
    """The new daemon's side: the listeners it got from the running daemon, and the clients that follow."""

    def __init__(self, channel_sock):
        self._loop = asyncio.get_running_loop()
        self._first = self._loop.create_future()
        self.channel = FdChannel(channel_sock, self._on_frame, self._on_closed)
        self.info: Dict[str, Any] = {}  # the old daemon's pid, and where its metrics listened
        self.listener = None
        self.metrics_socket = None
        self.done = self._loop.create_future()  # set once the old daemon has no client left
        self._adopt = None

    @classmethod
    async def ask(cls, path, authkey, request):
        """Ask the daemon on *path* to hand over; the Successor once its listeners came, or HandoverRefused."""
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, _request, path, authkey, request)
        successor = cls(sock)
        try:
            await asyncio.wait_for(asyncio.shield(successor._first), REQUEST_TIMEOUT)
        except BaseException:
            successor.channel.close()
            raise
        return successor

    def serving(self, adopt):
        """We accept on the listener: let the old daemon stop, and give each client it hands over to *adopt*.

        ``adopt(sock, unread, skipping)``: SocketIntake.adopt.
        """
        self._adopt = adopt
        self.channel.send(MSG_SERVING)

    def _on_frame(self, kind, payload, fds):
        if kind == MSG_LISTENERS and not self._first.done():
            self.info = json.loads(payload)
            self.listener = socket.socket(fileno=fds[0])
            if len(fds) > 1:
                self.metrics_socket = socket.socket(fileno=fds[1])
            self._first.set_result(None)
        elif kind == MSG_ERROR and not self._first.done():
            self._first.set_exception(_refused(loads_reply(payload)))
        elif kind == MSG_CLIENT:
            (skipping,) = _SKIPPING.unpack_from(payload)
            self._adopt(socket.socket(fileno=fds[0]), payload[_SKIPPING.size:], skipping)
        elif kind == MSG_DONE:
            self.channel.close()
            self.done.set_result(None)
        else:
            for fd in fds:
                os.close(fd)

    def _on_closed(self):
        if not self._first.done():
            self._first.set_exception(HandoverRefused("the running daemon closed the connection instead of handing over"))
        elif not self.done.done():
            logger.warning("the old daemon went away before it handed over every client; those reconnect")
            self.done.set_result(None)


def _refused(error):
    """HandoverRefused for the old daemon's *error*: its own refusal, or that of a daemon without handovers."""
    if isinstance(error, HandoverRefused):
        return error
    return HandoverRefused(
        "the running daemon cannot hand over its socket (%s): it predates restarts without a gap; "
        "restart it with `dbserviced stop` and `dbserviced start`" % error
    )


def _request(path, authkey, request):
    """Connect to the daemon on *path* as a client and send it our request to hand over; the socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(REQUEST_TIMEOUT)
        sock.connect(path)
        client_handshake(sock, authkey)
        # Job id 0: the answer, should it be a refusal, then says it carries no descriptor.
        sock.sendall(encode_frame(0, MSG_HANDOVER, json.dumps(request).encode()))
    except BaseException:
        sock.close()
        raise
    return sock
