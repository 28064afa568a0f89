"""LISTEN/NOTIFY through the daemon: one listening connection of its own, fanned out to every subscriber.

A pooled connection serves one client's job and then another's, and its
session is reset after a LISTEN: it cannot listen for anybody. So, as PgDog
does, the daemon listens itself, on one connection outside the pool (it is
not counted in ``max_size``), opened when a client first subscribes and
closed when the last one leaves, and driven by the same
:class:`~dbservice.connection.PooledConnection` as the pool's. It LISTENs to
the union of the channels its subscribers want, and psycopg2 hands each
notification, as it reads one, to the :class:`Listener`, which sends it to
every subscription of its channel. A subscription belongs to one client
connection (a socket) and ends with it; listening pins no pooled connection.

What a subscriber is promised:

- from the reply to its subscription on, every notification on its channels
  is sent to it once, in the order the server sent them; a NOTIFY inside a
  transaction comes when (and if) the transaction commits, as PostgreSQL has
  it;
- a subscriber that reads too slowly costs the daemon at most what any
  client may make it hold (``max_client_buffer``): once that much waits for
  it, its further notifications are dropped and counted, and when it has
  caught up it is sent a ``NotificationsLost`` marker with their number. If
  it reads nothing for ``client_stall_timeout``, it is dropped like any
  client that does not read. Nobody else waits for it;
- when the listening connection is lost (the database restarted), the
  daemon connects again with backoff and LISTENs again, then sends every
  subscriber a ``NotificationsLost`` marker: what was sent meanwhile was
  never heard. (A client that loses the daemon itself subscribes again and
  gives its caller such a marker of its own: ``subscriptions.py``.)
- ``dbserviced pause`` closes the listening connection too, and resume
  listens again as after a lost connection: every subscriber is then sent a
  ``NotificationsLost`` marker (:meth:`Listener.pause`).
"""

import asyncio
import logging

import psycopg2
from psycopg2 import sql as sqlcomp

from .connection import PooledConnection
from .errors import Error, JobRefused, ServiceUnavailable
from .health import Backoff, one_line
from .jobs import dumps_reply, loads_message
from .notifications import MAX_CHANNELS, check_channels
from .wire import MSG_LISTEN, MSG_NOTIFICATION, MSG_NOTIFICATIONS_LOST, encode_frame

logger = logging.getLogger("dbservice.listener")

_LISTENING_LOST = (
    "the daemon's connection to the database was lost (%s): notifications sent until it listened again "
    "were never received"
)
_PAUSED = (
    "the dbservice daemon was paused (dbserviced pause): notifications sent until it was resumed and "
    "listened again were never received"
)


