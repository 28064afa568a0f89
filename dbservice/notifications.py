"""What a subscriber gets: a notification, or word that some were lost; and which channel names the daemon takes."""

import collections
from typing import List, NamedTuple

from .errors import JobRefused

#: PostgreSQL's longest name, in bytes (NAMEDATALEN - 1); the server would cut a longer one short.
MAX_CHANNEL_BYTES = 63
#: Channels one client connection may listen to at once, over all its subscriptions.
MAX_CHANNELS = 1024


class Notification(NamedTuple):
    """A NOTIFY on a channel listened to: its *payload* ('' if none), the *pid* of the backend that sent it."""

    channel: str
    payload: str
    pid: int


# (Its field "count" would shadow tuple.count in a typing.NamedTuple, which
# type checkers refuse; a collections.namedtuple may.)
class NotificationsLost(collections.namedtuple("NotificationsLost", "reason count")):
    """A marker among the notifications: some before it may be missing, so read again what they tell of.

    *reason* says why: the subscriber read too slowly, or the daemon, or the
    database, restarted; *count* is how many were dropped, or None when
    nobody can know (they were sent while nobody listened). Every
    notification after it is heard.
    """

    __slots__ = ()


def check_channels(channels: object) -> List[str]:
    """*channels* as a list of names, or JobRefused saying what is wrong with them.

    A channel is named exactly as ``pg_notify()`` names it: case and all.
    """
    if not isinstance(channels, (list, tuple)) or not channels:
        raise JobRefused("listen() needs the names of one or more channels")
    if len(channels) > MAX_CHANNELS:
        raise JobRefused("a client may listen to at most %d channels" % MAX_CHANNELS)
    for channel in channels:
        if not isinstance(channel, str) or not channel:
            raise JobRefused("a channel's name must be a non-empty string, not %r" % (channel,))
        if len(channel.encode("utf-8", "replace")) > MAX_CHANNEL_BYTES or "\x00" in channel:
            raise JobRefused(
                "the channel name %r is longer than PostgreSQL's names (%d bytes)" % (channel, MAX_CHANNEL_BYTES)
            )
    return list(channels)
