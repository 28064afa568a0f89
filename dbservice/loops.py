"""The event loop the engine runs on: uvloop where it is installed, else epoll or select from the standard library."""

import asyncio
import selectors

SELECTORS = {
    "epoll": getattr(selectors, "EpollSelector", None),
    "select": selectors.SelectSelector,
}


def resolve(selector: str = "auto") -> str:
    """The loop *selector* names: "auto" is uvloop if it is installed, else epoll where there is one, else select.

    uvloop (libuv; ``pip install 'dbservice[uvloop]'``) costs the daemon 29%
    less CPU per job than the standard loop on epoll (docs/benchmarks.md);
    the standard loop needs nothing beyond Python.
    """
    if selector != "auto":
        return selector
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "epoll" if SELECTORS["epoll"] else "select"
    return "uvloop"


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
