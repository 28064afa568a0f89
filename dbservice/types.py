"""How values cross between Python and PostgreSQL in the daemon.

psycopg2's defaults are kept except where a value would not survive the trip
to a client unchanged: bytea comes back as ``bytes`` (not a memoryview, which
cannot be pickled) and uuid as ``uuid.UUID`` (not str). A dict parameter is
sent as json, so ``execute("insert ... values (%s)", [{"a": 1}])`` just works.
"""

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras

_BYTEA_ARRAY_OID = 1001


def _cast_bytes(value, cursor):
    if value is None:
        return None
    return bytes(psycopg2.BINARY(value, cursor))


BYTES = ext.new_type(psycopg2.BINARY.values, "BYTES", _cast_bytes)
BYTES_ARRAY = ext.new_array_type((_BYTEA_ARRAY_OID,), "BYTES[]", BYTES)


def register(pgconn):
    """Install dbservice's typecasters on one connection."""
    ext.register_type(BYTES, pgconn)
    ext.register_type(BYTES_ARRAY, pgconn)
    psycopg2.extras.register_uuid(conn_or_curs=pgconn)


def install_adapters() -> None:
    """Install the process-wide parameter adapters (called once by the daemon)."""
    ext.register_adapter(dict, psycopg2.extras.Json)
