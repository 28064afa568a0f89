"""The README's Python examples run as written: those of "Using it from Python", in order, on a real daemon."""

import json
import os
import re
import shlex
import subprocess
import sys

import psycopg2
import psycopg2.extensions
import pytest

from conftest import start_service, write_secret
from daemons import dbserviced, ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Using it from Python"


def python_examples():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n%s\n" % SECTION)
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


@pytest.fixture
def app_dsn(dsn):
    """The database the examples name, "app", empty."""
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    admin.cursor().execute("drop database if exists app")
    admin.cursor().execute("create database app")
    yield psycopg2.extensions.make_dsn(dsn, dbname="app")
    admin.cursor().execute("drop database app with (force)")
    admin.close()


def test_the_examples_run_as_written_in_order(app_dsn, socket_path):
    examples = python_examples()
    assert len(examples) >= 8
    service = write_secret(start_service(app_dsn, socket_path, max_size=4))
    server = psycopg2.extensions.parse_dsn(app_dsn)
    # The default daemon is found through $DBSERVICE_SOCKET; "dbname=app" through libpq's variables.
    env = dict(os.environ, DBSERVICE_SOCKET=service.socket, PGHOST=server["host"], PGPORT=str(server["port"]),
               PGUSER=server["user"])
    try:
        done = subprocess.run([sys.executable, "-c", "\n".join(examples)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    finally:
        service.stop()
    assert done.returncode == 0, done.stdout
    assert "From pandas" in done.stdout and "(1, 'Hello')" in done.stdout


def shell_lines(section):
    """The command lines of the ```sh blocks of the README's *section* (a ### heading), comments cut."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n%s\n" % section)
    end = text.index("\n#", start + 1)
    blocks = re.findall(r"```sh\n(.*?)```", text[start:end], re.S)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]


def test_the_operators_restart_pause_and_resume_run_as_written(dsn, daemon_dir):
    """The database's own restart between pause and resume is test_pause's; here, dbserviced's lines."""
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn))
    lines = shell_lines("### Restarts and upgrades that fail no job") + shell_lines(
        "### Pausing for a database restart or failover"
    )
    commands = [line for line in lines if line[0] == "dbserviced"]
    assert [line[1] for line in commands] == ["restart", "pause", "resume"]
    outputs = [ok(dbserviced(daemon_dir, *line[1:])) for line in commands]
    assert "took the socket over" in outputs[0] and "paused" in outputs[1]
    assert json.loads(ok(dbserviced(daemon_dir, "status", "--json")))["pool_max"] == 30
