"""dbserviced run as operators run it, as a subprocess with its own state directory: what the CLI tests share."""

import os
import signal
import subprocess
import sys

import dbservice
from dbservice.config import StateDir
from dbservice.pidfile import running_pid


def dbserviced(state_dir, *args, env=None, timeout=90):
    """Run ``dbserviced ARGS`` with *state_dir* as DBSERVICE_HOME; the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "dbservice.cli", *args],
        env=env_for(state_dir, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


def env_for(state_dir, extra=None):
    """The environment of a dbserviced run on *state_dir*: ours, without DBSERVICE_ settings, and *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBSERVICE_")}
    env["DBSERVICE_HOME"] = str(state_dir)
    env.update(extra or {})
    return env


def ok(result):
    assert result.returncode == 0, "exit %d\n%s%s" % (result.returncode, result.stdout, result.stderr)
    return result.stdout


def client_of(state_dir, timeout=60):
    return dbservice.connect(socket=StateDir(str(state_dir)).socket, timeout=timeout)


def ensure_stopped(state_dir):
    dbserviced(state_dir, "stop", "--force")
    pid = running_pid(StateDir(str(state_dir)).pidfile)
    if pid is not None:  # the test broke it: do not leave it behind
        os.kill(pid, signal.SIGKILL)
