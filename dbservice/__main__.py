"""python -m dbservice SQL [PARAM ...]: one query through the service, on a throwaway PostgreSQL.

It starts a temporary PostgreSQL cluster, the dbservice engine on a Unix
socket in a temporary directory, runs the query through a client, prints the
rows and tears everything down: a smoke test of the whole path.
"""

import sys
import tempfile

from .embedded import Cluster
from .service import DBService


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    sql, params = argv[0], argv[1:] or None
    with Cluster.temporary() as postgresql, tempfile.TemporaryDirectory() as directory:
        with DBService(postgresql.dsn(), socket=directory + "/dbservice.sock") as svc:
            with svc.client(timeout=30) as client:
                columns, rows = client.fetchtable(sql, params)
    print("\t".join(columns))
    for row in rows:
        print("\t".join("NULL" if v is None else str(v) for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
