"""The README's Python examples run as written: those of "Using it from Python", in order, on a real daemon."""

import os
import re
import subprocess
import sys

import psycopg2
import psycopg2.extensions
import pytest

from conftest import start_service, write_secret

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
