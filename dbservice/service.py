"""Running the engine: in this process (:func:`serve`) or in a child (:class:`DBService`)."""

import asyncio
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple, TypeVar, Union, cast

from . import types
from .client import Client, connect
from .config import Settings
from .health import mask_dsn
from .errors import ServiceUnavailable
from .queue_client import QueueClient
from .queue_intake import QueueIntake
from .queue_wire import JobQueue
from .engine import Engine
from .handover import Handover, Predecessor, Successor
from .socket_intake import SocketIntake
from .loops import new_event_loop

if TYPE_CHECKING:  # prometheus_client, imported only with --metrics
    from .metrics import MetricsEndpoint

logger = logging.getLogger("dbservice")

_DBService = TypeVar("_DBService", bound="DBService")


#: How the log names each way the engine stops.
STOPS = {
    "stop": "graceful",
    "fast stop": "fast",
    "handed over": "handed over to a new daemon",
    "handed over late": "handed over to a new daemon; what is left ends as in a fast stop",
}

#: What each signal asks of the engine.
SIGNALS = {
    signal.SIGTERM: "stop",  # graceful: queued and running jobs finish
    signal.SIGINT: "fast stop",  # what is queued or running is answered with an error now
    signal.SIGHUP: "reload",
    signal.SIGUSR1: "reopen log",
}


def serve(
    settings: Settings, queue: Optional[JobQueue] = None, ready: Optional[Connection] = None,
    reload: Optional[Callable[[], Settings]] = None, reopen_log: Optional[Callable[[], None]] = None,
    handover: Optional[Handover] = None,
) -> None:
    """Run the engine in this process until SIGTERM (graceful) or SIGINT (fast), or until handed over.

    Jobs come from the Unix socket ``settings.socket`` and/or *queue*, the
    service's end of a :class:`~dbservice.queue_wire.JobQueue`.
    *ready*, a multiprocessing connection, is sent ``("ready", info)`` once
    jobs are accepted, or ``("error", message)`` if the engine cannot start.
    On SIGHUP, ``reload()`` returns new Settings to apply; on SIGUSR1,
    ``reopen_log()`` reopens the log file. A SIGINT during a graceful stop
    makes it a fast one. With a :class:`~dbservice.handover.Handover`, the
    socket can be handed over to a new daemon, or, as its successor, taken
    over from the daemon running.
    """
    loop = new_event_loop(settings.selector)
    try:
        loop.run_until_complete(_run(settings, queue, ready, reload, reopen_log, handover))
    finally:
        loop.close()


