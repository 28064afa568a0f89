"""The header of a run: when, on what machine, with which versions."""

import datetime
import os
import platform
import shutil
import subprocess

import psycopg2

from . import pgbouncer


def describe_machine(dsn):
    """Date, cores, CPU model, memory, and the versions of everything the figures depend on."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        # Other work on the machine moves every figure: say how busy it was before we began.
        "load_average": round(os.getloadavg()[0], 2),
        "os": platform.platform(),
        "python": platform.python_version(),
        "psycopg2": psycopg2.__version__.split()[0],
        "postgresql": _server_version(dsn),
        "pgbouncer": _tool_version(pgbouncer.binary()),
        "pgbench": _tool_version(shutil.which("pgbench")),
    }


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _server_version(dsn):
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute("show server_version")
            return cursor.fetchone()[0]
    finally:
        conn.close()


def _tool_version(path):
    """The first line of ``TOOL --version``, or None when the tool is absent."""
    if path is None:
        return None
    result = subprocess.run([path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = result.stdout.strip().splitlines()
    return lines[0] if lines else None
