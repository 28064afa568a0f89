"""The libpq psycopg2 is linked with, for what psycopg2 does not expose: the cancel request, an async COPY.

A ``PGconn`` belongs to the libpq that made it, and psycopg2-binary bundles a
libpq of its own, so the functions called on ``connection.pgconn_ptr`` must be
that one's: the library psycopg2 loaded, as this process's memory map names it.
"""

import ctypes
import ctypes.util

import psycopg2._psycopg

#: psycopg2's C extension: importing it loaded the libpq it is linked with, the one _find() looks for.
EXTENSION = psycopg2._psycopg.__file__


def _find():
    """The path of the libpq psycopg2 was loaded with (psycopg2-binary bundles its own)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "libpq" in path.rsplit("/", 1)[-1]:
                return path
    return ctypes.util.find_library("pq")


PATH = _find()


def load(kind=ctypes.CDLL):
    """That libpq, as a ctypes library: a CDLL releases the GIL around each call, a PyDLL does not."""
    return kind(PATH)