async def _run(
    settings: Settings, queue: Optional[JobQueue], ready: Optional[Connection],
    reload: Optional[Callable[[], Settings]], reopen_log: Optional[Callable[[], None]],
    handover: Optional[Handover],
) -> None:
    loop = asyncio.get_running_loop()
    types.install_adapters()
    engine = Engine(settings)
    asked: "asyncio.Queue[str]" = asyncio.Queue()

    # Handlers only set an event and queue what was asked; the loop does the work.
    def on_signal(what: str) -> None:
        if what == "fast stop":
            engine.hurry()  # also cuts short a graceful stop already under way
        asked.put_nowait(what)

    for signum, what in SIGNALS.items():
        loop.add_signal_handler(signum, on_signal, what)

    socket_intake = queue_intake = metrics = successor = None
    try:
        await engine.start()
        if handover is not None and handover.successor:
            successor = await Successor.ask(settings.socket, settings.authkey, {
                "pid": os.getpid(), "adopts_cluster": handover.adopts_cluster, "adopts_standbys": handover.adopts_standbys,
            })
        if settings.socket:
            socket_intake = SocketIntake(engine, settings.socket, settings.authkey)
        # The metrics port first: a successor that cannot listen there must
        # fail before it accepts a client it would then drop.
        if settings.metrics:
            metrics = await _serve_metrics(engine, socket_intake, settings.metrics, successor)
        elif successor is not None and successor.metrics_socket is not None:
            successor.metrics_socket.close()  # the old daemon's port, which we do not serve: free once it exits
        if socket_intake is not None:
            await socket_intake.start(sock=successor and successor.listener)
        if queue is not None:
            queue_intake = QueueIntake(engine, queue)
            queue_intake.start()
        if handover is not None and successor is not None and socket_intake is not None:
            _take_over(handover, successor, socket_intake)
        if handover is not None and socket_intake is not None:
            socket_intake.on_handover = Predecessor(handover, engine, socket_intake, metrics, asked.put_nowait).begin
    except Exception as exc:
        if successor is not None:
            successor.channel.close()  # the running daemon serves on
        if ready is not None:
            ready.send(("error", "%s: %s" % (type(exc).__name__, exc)))
        await engine.stop(force=True)
        raise
    # What exists now (modules, the pool, the settings) lives as long as the
    # daemon: frozen, the cyclic collector stops traversing it again and
    # again as jobs come and go, which cost the daemon 1-3 us per job.
    gc.freeze()
    logger.info(
        "dbservice serving (pid %d, pool %d-%d, database %s)",
        os.getpid(), settings.min_size, settings.max_size, mask_dsn(settings.dsn),
    )
    if ready is not None:
        took_over_from = None if successor is None else successor.info["pid"]
        ready.send(("ready", {"pid": os.getpid(), "socket": settings.socket, "took_over_from": took_over_from}))
        ready.close()

    what = await _serve_signals(asked, engine, reload, reopen_log)
    logger.info("dbservice stopping (%s)", STOPS.get(what, what))
    if socket_intake is not None:
        await socket_intake.stop_listening()
    if metrics is not None:
        metrics.close()
    await engine.stop(force=what in ("fast stop", "handed over late"))
    if socket_intake is not None:
        await socket_intake.close()
    if queue_intake is not None:
        await queue_intake.close()
    logger.info("dbservice stopped")


async def _serve_metrics(
    engine: Engine, socket_intake: Optional[SocketIntake], address: str, successor: Optional[Successor],
) -> "MetricsEndpoint":
    """Serve the Prometheus endpoint at *address*; status tells where it listens.

    Taking over from a daemon that served the same address, on its socket.
    """
    from .metrics import MetricsEndpoint, registry_for  # prometheus_client: only if asked for

    endpoint = MetricsEndpoint(registry_for(engine, socket_intake), address)
    handed = None if successor is None else successor.metrics_socket
    if handed is not None and successor is not None and successor.info["metrics"] != address:
        handed.close()  # the new address is ours to listen on
        handed = None
    await endpoint.start(sock=handed)
    engine.metrics_address = endpoint.bound
    return endpoint


def _take_over(handover: Handover, successor: Successor, socket_intake: SocketIntake) -> None:
    """We serve: the pidfile is ours, the old daemon may stop, and the clients it hands over come to our socket."""
    # The pidfile first: the old daemon, stopping, removes it if it still
    # holds its own pid, and could otherwise remove ours as we write it.
    handover.pidfile.take_over()
    successor.serving(socket_intake.adopt)
    handover.took_over = True
    handover.predecessor_pid = pid = successor.info["pid"]
    logger.info("took the socket over from the daemon with pid %d", pid)
    successor.done.add_done_callback(lambda _: logger.info("the daemon with pid %d handed its clients over", pid))


async def _serve_signals(
    asked: "asyncio.Queue[str]", engine: Engine, reload: Optional[Callable[[], Settings]],
    reopen_log: Optional[Callable[[], None]],
) -> str:
    """Reload and reopen the log as asked, until a stop is asked; return which stop."""
    while True:
        what = await asked.get()
        if what == "reload":
            _reload(engine, reload)
        elif what == "reopen log":
            _reopen_log(reopen_log)
        else:
            return what


def _reload(engine: Engine, reload: Optional[Callable[[], Settings]]) -> None:
    if reload is None:
        logger.warning("SIGHUP: this engine has no configuration to read again; nothing changes")
        return
    try:
        settings = reload()
    except Exception as exc:
        logger.error("reload failed, the current settings stay: %s", exc)
        engine.reload_failed(exc)
    else:
        engine.reload(settings)


