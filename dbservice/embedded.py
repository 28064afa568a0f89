"""A throwaway PostgreSQL for tests, the benchmark and the daemon's default.

It is testing.postgresql with one change: when we run as root (CI, containers,
development machines), initdb and postgres refuse to run, so both are started
as the unprivileged ``postgres`` OS user through ``setpriv``. setpriv drops
privileges and then *execs* the server, so the server is our direct child and
the stop signal reaches the postmaster itself (``su``/``runuser`` would fork
and swallow it).
"""

import os
import pwd
import shutil
import subprocess

import testing.postgresql

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
