"""The event loop the engine runs on: epoll or select from the standard library, or uvloop."""

import asyncio
import selectors

SELECTORS = {
    "epoll": getattr(selectors, "EpollSelector", None),
    "select": selectors.SelectSelector,
}


def new_event_loop(selector: str = "auto") -> asyncio.AbstractEventLoop:
    """An event loop: "auto" (epoll where there is one), "epoll", "select", or "uvloop".

    uvloop (libuv; ``pip install dbservice[uvloop]``) costs the daemon less CPU
    per job; the standard loop needs nothing beyond Python.
    """
    if selector == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ValueError("selector 'uvloop' needs the uvloop package: pip install 'dbservice[uvloop]'") from None
        return uvloop.new_event_loop()
    if selector == "auto":
        selector = "epoll" if SELECTORS["epoll"] else "select"
    try:
        selector_class = SELECTORS[selector]
    except KeyError:
        raise ValueError("unknown selector %r; use auto, epoll, select or uvloop" % (selector,)) from None
    if selector_class is None:
        raise ValueError("this platform has no %s; use selector='select'" % selector)
    return asyncio.SelectorEventLoop(selector_class())
