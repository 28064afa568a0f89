"""LISTEN from the client's side: subscriptions that yield notifications as they arrive, and survive a daemon restart.

``Client.listen(*channels)`` opens a :class:`Subscription` on a socket of its
own, so that a thread's jobs and its notifications never wait for each
other; ``AsyncClient.listen(...)`` an :class:`AsyncSubscription` on the
client's connection. Either is subscribed when it is made (or awaited): a
NOTIFY committed after that is heard. Iterating yields
:class:`~dbservice.notifications.Notification` objects and, where some may be
missing, a :class:`~dbservice.notifications.NotificationsLost` marker (the
daemon's: see listener.py). When the connection to the daemon is lost (the
daemon restarted), a subscription connects and subscribes again, retrying
with backoff, and then yields a marker of its own: notifications sent while
it was away were not kept for it.

*timeout* bounds each wait for the next notification: when it passes, the
iteration ends, and the subscription stays open, so iterating again goes on
with whatever came meanwhile. Closing it (or leaving its ``with`` block, or
dropping it) ends it on the daemon.
"""

import asyncio
import collections
import os
import pickle
import time
import weakref
from typing import Any, Deque, Generator, Iterable, Optional, Sequence, Tuple, Union

from .channel import Channel
from .errors import Error, ServiceUnavailable
from .health import Backoff
from .notifications import Notification, NotificationsLost, check_channels
from .queries import ChannelLost
from .wire import MSG_ERROR, MSG_LISTEN, MSG_NOTIFICATION, MSG_NOTIFICATIONS_LOST, MSG_RESULT, MSG_UNLISTEN

#: What a subscription yields.
Item = Union[Notification, NotificationsLost]

_DAEMON_LOST = (
    "the connection to the dbservice daemon was lost (%s): notifications sent before this subscription "
    "was made again were not kept for it"
)


def _item(kind: int, payload: bytes) -> Optional[Item]:
    """What a subscription yields for a frame of the daemon's, or None if it is none of its."""
    if kind == MSG_NOTIFICATION:
        return Notification(*pickle.loads(payload))
    if kind == MSG_NOTIFICATIONS_LOST:
        return NotificationsLost(*pickle.loads(payload))
    return None


def _answer(kind: int, payload: bytes) -> None:
    """The daemon's answer to a MSG_LISTEN: nothing, or its error raised."""
    if kind == MSG_ERROR:
        raise pickle.loads(payload)
    if kind != MSG_RESULT:
        raise Error("the dbservice daemon answered a subscription with a frame of kind %d" % kind)


_live_subscriptions: "weakref.WeakSet[Subscription]" = weakref.WeakSet()


