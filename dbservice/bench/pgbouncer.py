"""PgBouncer for the bench: on loopback, transaction mode, its own config in a temporary directory."""

import collections
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg2
import psycopg2.extensions

from ..embedded import SERVER_USER
from .results import NotMeasured

#: Seconds PgBouncer has to accept its first client.
START_TIMEOUT = 10.0

CONFIG = """\
[databases]
bench = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
logfile = {log}
auth_type = any
pool_mode = transaction
default_pool_size = {pool_size}
max_db_connections = {pool_size}
max_client_conn = {max_clients}
log_connections = 0
log_disconnections = 0
"""


def binary():
    """The pgbouncer executable, or None.

    Debian installs it in /usr/sbin, which is on root's PATH only.
    """
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def skip_reason():
    """Why PgBouncer cannot run here, or None."""
    if binary() is None:
        return "no pgbouncer binary on PATH (Debian: apt-get install pgbouncer)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return "pgbouncer refuses to run as root and there is no %r OS user to run it as" % SERVER_USER
    return None


#: A PgBouncer started by :func:`running`: the DSN its clients use, and its process id.
Running = collections.namedtuple("Running", "dsn pid")


@contextlib.contextmanager
def running(dsn, pool_size, max_clients):
    """Run PgBouncer in front of *dsn* with *pool_size* server connections; yield it (a Running).

    Its clients log in under any name: PgBouncer logs in to PostgreSQL with
    the user (and password) of *dsn*.
    """
    with tempfile.TemporaryDirectory(prefix="dbservice-bench-") as directory:
        port = _free_port()
        config = os.path.join(directory, "pgbouncer.ini")
        log = os.path.join(directory, "pgbouncer.log")
        with open(config, "w") as f:
            f.write(
                CONFIG.format(
                    target=_target(dsn),
                    port=port,
                    log=log,
                    pool_size=pool_size,
                    max_clients=max_clients + 100,
                )
            )
        command = [binary(), config]
        if os.geteuid() == 0:  # pgbouncer refuses root; it drops to this user itself
            command[1:1] = ["-u", SERVER_USER]
            _give_to(SERVER_USER, directory, config)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client_dsn = "host=127.0.0.1 port=%d dbname=bench user=bench" % port
            _wait_ready(process, client_dsn, log)
            yield Running(client_dsn, process.pid)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _target(dsn):
    """The [databases] line: where PgBouncer connects, from the libpq *dsn*."""
    params = psycopg2.extensions.parse_dsn(dsn)
    keys = ("host", "port", "dbname", "user", "password")
    return " ".join("%s=%s" % (key, params[key]) for key in keys if key in params)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _give_to(user, *paths):
    entry = pwd.getpwnam(user)
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _wait_ready(process, client_dsn, log):
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise NotMeasured("pgbouncer exited at start (code %d): %s" % (process.returncode, _tail(log)))
        try:
            _check(client_dsn)
            return
        except psycopg2.Error as exc:
            if time.monotonic() > deadline:
                raise NotMeasured(
                    "pgbouncer did not accept a client within %.0f s: %s" % (START_TIMEOUT, exc)
                )
        time.sleep(0.05)


def _check(client_dsn):
    """One query through PgBouncer: it listens, and it reaches PostgreSQL."""
    conn = psycopg2.connect(client_dsn, connect_timeout=2)
    try:
        conn.cursor().execute("select 1")
    finally:
        conn.close()


def _tail(path):
    try:
        with open(path, errors="replace") as f:
            lines = f.read().strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"