class Listener:
    """The daemon's listening connection, and the subscriptions it serves (see the module's docstring)."""

    def __init__(self, settings):
        self.dsn = settings.dsn
        self.connect_timeout = settings.connect_timeout
        self.delivered = 0
        self.dropped = 0
        self._channels = {}  # channel -> the subscriptions that want it
        self._waiting = []  # subscriptions not answered yet: their channels are not all listened to
        self._conn = None
        self._gone = None  # the last listening connection closed: done once its server hung up (PooledConnection.close)
        self._listening = set()  # the channels LISTENed on _conn
        self._changed = asyncio.Event()
        self._task = None  # the one task that connects, LISTENs and UNLISTENs, while anybody subscribes
        self._down = None  # why connecting failed, while it fails
        self._backoff = Backoff()
        self._closed = False
        self._paused = False  # dbserviced pause: no listening connection until resume

    def client(self, protocol):
        """The subscriptions of one client connection (a socket_intake ``_ClientProtocol``)."""
        return ClientSubscriptions(self, protocol)

    def subscribe(self, subscription):
        """Start listening for *subscription*, which is answered once its channels are all listened to."""
        if self._closed:
            subscription.refuse(ServiceUnavailable("the dbservice daemon is stopping"))
            return
        if self._paused:
            self._hold(subscription)
            return
        if self._down is not None:  # as jobs do while the database is down: at once
            subscription.refuse(ServiceUnavailable("cannot listen: the database is unreachable: %s"
                                                   % one_line(self._down)))
            return
        for channel in subscription.channels:
            self._channels.setdefault(channel, set()).add(subscription)
        self._waiting.append(subscription)
        self._wake()

    def unsubscribe(self, subscription):
        for channel in subscription.channels:
            wanting = self._channels.get(channel)
            if wanting is not None:
                wanting.discard(subscription)
                if not wanting:
                    del self._channels[channel]
        if subscription in self._waiting:
            self._waiting.remove(subscription)
        self._wake()

    async def close(self):
        """Stop listening (the daemon stops); subscribers see their connections close."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._hang_up()
        if self._gone is not None:
            self._gone.cancel()  # stopping: its socket closes now, whether or not the server hung up

    def pause(self):
        """Close the listening connection and open none until :meth:`resume`; a future done once it is closed.

        Closed: the server has hung up too, its backend gone (:attr:`server_connections` is 0).

        Subscriptions are not refused meanwhile, nor left unanswered: each is
        answered at once, as if the daemon listened, and told at resume what
        it missed (:meth:`_hold`).
        """
        self._paused = True
        waiting, self._waiting = self._waiting, []
        for subscription in waiting:
            subscription.confirm()
        self._missed(_PAUSED)
        task = self._task  # while it runs, it holds the connection: cancelled, it closes it (_run)
        if task is not None:
            task.cancel()
        return asyncio.ensure_future(self._connection_gone(task))

    async def _connection_gone(self, task):
        """Once *task* (None: none ran) has ended, and the server has hung up the connection it closed."""
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        if self._gone is not None:
            await asyncio.shield(self._gone)  # a resume gives up waiting, not the close

    @property
    def server_connections(self):
        """1 while the server has a listening connection of the daemon's (open, or closed but not hung up), else 0."""
        return int(self._conn is not None or (self._gone is not None and not self._gone.done()))

    def resume(self):
        """Listen again on every channel subscribed to, as after a lost connection: each subscriber gets a marker."""
        if self._paused:
            self._paused = False
            if self._channels:
                self._wake()

    def _hold(self, subscription):
        """A subscription made while paused: answered at once, told at resume that what came meanwhile was missed.

        A client's subscribe waits for its answer only ``connect_timeout``
        (subscriptions.py), less than a pause may last, and a subscriber that
        could not subscribe would have to retry until resume; answered, it
        goes on, and the marker it gets once the daemon listens again says
        what a database restart would: notifications sent until then were
        never received, so whatever they would have said must be read anew.
        """
        for channel in subscription.channels:
            self._channels.setdefault(channel, set()).add(subscription)
        subscription.confirm()
        subscription.missed(_PAUSED)

    def status(self):
        return {
            "subscriptions": len(set().union(*self._channels.values())),
            "channels_listened": len(self._listening),
            "notifications_delivered": self.delivered,
            "notifications_dropped": self.dropped,
        }

    # -- the listening connection --------------------------------------------------

    def _wake(self):
        self._changed.set()
        if self._task is None and not self._closed and not self._paused:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self):
        """LISTEN and UNLISTEN as the subscriptions change, until nobody subscribes; connect again when lost."""
        try:
            while self._channels:
                self._changed.clear()
                try:
                    await self._listen()
                except (psycopg2.Error, Error) as exc:
                    self._failed(exc)
                    await asyncio.sleep(self._backoff.next_delay())
                    continue
                self._backoff.reset()
                self._down = None
                self._answer()
                if not self._changed.is_set():
                    await self._changed.wait()
        finally:
            self._task = None
            self._down = None  # the next subscriber tries again
            self._hang_up()
            if self._channels:  # cancelled by a pause, and resumed before it ended: listen again
                self._wake()

    async def _listen(self):
        """Connect if need be, then LISTEN to the channels wanted and UNLISTEN the others."""
        loop = asyncio.get_running_loop()
        if self._conn is None:
            conn = await PooledConnection.connect(
                self.dsn, 0, loop, self._lost, loop.time() + self.connect_timeout
            )
            conn.pgconn.notifies = _Fanout(self)  # psycopg2 appends each notification as it reads it
            self._conn, self._listening = conn, set()
            logger.info("listening connection opened")
        wanted = set(self._channels)
        await self._execute("LISTEN", wanted - self._listening)
        self._listening |= wanted
        await self._execute("UNLISTEN", self._listening - wanted)
        self._listening &= wanted

    async def _execute(self, command, channels):
        if not channels:
            return
        conn = self._conn
        names = [sqlcomp.Identifier(channel).as_string(conn.pgconn) for channel in sorted(channels)]
        cursor = conn.pgconn.cursor()
        try:
            conn.execute(cursor, "; ".join("%s %s" % (command, name) for name in names))
            await conn.wait(asyncio.get_running_loop().time() + self.connect_timeout)
        finally:
            cursor.close()

    def _answer(self):
        """Answer the subscriptions whose channels are all listened to now; tell the others what they missed."""
        waiting, self._waiting = self._waiting, []
        for subscription in waiting:
            if self._listening.issuperset(subscription.channels):
                subscription.confirm()
            else:
                self._waiting.append(subscription)
        for wanting in self._channels.values():
            for subscription in wanting:
                subscription.hearing()

    def _failed(self, exc):
        logger.warning("cannot listen on the database (%s); trying again", one_line(exc))
        self._down = exc
        self._hang_up()
        error = ServiceUnavailable("cannot listen: the database is unreachable: %s" % one_line(exc))
        waiting, self._waiting = self._waiting, []
        for subscription in waiting:
            subscription.refuse(error)  # its client's ClientSubscriptions forgets it
            self.unsubscribe(subscription)
        self._missed(_LISTENING_LOST % one_line(exc))

    def _lost(self, conn):
        """The server ended the listening connection while it was idle (a restart): listen again."""
        if conn is self._conn:
            logger.warning("the listening connection was closed by the server; listening again")
            self._hang_up()
            self._missed(_LISTENING_LOST % "closed by the server")
            self._wake()

    def _missed(self, why):
        for wanting in self._channels.values():
            for subscription in wanting:
                subscription.missed(why)

    def _hang_up(self):
        if self._conn is not None:
            self._gone = self._conn.close()
            self._conn, self._listening = None, set()

    def deliver(self, notify):
        """A notification the server sent: to every subscription of its channel."""
        wanting = self._channels.get(notify.channel)
        if not wanting:
            return  # UNLISTENed meanwhile
        body = dumps_reply((notify.channel, notify.payload, notify.pid))
        for subscription in wanting:
            sent = subscription.deliver(body)
            if sent:
                self.delivered += 1
            elif sent is not None:
                self.dropped += 1