class Subscription:
    """What :meth:`dbservice.Client.listen` returns: notifications on *channels*, on a socket of its own.

    Iterate over it, or call :meth:`receive`; close it when done. Fork-safe:
    a process forked from the one that subscribed subscribes again on its
    own socket, with a marker, on its first receive().
    """

    def __init__(
        self, socket: str, authkey: bytes, connect_timeout: float, channels: Iterable[str],
        timeout: Optional[float] = None,
    ) -> None:
        self.channels = tuple(check_channels(list(channels)))
        self.timeout = timeout
        self.closed = False
        self._address = (socket, authkey, connect_timeout)
        self._channel: Optional[Channel] = None
        self._pending: Deque[Item] = collections.deque()  # what arrived while it waited for an answer
        self._subscribe()
        _live_subscriptions.add(self)

    def __repr__(self) -> str:
        return "<dbservice.Subscription %s%s>" % (", ".join(self.channels), " closed" if self.closed else "")

    def __iter__(self) -> "Subscription":
        return self

    def __next__(self) -> Item:
        item = self.receive(self.timeout)
        if item is None:
            raise StopIteration
        return item

    def receive(self, timeout: Optional[float] = None) -> Optional[Item]:
        """The next Notification (or NotificationsLost marker), or None after *timeout* seconds (0: only if here)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.closed:
                raise Error("this subscription is closed")
            if self._pending:
                return self._pending.popleft()
            if self._channel is None:
                if not self._subscribe_again(deadline):
                    return None
                continue
            try:
                frame = self._channel.receive(_left(deadline))
            except ChannelLost as lost:
                self._channel = None
                self._why = lost.error
                continue
            if frame is None:
                return None
            item = _item(frame[1], frame[2])
            if item is not None:
                return item
            if frame[0] == 0 and frame[1] == MSG_ERROR:  # the daemon dropped us, saying why
                self._hang_up(pickle.loads(frame[2]))

    def fileno(self) -> int:
        """The socket's descriptor, readable when a notification arrives (a new one after the daemon restarted)."""
        if self._channel is None and not self._subscribe_again(time.monotonic()):
            raise ServiceUnavailable("this subscription has lost the dbservice daemon: %s" % self._why)
        assert self._channel is not None and self._channel.sock is not None  # subscribed: on a socket
        return self._channel.sock.fileno()

    def close(self) -> None:
        """End the subscription: the daemon forgets it once its socket closes."""
        self.closed = True
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    _why: object = None  # what the daemon's connection was lost to

    def _hang_up(self, why: object) -> None:
        assert self._channel is not None
        self._channel.close()
        self._channel = None
        self._why = why

    def add(self, *channels: str) -> None:
        """Listen to *channels* too, from when this returns on."""
        new = [channel for channel in check_channels(list(channels)) if channel not in self.channels]
        if not new:
            return
        if self.closed:
            raise Error("this subscription is closed")
        if self._channel is not None:
            try:
                self._request(self._channel, new)
            except ChannelLost as lost:
                self._channel, self._why = None, lost.error
        self.channels += tuple(new)
        if self._channel is None and not self._subscribe_again(time.monotonic() + self._address[2]):
            raise ServiceUnavailable("this subscription has lost the dbservice daemon: %s" % self._why)

    def _subscribe(self) -> None:
        """Connect and subscribe: ServiceUnavailable, AuthenticationError or the daemon's refusal if it cannot."""
        socket, authkey, connect_timeout = self._address
        channel = Channel(socket, authkey, connect_timeout)
        try:
            self._request(channel, self.channels)
        except ChannelLost as lost:
            channel.close()
            raise lost.error from None
        except BaseException:
            channel.close()
            raise
        self._channel = channel

    def _request(self, channel: Channel, channels: Sequence[str]) -> None:
        """Subscribe to *channels* on *channel* and wait for the daemon's answer, keeping what comes meanwhile."""
        job_id = channel.send(MSG_LISTEN, pickle.dumps(list(channels)))
        deadline = time.monotonic() + self._address[2]
        while True:
            frame = channel.receive(_left(deadline))
            if frame is None:
                raise ServiceUnavailable("the dbservice daemon did not answer a subscription within %.1f s"
                                         % self._address[2])
            if frame[0] == job_id:
                _answer(frame[1], frame[2])
                return
            item = _item(frame[1], frame[2])
            if item is not None:
                self._pending.append(item)

    def _subscribe_again(self, deadline: Optional[float]) -> bool:
        """Subscribe on a new connection, trying again with backoff until *deadline*; True once it did.

        Its marker then waits to be received, first.
        """
        backoff = Backoff()
        while True:
            try:
                self._subscribe()
            except ServiceUnavailable:
                delay = backoff.next_delay()
                if deadline is not None and time.monotonic() + delay > deadline:
                    return False
                time.sleep(delay)
                continue
            self._pending.append(NotificationsLost(_DAEMON_LOST % self._why, None))
            return True


def _forget_parents_sockets() -> None:
    for subscription in list(_live_subscriptions):
        if subscription._channel is not None:
            subscription._hang_up("the process forked: the parent's subscription stays the parent's")


os.register_at_fork(after_in_child=_forget_parents_sockets)


