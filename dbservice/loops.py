"""The event loop the engine runs on: epoll or select from the standard library, or uvloop."""

import asyncio
import importlib.util
import select
import selectors

SELECTORS = {
    "epoll": getattr(selectors, "EpollSelector", None),
    "select": selectors.SelectSelector,
}


def resolve(selector: str = "auto") -> str:
    """The loop *selector* names: "auto" is uvloop where it is installed, else epoll where there is one, else select.

    uvloop (libuv; ``pip install 'dbservice[uvloop]'``) costs the daemon about
    a quarter less CPU per job than epoll (docs/benchmarks.md).
    """
    if selector != "auto":
        return selector
    if importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    return "epoll" if SELECTORS["epoll"] else "select"


def unwatches_after_error(loop: asyncio.AbstractEventLoop) -> bool:
    """True if *loop* stops watching a socket after calling its reader for an error.

    uvloop does (its UVPoll's ``_fatal_error``): for an event that says both
    readable and in error, a message and a TCP reset arriving together, it
    calls the reader once and closes its watch on the socket, with no word to
    the reader. A reader that took only the message and waits for more must
    then watch the socket anew, or it waits forever.
    """
    return type(loop).__module__.startswith("uvloop")


def at_its_end(fd: int) -> bool:
    """True if the socket *fd* is in error or hung up (a TCP reset, say), leaving the error to whoever reads it.

    Asked from a reader the loop just called, it tells whether the event was
    one after which the loop may have stopped watching (:func:`unwatches_after_error`).
    """
    probe = select.poll()
    probe.register(fd, 0)  # no event asked: only POLLERR, POLLHUP and POLLNVAL are told
    return bool(probe.poll(0))


def new_event_loop(selector: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop of the kind *selector* names: "auto", "uvloop", "epoll" or "select" (see :func:`resolve`)."""
    selector = resolve(selector)
    if selector == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ValueError("selector 'uvloop' needs the uvloop package: pip install 'dbservice[uvloop]'") from None
        return uvloop.new_event_loop()
    try:
        selector_class = SELECTORS[selector]
    except KeyError:
        raise ValueError("unknown selector %r; use auto, epoll, select or uvloop" % (selector,)) from None
    if selector_class is None:
        raise ValueError("this platform has no %s; use selector='select'" % selector)
    return asyncio.SelectorEventLoop(selector_class())
