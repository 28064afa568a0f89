"""gunicorn serving an app for the tests, as real processes, and the HTTP requests the tests make of it."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import wait_until


@contextlib.contextmanager
def gunicorn(args, env, run_dir, ready_path="/"):
    """Run ``gunicorn ARGS`` on a free port; yield its base URL once *ready_path* answers 200."""
    log_path = run_dir / "gunicorn.log"
    env = dict(env, XDG_RUNTIME_DIR=str(run_dir))  # gunicorn >= 25.1 puts its control socket there
    with open(log_path, "wb") as log:
        # Port 0: the kernel picks a free port, and gunicorn's log says which.
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *args, "--bind", "127.0.0.1:0"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = wait_until(lambda: _listening_at(server, log_path), timeout=30, message="gunicorn to listen")
        wait_until(lambda: get(url + ready_path)[0] == 200, timeout=30, message="the app to answer")
        yield url
    finally:
        _stop(server)


def _listening_at(server, log_path):
    log = log_path.read_text(errors="replace")
    if server.poll() is not None:
        pytest.fail("gunicorn exited with %s:\n%s" % (server.returncode, log))
    found = re.search(r"Listening at: (http://\S+)", log)
    return found and found.group(1)


def _stop(server):
    """Stop gunicorn gracefully, then kill whatever is left of its process group."""
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def get(url):
    """GET *url*: (status, body text); an HTTP error status is returned, not raised."""
    return _request(urllib.request.Request(url))


def post(url, fields):
    """POST *fields* as JSON to *url*: (status, body text)."""
    body = json.dumps(fields).encode()
    return _request(urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST"))


def _request(request):
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (ConnectionError, urllib.error.URLError) as error:
        return None, str(error)