def _reopen_log(reopen_log: Optional[Callable[[], None]]) -> None:
    if reopen_log is None:
        logger.info("SIGUSR1: this engine logs to stderr; there is no log file to reopen")
        return
    try:
        reopen_log()
    except OSError as exc:
        logger.error("cannot reopen the log file, logging on to the old one: %s", exc)


def _child_main(settings: Settings, queue: Optional[JobQueue], ready: Connection) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(settings, queue, ready)


class DBService:
    """The dbservice engine in a child process of this one.

    With ``socket=None`` it serves intake (a): :attr:`queue` is the
    :class:`~dbservice.queue_wire.JobQueue` and :meth:`client` returns a
    :class:`~dbservice.QueueClient` that submits through it. With
    ``socket=PATH`` it serves intake (b) on that Unix socket, and :meth:`client`
    returns ``dbservice.connect(socket=PATH, authkey=svc.authkey)``.
    Other keyword arguments are :class:`~dbservice.config.Settings` fields.
    """

    def __init__(
        self, dsn: Optional[str], min_size: int = 2, max_size: int = 10, socket: Optional[str] = None,
        authkey: Optional[bytes] = None, **options: Any,
    ) -> None:
        if socket is not None and authkey is None:
            authkey = os.urandom(32).hex().encode()
        self.settings = Settings(
            dsn=dsn, min_size=min_size, max_size=max_size, socket=socket, authkey=authkey, **options
        )
        self.queue: Optional[JobQueue] = None
        self.process: Any = None  # a multiprocessing.Process, from start() on

    @property
    def authkey(self) -> Optional[bytes]:
        return self.settings.authkey

    @property
    def socket(self) -> Optional[str]:
        return self.settings.socket

    def start(self: _DBService, timeout: float = 60.0) -> _DBService:
        """Start the engine; return once it accepts jobs, or raise why it cannot."""
        ctx = multiprocessing.get_context("spawn")
        service_queue = None
        if self.settings.socket is None:
            self.queue = JobQueue.create()
            service_queue = self.queue.for_service()
        ready_in, ready_out = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_child_main, args=(self.settings, service_queue, ready_out), name="dbservice", daemon=True
        )
        self.process.start()
        ready_out.close()
        if self.queue is not None:
            self.queue.close_reader()
        try:
            state, info = self._wait_until_ready(ready_in, timeout)
        except BaseException:
            self._remove_queue()
            raise
        finally:
            ready_in.close()
        if state != "ready":
            self.process.join(5)
            self._remove_queue()
            raise ServiceUnavailable("dbservice could not start: %s" % info)
        return self

    def _wait_until_ready(self, ready_in: Connection, timeout: float) -> Tuple[str, Any]:
        if not multiprocessing.connection.wait([ready_in], timeout):
            self._kill()
            raise ServiceUnavailable("dbservice did not start within %.0f s" % timeout)
        try:
            return cast(Tuple[str, Any], ready_in.recv())
        except EOFError:
            self.process.join(5)
            raise ServiceUnavailable("dbservice exited during start (exit code %s)" % self.process.exitcode) from None

    def client(self, timeout: Optional[float] = None) -> Union[QueueClient, Client]:
        """A client of this service, for this process or one forked from it."""
        if self.settings.socket is None:
            return QueueClient(
                self.queue,  # type: ignore[arg-type]  # start() made it
                self.process.sentinel, timeout=timeout, max_frame=self.settings.max_frame,
            )
        return connect(socket=self.settings.socket, authkey=self.settings.authkey, timeout=timeout)

    def stop(self, force: bool = False, timeout: Optional[float] = None) -> None:
        """Stop the engine: gracefully (queued and running jobs finish), or at once with *force*."""
        if self.process is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGINT if force else signal.SIGTERM)
            limit = (self.settings.stop_timeout if timeout is None else timeout) + 10.0
            self.process.join(limit)
            if self.process.is_alive():
                logger.warning("dbservice did not stop within %.0f s; killing it", limit)
                self._kill()
        self._remove_queue()

    def _remove_queue(self) -> None:
        if self.queue is not None:
            self.queue.remove_directory()

    def _kill(self) -> None:
        self.process.kill()
        self.process.join()

    def __enter__(self: _DBService) -> _DBService:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
