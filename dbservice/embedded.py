"""A throwaway PostgreSQL for tests and the benchmark, and the daemon's own cluster.

It is testing.postgresql with one change: when we run as root (CI, containers,
development machines), initdb and postgres refuse to run, so both are started
as the unprivileged ``postgres`` OS user through ``setpriv``. setpriv drops
privileges and then *execs* the server, so the server is our direct child and
the stop signal reaches the postmaster itself (``su``/``runuser`` would fork
and swallow it).
"""

import hashlib
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess

import psycopg2
import testing.postgresql

from .pidfile import wait_for_exit

logger = logging.getLogger("dbservice.embedded")

#: The OS user the server runs as when we are root.
SERVER_USER = "postgres"


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


class EmbeddedPostgresql(testing.postgresql.Postgresql):
    """testing.postgresql.Postgresql that also runs when we are root.

    Pass ``base_dir=`` to keep the cluster across runs (initdb happens only
    when the directory holds none); without it the cluster lives in a temporary
    directory that :meth:`stop` deletes, while :meth:`terminate` followed by
    :meth:`start` restarts it in place.
    """

    def initialize(self):
        super().initialize()
        self._drop = _privilege_drop()

    def initialize_database(self):
        data_dir = os.path.join(self.base_dir, "data")
        if os.path.exists(os.path.join(data_dir, "PG_VERSION")):
            return
        if self._drop:
            _chown_tree(self.base_dir, SERVER_USER)
        command = self._drop + [self.initdb, "-D", data_dir, "--lc-messages=C", "--no-sync"]
        command += self.settings["initdb_args"].split()
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if result.returncode != 0:
            raise RuntimeError("initdb failed: %s" % result.stderr.decode(errors="replace").strip())

    def get_server_commandline(self):
        return self._drop + super().get_server_commandline()

    def dsn_string(self, **overrides):
        """The libpq connection string of this cluster's ``test`` database."""
        params = self.dsn(**overrides)
        params["dbname"] = params.pop("database")
        return " ".join("%s=%s" % item for item in sorted(params.items()))


#: Where the daemon keeps its embedded clusters when we are root.
ROOT_CLUSTERS_DIR = "/var/lib/dbservice"


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


class EmbeddedCluster(EmbeddedPostgresql):
    """The daemon's own PostgreSQL, kept in *base_dir* across restarts.

    It listens on no TCP port, where its ``trust`` authentication would let any
    local user in as superuser, but only on a Unix socket in *base_dir*, which
    is 0700. It keeps fsync on, since its data is meant to last. Its DSN names
    the ``postgres`` database.
    """

    #: Only names the socket file: the directory is ours alone, so it is free.
    PORT = 5432

    def __init__(self, base_dir):
        super().__init__(
            base_dir=base_dir,
            port=self.PORT,
            boot_timeout=60,
            postgres_args="-c listen_addresses= -c logging_collector=off",
        )

    def initialize(self):
        self.name = "postgresql"  # the server's log: base_dir/postgresql.log
        super().initialize()
        if self._drop:
            _check_reachable(self.base_dir, SERVER_USER)
        os.makedirs(self.base_dir, mode=0o700, exist_ok=True)

    def dsn(self, **overrides):
        params = {
            "host": os.path.join(self.base_dir, "tmp"),
            "port": self.PORT,
            "user": "postgres",
            "database": "postgres",
        }
        params.update(overrides)
        return params

    def is_server_available(self):
        try:
            psycopg2.connect(self.dsn_string(), connect_timeout=5).close()
        except psycopg2.OperationalError:
            return False
        return True

    def prestart(self):
        super().prestart()
        stop_orphaned_postmaster(os.path.join(self.base_dir, "data"))

    def poststart(self):
        """Nothing to create: the ``postgres`` database is there from initdb on."""


#: Seconds an orphaned postmaster gets to stop before we give up on the start.
ORPHAN_STOP_TIMEOUT = 30.0


def stop_orphaned_postmaster(data_dir):
    """Stop a postmaster still running on *data_dir* after its daemon was killed.

    A daemon killed with SIGKILL cannot stop its cluster, and the next start
    would fail on the cluster's lock. The cluster belongs to one state
    directory, whose pidfile lets only one daemon run: a postmaster still
    serving it is that dead daemon's, so it is stopped (fast shutdown: it
    rolls back what was in flight) before ours starts.
    """
    pid = _postmaster_pid(data_dir)
    if pid is None or not _serves(pid, data_dir):
        return  # none, or a stale lock file PostgreSQL clears itself
    logger.warning("stopping PostgreSQL (pid %d), left running on %s by a daemon that was killed", pid, data_dir)
    os.kill(pid, signal.SIGINT)
    if not wait_for_exit(pid, ORPHAN_STOP_TIMEOUT):
        raise RuntimeError(
            "PostgreSQL (pid %d) left running on %s did not stop within %.0f s; stop it "
            "(`kill -INT %d`) and start again" % (pid, data_dir, ORPHAN_STOP_TIMEOUT, pid)
        )


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
