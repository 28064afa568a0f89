"""The daemon's life: detach, hold the pidfile, run the engine, stop, and signal it.

``dbserviced start`` forks twice before any event loop, thread or connection
exists, so nothing is shared across the fork: the daemon is in a session of
its own, with no terminal, its output going to the log file. It reports back
on a pipe once its socket accepts jobs, or why it could not start.
"""

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys

from .queries import read_secret
from .config import load_config
from .embedded import Cluster, default_cluster_dir
from .handover import Handover
from .pidfile import AlreadyRunning, Pidfile, running_pid, wait_for_exit
from .service import serve
from .socket_intake import check_private_file, check_socket_dir

logger = logging.getLogger("dbservice.daemon")

#: Seconds ``dbserviced start`` waits for the daemon to accept jobs (a first
#: start of the embedded cluster runs initdb).
START_TIMEOUT = 120.0
#: Seconds a fast stop may take: cancelling queries, closing connections,
#: stopping the embedded cluster.
FAST_STOP_TIMEOUT = 30.0

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class StartError(Exception):
    """The daemon did not start; the message says why."""


class StopError(Exception):
    """The daemon did not stop; the message says what to do."""


class Daemon:
    """One daemon: its state directory and its settings, with where they came from.

    *given* holds the settings from flags and the environment (None: not
    given); they win over the config file at *config_path* now and on every
    reload. A *successor* takes over from the daemon running with the same
    state directory (``dbserviced restart``, see handover.py).
    """

    def __init__(self, state, given, config_path=None, successor=False):
        self.state = state
        self.given = given
        self.config_path = os.path.abspath(config_path) if config_path else None
        self.settings = load_config(given, self.config_path)
        self.successor = successor
        self.detached = False
        self.cluster = None
        self.standbys = []  # the embedded cluster's streaming standbys (embedded_replicas)

    def prepare(self):
        """Create the state directory 0700 (refusing one others can enter) and its secret."""
        check_socket_dir(self.state.path)
        try:
            fd = os.open(self.state.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            check_private_file(self.state.secret)
            return
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")

    # -- starting ----------------------------------------------------------------

    def start_detached(self, timeout=START_TIMEOUT):
        """Start the daemon in the background; once it accepts jobs, what it says of itself (its pid...).

        Raises StartError with the daemon's own reason if it cannot start.
        """
        ready_in, ready_out = multiprocessing.Pipe(duplex=False)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ready_in.close()
                self._detach()
                code = self.run(_Ready(ready_out))
            finally:
                os._exit(code)  # never back into the command's own code
        ready_out.close()
        os.waitpid(pid, 0)  # the first child exits as soon as it forked the daemon
        with ready_in:
            if not ready_in.poll(timeout):
                raise StartError(
                    "the daemon did not accept jobs within %.0f s; see its log %s" % (timeout, self.state.log)
                )
            try:
                state, info = ready_in.recv()
            except EOFError:
                raise StartError("the daemon exited while starting; see its log %s" % self.state.log) from None
        if state != "ready":
            raise StartError(info)
        return info

    def _detach(self):
        os.setsid()  # a session of our own: no terminal, no signals from one
        if os.fork():
            os._exit(0)  # not a session leader: the daemon can never acquire a terminal
        os.chdir("/")
        self.detached = True
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        redirect_output(self.state.log)

    def run(self, ready=None):
        """Be the daemon in this process until it is stopped; return the exit code."""
        ready = ready or _Ready(None)
        configure_logging(self.settings.log_level)
        # Until the engine's loop takes the signals over there is no loop to
        # wake: SIGTERM raises, so that the finally clauses clean up.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        pidfile = Pidfile(self.state.pidfile)
        handover = Handover(pidfile, successor=self.successor)
        try:
            if not self.successor:  # a successor's comes from the daemon it takes over from
                pidfile.acquire()
            logger.info(
                "dbserviced starting (pid %d, state directory %s%s)", os.getpid(), self.state.path,
                ", to take over from the daemon running" if self.successor else "",
            )
            self._serve(ready, handover)
        except AlreadyRunning as exc:
            logger.error("%s", exc)
            ready.send(("error", str(exc)))
            return 1
        except Exception as exc:
            logger.exception("dbserviced failed")
            ready.send(("error", "%s: %s" % (type(exc).__name__, exc)))
            return 1
        finally:
            pidfile.release()
        logger.info("dbserviced stopped")
        return 0

    def _serve(self, ready, handover):
        if self.settings.dsn is None:
            self.cluster = self._start_cluster()
            handover.adopts_cluster = self.cluster.adopted_pid is not None
        try:
            for number in range(1, self.settings.embedded_replicas + 1):
                self.standbys.append(self._start_standby(number))
            handover.adopts_standbys = len(self.standbys)
            serve(
                self._settings(self.settings),
                ready=ready,
                reload=self._reload,
                reopen_log=self._reopen_log if self.detached else None,
                handover=handover,
            )
        finally:
            if self.cluster is not None and _owns_cluster(handover):
                for standby in self.standbys:
                    standby.stop()
                self.cluster.stop()
                logger.info("embedded PostgreSQL stopped")
            elif handover.cluster_adopted:  # the successor keeps its first standbys: the others are ours to stop
                for standby in self.standbys[handover.standbys_adopted:]:
                    standby.stop()

    def _start_cluster(self):
        directory = self.settings.cluster_dir or default_cluster_dir(self.state.path)
        if not os.path.exists(os.path.join(directory, "data", "PG_VERSION")):
            logger.info("creating the embedded PostgreSQL cluster in %s", directory)
        # Taking over, the server running is the old daemon's: ours from now on, not an orphan to stop.
        cluster = Cluster(directory, adopt=self.successor)
        logger.info(
            "embedded PostgreSQL %s in %s (pid %d)",
            "running" if cluster.adopted_pid is None else "adopted, running", directory, cluster.server_pid,
        )
        return cluster

    def _start_standby(self, number):
        """The embedded cluster's standby *number*, beside it: made by pg_basebackup on its first start."""
        directory = "%s-replica%d" % (self.cluster.base_dir, number)
        if not os.path.exists(os.path.join(directory, "data", "PG_VERSION")):
            logger.info("creating embedded standby %d in %s (pg_basebackup)", number, directory)
        # Taking over, as for the primary: the standby running is the old daemon's, ours from now on.
        standby = self.cluster.standby(directory, adopt=self.successor)
        logger.info("embedded standby %d %s in %s (pid %d)", number,
                    "running" if standby.adopted_pid is None else "adopted, running", directory, standby.server_pid)
        return standby

    def _settings(self, settings):
        """*settings* with what the state directory (and the embedded clusters) decide."""
        dsn = settings.dsn if settings.dsn is not None else self.cluster.dsn()
        replicas = settings.replicas + tuple(standby.dsn() for standby in self.standbys)
        embedded = [self.cluster] + self.standbys if self.cluster is not None else []
        return dataclasses.replace(
            settings, dsn=dsn, replicas=replicas, embedded_replicas=0,  # the standbys are replicas from here on
            embedded_pids={c.dsn(): c.server_pid for c in embedded},
            socket=self.state.socket, authkey=read_secret(self.state.secret),
        )

    # -- while running -------------------------------------------------------------

    def _reload(self):
        """Settings from the config file read again; flags and environment as at start still win."""
        settings = load_config(self.given, self.config_path)
        logging.getLogger().setLevel(settings.log_level)
        return self._settings(settings)

    def _reopen_log(self):
        redirect_output(self.state.log)
        logger.info("reopened the log file %s", self.state.log)


def _owns_cluster(handover):
    """Whether the daemon stops its embedded PostgreSQL as it stops: not if it passed to its successor,
    nor if it adopted the server of a daemon that, in the end, did not hand over to it."""
    if handover.cluster_adopted:
        return False
    return not (handover.adopts_cluster and not handover.took_over)


class _Ready:
    """Tells the waiting ``start`` command, once, whether the daemon serves."""

    def __init__(self, conn):
        self.conn = conn

    def send(self, message):
        if self.conn is None:
            return
        try:
            self.conn.send(message)
        except OSError:
            pass  # the command stopped waiting; the log says what happened
        self.close()

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def configure_logging(level):
    """Log to stderr, which is the log file once the daemon has detached."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def redirect_output(path):
    """Point stdout and stderr at the end of the file at *path*, opened anew."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# -- the commands that act on a running daemon -----------------------------------------


def signal_daemon(state, signum):
    """Send *signum* to the daemon of *state*; return its pid, or None if none runs."""
    pid = running_pid(state.pidfile)
    if pid is not None:
        os.kill(pid, signum)
    return pid


def stop(state, timeout, force=False):
    """Stop the daemon of *state*; return its pid, or None if none was running.

    Gracefully: running and queued jobs get up to *timeout* seconds, then the
    daemon is told to answer what is left with an error. With *force*, that
    happens at once. Raises StopError if the daemon does not end.
    """
    pid = signal_daemon(state, signal.SIGINT if force else signal.SIGTERM)
    if pid is None:
        return None
    if not force and not wait_for_exit(pid, timeout):
        try:
            os.kill(pid, signal.SIGINT)  # time is up: answer what is left with an error
        except ProcessLookupError:
            return pid
    if not wait_for_exit(pid, FAST_STOP_TIMEOUT):
        raise StopError(
            "dbserviced (pid %d) did not stop within %.0f s of a fast stop; see its log %s, "
            "and end it with `kill -KILL %d`" % (pid, FAST_STOP_TIMEOUT, state.log, pid)
        )
    return pid