def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class AsyncSubscription:
    """What :meth:`dbservice.AsyncClient.listen` returns: ``async for`` over it, or ``await`` it to subscribe first.

    It travels on the client's connection; a client-side buffer of
    :attr:`MAX_BUFFERED` bytes holds what the app has not read yet, past which
    notifications are dropped and a NotificationsLost marker says how many.
    """

    #: Bytes of notifications kept for an app that reads more slowly than they come.
    MAX_BUFFERED = 1024 * 1024

    def __init__(self, client: Any, channels: Iterable[str], timeout: Optional[float] = None) -> None:
        self.channels = tuple(check_channels(list(channels)))
        self.timeout = timeout
        self.closed = False
        self._client = client
        self._started = False  # subscribed once: from then on a lost connection is subscribed again
        self._connection: Any = None  # the connection it is subscribed on (an async_client._Connection)
        self._job_id: Optional[int] = None
        self._answered: "Optional[asyncio.Future[None]]" = None  # until the daemon answered the subscription
        self._items: Deque[Tuple[Item, int]] = collections.deque()  # each with its size
        self._buffered = 0
        self._dropped = 0
        self._arrived: "Optional[asyncio.Future[None]]" = None  # the future receive() waits on
        self._why: Optional[BaseException] = None  # once the connection is lost: why

    def __repr__(self) -> str:
        return "<dbservice.AsyncSubscription %s%s>" % (", ".join(self.channels), " closed" if self.closed else "")

    def __await__(self) -> Generator[Any, None, "AsyncSubscription"]:
        return self._subscribed().__await__()

    async def _subscribed(self) -> "AsyncSubscription":
        if not self._started:
            await self._subscribe()
            self._started = True
        return self

    def __aiter__(self) -> "AsyncSubscription":
        return self

    async def __anext__(self) -> Item:
        item = await self.receive(self.timeout)
        if item is None:
            raise StopAsyncIteration
        return item

    async def __aenter__(self) -> "AsyncSubscription":
        return await self._subscribed()

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()

    async def receive(self, timeout: Optional[float] = None) -> Optional[Item]:
        """The next Notification (or NotificationsLost marker), or None after *timeout* seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        await self._subscribed()
        while True:
            if self.closed:
                raise Error("this subscription is closed")
            if self._items:
                return self._take()
            if self._dropped:
                return self._dropped_marker()
            if self._why is not None:
                why = self._why
                if not await self._subscribe_again(deadline):
                    return None
                return NotificationsLost(_DAEMON_LOST % why, None)
            self._arrived = loop.create_future()
            try:
                await asyncio.wait_for(self._arrived, None if deadline is None else max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            finally:
                self._arrived = None

    def close(self) -> None:
        """End the subscription on the daemon."""
        self.closed = True
        connection = self._connection
        if connection is not None:
            connection.close_stream(self._job_id)
            if connection.lost is None and not connection.transport.is_closing():
                connection.write_nowait(self._job_id, MSG_UNLISTEN, b"")
        self._connection = None
        self._wake()

    # -- what the connection hands it (async_client.py's streams) ------------------

    def frame(self, kind: int, payload: bytes) -> None:
        item = _item(kind, payload)
        if item is None:
            if self._answered is not None and not self._answered.done():
                try:
                    _answer(kind, payload)
                except Exception as exc:
                    self._answered.set_exception(exc)
                else:
                    self._answered.set_result(None)
            return
        size = len(payload)
        if self._buffered + size > self.MAX_BUFFERED:
            self._dropped += 1
            return
        if self._dropped:  # what it lost comes before what came after
            self._items.append((self._dropped_marker(), 0))
        self._items.append((item, size))
        self._buffered += size
        self._wake()

    def lost(self, error: BaseException) -> None:
        self._why = error
        if self._answered is not None and not self._answered.done():
            self._answered.set_exception(error)
        self._wake()

    def _dropped_marker(self) -> NotificationsLost:
        lost = NotificationsLost(
            "%d notifications were dropped: this application read them more slowly than they came "
            "(more than %d bytes waited for it)" % (self._dropped, self.MAX_BUFFERED), self._dropped
        )
        self._dropped = 0
        return lost

    def _take(self) -> Item:
        item, size = self._items.popleft()
        self._buffered -= size
        return item

    def _wake(self) -> None:
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    async def _subscribe(self) -> None:
        """Subscribe on the client's connection and wait for the daemon's answer."""
        client = self._client
        if client.closed:
            raise Error("this dbservice client is closed")
        await client.connect()
        connection = client.connection
        self._answered = asyncio.get_running_loop().create_future()
        job_id = connection.open_stream(self)
        try:
            await connection.write(job_id, MSG_LISTEN, pickle.dumps(list(self.channels)))
            await asyncio.wait_for(asyncio.shield(self._answered), client.connect_timeout)
        except asyncio.TimeoutError:
            connection.close_stream(job_id)
            raise ServiceUnavailable("the dbservice daemon did not answer a subscription within %.1f s"
                                     % client.connect_timeout) from None
        except BaseException:
            connection.close_stream(job_id)
            raise
        finally:
            self._answered = None
        self._connection, self._job_id, self._why = connection, job_id, None

    async def _subscribe_again(self, deadline: Optional[float]) -> bool:
        """Subscribe again after the connection was lost, with backoff until *deadline*; True once subscribed."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        self._connection = None
        while True:
            try:
                await self._subscribe()
                return True
            except ServiceUnavailable:
                delay = backoff.next_delay()
                if deadline is not None and loop.time() + delay > deadline:
                    return False
                await asyncio.sleep(delay)
