"""A PostgreSQL server of our own: the daemon's embedded cluster, and throwaway ones.

:class:`Cluster` runs initdb once and then ``postgres`` as a direct child.
The daemon keeps its cluster in a directory across restarts, listening only
on a Unix socket in that 0700 directory, fsync on. :meth:`Cluster.temporary`
makes a throwaway one in a temporary directory, on a free TCP port of
127.0.0.1 and fsync off, for ``python -m dbservice``, the bench and the
tests; stopping it deletes it.

When we run as root (CI, containers, development machines), initdb and
postgres refuse to run, so both are started as the unprivileged ``postgres``
OS user through ``setpriv``. setpriv drops privileges and then *execs* the
server, so the server is our direct child and the stop signal reaches the
postmaster itself (``su``/``runuser`` would fork and swallow it).
"""

import glob
import hashlib
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time

import psycopg2

from .pidfile import wait_for_exit

logger = logging.getLogger("dbservice.embedded")

#: The OS user the server runs as when we are root.
SERVER_USER = "postgres"
#: Where the daemon keeps its embedded clusters when we are root.
ROOT_CLUSTERS_DIR = "/var/lib/dbservice"
#: Seconds a server has to start accepting connections, or to stop.
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: Seconds an orphaned postmaster gets to stop before we give up on the start.
ORPHAN_STOP_TIMEOUT = 30.0


