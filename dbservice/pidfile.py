"""The daemon's pidfile: one daemon per state directory, and how to find it.

The running daemon holds an exclusive ``flock`` on its pidfile for as long as
it lives; the kernel drops the lock when the process dies, however it dies. So
a locked pidfile means a live daemon, and an unlocked one was left by a daemon
that died and may be replaced, even if some other process has reused its pid.
"""

import fcntl
import os
import select
import tempfile


class AlreadyRunning(Exception):
    """Another daemon holds the pidfile."""

    def __init__(self, path, pid):
        super().__init__(
            "dbserviced is already running with this state directory (pid %s, pidfile %s); "
            "stop it with `dbserviced stop` or choose another --state-dir" % (pid or "unknown", path)
        )
        self.pid = pid


class Pidfile:
    """The pidfile at *path*, written and locked by :meth:`acquire`."""

    def __init__(self, path):
        self.path = path
        self.pid = None
        self._fd = None

    def acquire(self):
        """Write our pid, locked, atomically; raise AlreadyRunning if a live daemon holds it."""
        old = self._lock_current()
        try:
            fd = self._write_locked()
        finally:
            os.close(old)
        self._fd = fd
        self.pid = os.getpid()

    def take_over(self):
        """Write our pid, locked, atomically, over the pidfile of the daemon that hands over to us.

        That daemon's lock stays on the file we replace; its release finds
        another pid in the path and leaves it. Also how a daemon takes its
        pidfile back from a successor that died.
        """
        fd = self._write_locked()
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.pid = os.getpid()

    def _write_locked(self):
        """Our pid in a locked temporary file renamed into place: readers see the old content or the new."""
        fd, tmp = tempfile.mkstemp(prefix=".pid-", dir=os.path.dirname(self.path))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"%d\n" % os.getpid())
            os.fsync(fd)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd

    def _lock_current(self):
        """Lock the file now at our path (creating it); return its descriptor."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = read_pid(self.path)
                if pid is not None and _alive(pid):
                    raise AlreadyRunning(self.path, pid) from None
                # A reader checking the lock holds it for an instant: wait for it.
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX)
            # Another daemon may have renamed its own pidfile over this one
            # between our open and our lock: then the lock guards nothing.
            if _same_file(fd, self.path):
                return fd
            os.close(fd)

    def release(self):
        """Remove the pidfile if it still holds our pid, and drop the lock."""
        if self._fd is None:
            return
        try:
            if read_pid(self.path) == self.pid:
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None


def read_pid(path):
    """The pid written in *path*, or None if there is no such file or no pid in it."""
    try:
        with open(path, "rb") as f:
            pid = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid > 0 else None  # never 0 or -1: os.kill would signal a whole group


def running_pid(path):
    """The pid of the live daemon holding *path*, or None if none does."""
    pid = read_pid(path)
    if pid is None or not _alive(pid):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return pid  # locked: its daemon lives
    finally:
        os.close(fd)
    return None  # unlocked: left by a daemon that died; the pid is someone else's now


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's process
    return True


def _same_file(fd, path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def wait_for_exit(pid, timeout):
    """Wait up to *timeout* seconds for process *pid*, not our child, to end; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)