class _Fanout:
    """What the listening connection's ``notifies`` is: psycopg2 appends to it, and the Listener delivers.

    Empty to everybody who looks, so that the connection's driver finds no
    notification to drop.
    """

    __slots__ = ("listener",)

    def __init__(self, listener):
        self.listener = listener

    def append(self, notify):
        try:
            self.listener.deliver(notify)
        except Exception:  # psycopg2 would drop the error, and the notification with it
            logger.exception("could not deliver a notification")

    def __len__(self):
        return 0


class ClientSubscriptions:
    """The subscriptions of one client connection: made by its MSG_LISTENs, ended with it."""

    def __init__(self, listener, protocol):
        self.listener = listener
        self.protocol = protocol
        self._subscriptions = {}  # job id of its MSG_LISTEN -> _Subscription

    def receive(self, job_id, kind, payload):
        """A MSG_LISTEN (subscribe) or a MSG_UNLISTEN (end that subscription)."""
        if kind != MSG_LISTEN:
            subscription = self._subscriptions.pop(job_id, None)
            if subscription is not None:
                self.listener.unsubscribe(subscription)
            return
        try:
            channels = check_channels(loads_message(payload))
            if job_id in self._subscriptions:
                raise JobRefused("subscription %d is open already on this connection" % job_id)
            if sum(len(s.channels) for s in self._subscriptions.values()) + len(channels) > MAX_CHANNELS:
                raise JobRefused("a client may listen to at most %d channels" % MAX_CHANNELS)
        except JobRefused as exc:
            self.protocol.reply(job_id, False, exc)
            return
        subscription = self._subscriptions[job_id] = _Subscription(job_id, channels, self)
        self.listener.subscribe(subscription)

    def fail(self, job_id, error):
        """Refuse with *error* subscription *job_id* if it still waits for its answer; True if it did."""
        subscription = self._subscriptions.get(job_id)
        if subscription is None or subscription.active:
            return False
        subscription.refuse(error)
        self.listener.unsubscribe(subscription)
        return True

    def __len__(self):
        return len(self._subscriptions)

    def forget(self, subscription):
        if self._subscriptions.get(subscription.id) is subscription:
            del self._subscriptions[subscription.id]

    def resumed(self):
        """Its replies drained: tell its subscriptions what they lost meanwhile."""
        for subscription in self._subscriptions.values():
            subscription.tell()

    def close(self):
        """Its connection is gone: so are its subscriptions."""
        subscriptions, self._subscriptions = self._subscriptions, {}
        for subscription in subscriptions.values():
            self.listener.unsubscribe(subscription)