class Cluster:
    """A PostgreSQL cluster in *base_dir*, created there by initdb if it holds none, and started.

    *port* None listens on no TCP port, only on the Unix socket in
    ``base_dir/tmp``; a port number listens on 127.0.0.1 too. *server_settings*
    are ``postgres -c`` options (``max_connections=306``). The cluster's DSN
    (:meth:`dsn`) names *dbname*, created if missing. With *adopt*, a server
    already running on the cluster (that of a daemon handing over to us) is
    used as it is, and stopped by our :meth:`stop`; one is started only if
    none runs.
    """

    def __init__(self, base_dir, port=None, dbname="postgres", fsync=True, temporary=False, adopt=False,
                 **server_settings):
        self.base_dir = os.path.abspath(base_dir)
        self.port = port
        self.dbname = dbname
        self.fsync = fsync
        self.temporary = temporary
        self.server_settings = server_settings
        self._drop = _privilege_drop()
        self._bin = _server_binaries()
        self.process = None
        self.adopted_pid = running_postmaster(self.data_dir) if adopt else None
        if self.adopted_pid is not None:
            return
        if self._drop and not temporary:
            _check_reachable(self.base_dir, SERVER_USER)
        try:
            self._initdb()
            self.start()
        except BaseException:
            self._remove()
            raise

    @classmethod
    def temporary(cls, **server_settings):
        """A throwaway cluster with a ``test`` database, on a free port of 127.0.0.1, fsync off."""
        return cls(tempfile.mkdtemp(prefix="dbservice-pg-"), port=_free_port(), dbname="test", fsync=False,
                   temporary=True, **server_settings)

    def standby(self, base_dir=None, adopt=False):
        """A streaming standby of this cluster, made by ``pg_basebackup -R`` in *base_dir*, and started.

        It listens as this cluster does (a Unix socket in its own directory,
        and a free TCP port if this cluster has one) and serves reads
        (``hot_standby``). Without *base_dir* it is a temporary one, in a
        temporary directory. PostgreSQL's defaults (``wal_level=replica``,
        ``max_wal_senders=10``, local replication trusted by initdb) are what
        the primary needs. With *adopt*, a standby already running there (that
        of a daemon handing over to us) is used as it is, as by :class:`Cluster`.
        """
        temporary = base_dir is None
        base_dir = tempfile.mkdtemp(prefix="dbservice-standby-") if temporary else base_dir
        return Standby(self, base_dir, port=_free_port() if self.port else None, dbname=self.dbname,
                       fsync=self.fsync, temporary=temporary, adopt=adopt, hot_standby="on", **self.server_settings)

    # -- lifecycle -------------------------------------------------------------

    def start(self):
        """Start the server (again, after :meth:`shut_down`); return once it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        stop_orphaned_postmaster(self.data_dir)
        with open(os.path.join(self.base_dir, "postgresql.log"), "ab") as log:
            self.process = subprocess.Popen(self._drop + self._server_command(), stdout=log, stderr=log)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError("PostgreSQL did not start:\n%s" % self._log_tail())
            if time.monotonic() > deadline:
                self.shut_down()
                raise RuntimeError("PostgreSQL did not accept connections within %.0f s:\n%s"
                                   % (BOOT_TIMEOUT, self._log_tail()))
            time.sleep(0.05)
        self._create_database()

    def shut_down(self):
        """Stop the server (fast shutdown: what was in flight rolls back); its data stays."""
        if self.adopted_pid is not None:
            _stop_postmaster(self.adopted_pid, STOP_TIMEOUT)
            self.adopted_pid = None
            return
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("PostgreSQL (pid %d) did not stop within %.0f s; killing it", self.process.pid, STOP_TIMEOUT)
            self.process.kill()
            self.process.wait()

    def stop(self):
        """Stop the server; a temporary cluster is deleted with its data."""
        self.shut_down()
        self._remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    # -- what clients need -----------------------------------------------------

    @property
    def data_dir(self):
        return os.path.join(self.base_dir, "data")

    @property
    def socket_dir(self):
        return os.path.join(self.base_dir, "tmp")

    @property
    def server_pid(self):
        if self.adopted_pid is not None:
            return self.adopted_pid
        return None if self.process is None else self.process.pid

    def dsn(self, **overrides):
        """The libpq connection string of the cluster's database."""
        params = {"host": "127.0.0.1" if self.port else self.socket_dir, "port": self.port or 5432,
                  "user": "postgres", "dbname": self.dbname}
        params.update(overrides)
        return " ".join("%s=%s" % item for item in sorted(params.items()))

    # -- the parts -------------------------------------------------------------

    def _initdb(self):
        if os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            return
        self._make_directories()
        command = [self._bin("initdb"), "-D", self.data_dir, "-U", "postgres", "-A", "trust",
                   "--lc-messages=C", "--no-sync"]
        result = subprocess.run(self._drop + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if result.returncode != 0:
            raise RuntimeError("initdb failed: %s" % result.stderr.decode(errors="replace").strip())

    def _make_directories(self):
        for directory in (self.base_dir, self.socket_dir):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        if self._drop:
            _chown_tree(self.base_dir, SERVER_USER)

    def _server_command(self):
        command = [self._bin("postgres"), "-D", self.data_dir, "-k", self.socket_dir, "-p", str(self.port or 5432),
                   "-c", "listen_addresses=%s" % ("127.0.0.1" if self.port else ""), "-c", "logging_collector=off"]
        if not self.fsync:
            command.append("-F")
        for name, value in sorted(self.server_settings.items()):
            command += ["-c", "%s=%s" % (name, value)]
        return command

    def _accepts(self):
        try:
            psycopg2.connect(self.dsn(dbname="postgres"), connect_timeout=5).close()
        except psycopg2.OperationalError:
            return False
        return True

    def _create_database(self):
        if self.dbname == "postgres":
            return
        conn = psycopg2.connect(self.dsn(dbname="postgres"))
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("select 1 from pg_database where datname = %s", [self.dbname])
                if cursor.fetchone() is None:
                    cursor.execute('create database "%s"' % self.dbname.replace('"', '""'))
        finally:
            conn.close()

    def _log_tail(self, lines=20):
        try:
            with open(os.path.join(self.base_dir, "postgresql.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def _remove(self):
        if self.temporary:
            shutil.rmtree(self.base_dir, ignore_errors=True)


class Standby(Cluster):
    """A streaming standby of *primary*: its data directory is a base backup instead of initdb's."""

    def __init__(self, primary, base_dir, **options):
        self.primary = primary
        super().__init__(base_dir, **options)

    def _initdb(self):
        if os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            return
        self._make_directories()
        command = [self._bin("pg_basebackup"), "-D", self.data_dir, "-R", "-X", "stream", "--checkpoint=fast", "--no-sync",
                   "-d", self.primary.dsn(dbname="postgres")]
        result = subprocess.run(self._drop + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if result.returncode != 0:
            raise RuntimeError("pg_basebackup failed: %s" % result.stderr.decode(errors="replace").strip())

    def _create_database(self):
        pass  # a standby has the primary's databases, and cannot create any

    def streaming(self):
        """True once the standby receives the primary's WAL as it is written."""
        conn = psycopg2.connect(self.dsn(dbname="postgres"), connect_timeout=5)
        try:
            with conn.cursor() as cursor:
                cursor.execute("select status from pg_stat_wal_receiver")
                row = cursor.fetchone()
        finally:
            conn.close()
        return row is not None and row[0] == "streaming"


def default_cluster_dir(state_dir):
    """Where the daemon of *state_dir* keeps its embedded cluster.

    In the state directory, unless we are root: the server then runs as
    SERVER_USER, who cannot enter root's state directory (it is 0700, as the
    socket's directory must be, and so is /root). The cluster then lives in
    ROOT_CLUSTERS_DIR, named after the state directory's path.
    """
    if os.geteuid() != 0:
        return os.path.join(state_dir, "postgresql")
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:12]
    return os.path.join(ROOT_CLUSTERS_DIR, "postgresql-" + digest)


def stop_orphaned_postmaster(data_dir):
    """Stop a postmaster still running on *data_dir* after its owner was killed.

    A daemon killed with SIGKILL cannot stop its cluster, and the next start
    would fail on the cluster's lock. The cluster belongs to one state
    directory, whose pidfile lets only one daemon run: a postmaster still
    serving it is that dead daemon's, so it is stopped (fast shutdown: it
    rolls back what was in flight) before ours starts.
    """
    pid = running_postmaster(data_dir)
    if pid is None:
        return  # none, or a stale lock file PostgreSQL clears itself
    logger.warning("stopping PostgreSQL (pid %d), left running on %s by a daemon that was killed", pid, data_dir)
    if not _stop_postmaster(pid, ORPHAN_STOP_TIMEOUT):
        raise RuntimeError(
            "PostgreSQL (pid %d) left running on %s did not stop within %.0f s; stop it "
            "(`kill -INT %d`) and start again" % (pid, data_dir, ORPHAN_STOP_TIMEOUT, pid)
        )


def running_postmaster(data_dir):
    """The pid of the postmaster serving *data_dir*, or None if none does."""
    pid = _postmaster_pid(data_dir)
    return pid if pid is not None and _serves(pid, data_dir) else None


def _stop_postmaster(pid, timeout):
    """Fast shutdown of a postmaster that is not our child; True if it ended within *timeout*."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return True
    return wait_for_exit(pid, timeout)


def _server_binaries():
    """A function from a program's name (initdb, postgres) to its path, or RuntimeError saying what to install."""
    # Resolved, since a symlink in /usr/local/bin may stand for a directory holding pg_basebackup too.
    found = (shutil.which("postgres"), shutil.which("initdb"))
    directories = [os.path.dirname(os.path.realpath(path)) for path in found if path]
    directories += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    directories += ["/usr/local/pgsql/bin", "/usr/pgsql/bin"]
    for directory in directories:
        if os.access(os.path.join(directory, "postgres"), os.X_OK) and os.access(os.path.join(directory, "initdb"), os.X_OK):
            return lambda name: os.path.join(directory, name)
    raise RuntimeError(
        "cannot find PostgreSQL's server programs (postgres, initdb); install them (Debian: apt-get install "
        "postgresql), or give the daemon a --dsn"
    )


def _version(path):
    try:
        return int(path.split("/")[-2])
    except ValueError:
        return 0


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _privilege_drop():
    """The command prefix that runs a program as SERVER_USER, or [] if not root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise RuntimeError(
            "running as root, and PostgreSQL refuses to run as root: create an OS user "
            "%r (Debian's postgresql package does) or run as another user" % SERVER_USER
        ) from None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("running as root needs setpriv (util-linux) to start PostgreSQL as %r" % SERVER_USER)
    return [setpriv, "--reuid=" + SERVER_USER, "--regid=" + SERVER_USER, "--init-groups"]


def _chown_tree(path, user):
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _postmaster_pid(data_dir):
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            return int(f.readline())
    except (FileNotFoundError, ValueError):
        return None


def _serves(pid, data_dir):
    """True if process *pid* is a live postgres with *data_dir* on its command line."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
        with open("/proc/%d/stat" % pid, "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != b"Z" and os.fsencode(data_dir) in argv


def _check_reachable(path, user):
    """Raise, saying what to do, unless *user* may enter every directory above *path*."""
    entry = pwd.getpwnam(user)
    groups = set(os.getgrouplist(user, entry.pw_gid))
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # not there yet: we create it below
        parent = os.path.dirname(parent)
    while True:
        st = os.stat(parent)
        if st.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise RuntimeError(
                "PostgreSQL runs as the %r user, who cannot enter %s (mode %04o), so it cannot reach "
                "the cluster in %s: choose a directory it can reach with --cluster-dir (as root the "
                "default is under %s)" % (user, parent, stat.S_IMODE(st.st_mode), path, ROOT_CLUSTERS_DIR)
            )
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)