class _Subscription:
    """One MSG_LISTEN's channels, for one client connection, and what it has lost."""

    __slots__ = ("id", "channels", "owner", "active", "dropped", "gap", "heard")

    def __init__(self, job_id, channels, owner):
        self.id = job_id
        self.channels = frozenset(channels)
        self.owner = owner
        self.active = False  # answered: it gets notifications
        self.dropped = 0  # notifications not sent, the client being backed up
        self.gap = None  # why some were never received
        self.heard = True  # its channels were listened to again since: it may be told of the gap

    def confirm(self):
        self.active = True
        self.owner.protocol.reply(self.id, True, None)

    def refuse(self, error):
        self.owner.forget(self)
        self.owner.protocol.reply(self.id, False, error)

    def deliver(self, body):
        """Send one notification: True, or False if it was dropped (the client is backed up), or None if not yet."""
        if not self.active:
            return None  # not answered yet: it listens from its answer on
        protocol = self.owner.protocol
        if protocol.gate.backed_up or protocol.transport.is_closing():
            self.dropped += 1
            return False
        self.heard = True  # a notification came: the server listens again
        self.tell()
        protocol.transport.write(encode_frame(self.id, MSG_NOTIFICATION, body))
        return True

    def missed(self, why):
        """The listening connection was lost: it is told once its channels are listened to again."""
        if self.active:
            self.gap, self.heard = why, False

    def hearing(self):
        """Its channels are listened to again: tell it what it missed, if anything."""
        self.heard = True
        self.tell()

    def tell(self):
        """Send the marker of what it lost, if it lost any, it may be told, and the client reads again."""
        if (self.dropped or self.gap is not None) and self.heard and not self.owner.protocol.gate.backed_up:
            self._tell_now()

    def _tell_now(self):
        reasons = []
        if self.dropped:
            reasons.append("%d notifications were dropped: this subscriber did not read them in time "
                           "(more than max_client_buffer waited for it)" % self.dropped)
        if self.gap is not None:
            reasons.append(self.gap)
        count = None if self.gap is not None else self.dropped
        self.dropped, self.gap = 0, None
        transport = self.owner.protocol.transport
        if not transport.is_closing():
            transport.write(encode_frame(self.id, MSG_NOTIFICATIONS_LOST, dumps_reply(("; ".join(reasons), count))))
