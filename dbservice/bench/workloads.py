"""The workloads: which statements the client threads run, in what mix, from how many threads.

Every statement reads or writes ``bench_accounts`` (``bench/accounts.sql``) and
returns one row. Its parameters are drawn at random per query; the pgbench
strategy draws them with the same ranges through ``\\set``.
"""

import dataclasses
from typing import Optional, Tuple

#: Latencies are kept apart by kind, so a mix can tell its fast queries from its slow ones.
FAST = "fast"
SLOW = "slow"


@dataclasses.dataclass(frozen=True)
class Query:
    """One statement; *params* name its random parameters in placeholder order."""

    kind: str
    sql: str
    params: Tuple[str, ...] = ()
    weight: int = 1


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every strategy runs in one cell of the comparison."""

    name: str
    description: str
    queries: Tuple[Query, ...]
    #: client threads; None runs the plan's --clients
    clients: Optional[int] = None
    #: the strategies that run it; None means all of them
    strategies: Optional[Tuple[str, ...]] = None

    @property
    def mixed(self):
        """True when the workload runs fast and slow statements side by side."""
        return len({query.kind for query in self.queries}) > 1

    def runs(self, strategy_name):
        return self.strategies is None or strategy_name in self.strategies

    def draw(self, rng, rows):
        """A random statement of this workload and its parameters: ``(query, values)``."""
        if len(self.queries) == 1:
            query = self.queries[0]
        else:
            query = rng.choices(self.queries, [q.weight for q in self.queries])[0]
        return query, tuple(rng.randint(*param_range(name, rows)) for name in query.params)


def param_range(name, rows):
    """The inclusive range a parameter is drawn from, for a table of *rows* accounts."""
    if name == "id":
        return 1, rows
    if name == "amount":
        return 1, 100
    raise ValueError("unknown bench parameter %r" % name)


POINT_READ = Query(FAST, "select id, balance, owner from bench_accounts where id = %s", ("id",))
WRITE = Query(
    FAST, "update bench_accounts set balance = balance + %s where id = %s returning balance", ("amount", "id")
)
SLEEP = Query(SLOW, "select pg_sleep(0.05)")

WORKLOADS = (
    Workload("point-read", "point read by primary key", (POINT_READ,)),
    Workload("write", "short write: UPDATE ... RETURNING", (WRITE,)),
    Workload(
        "slow-mix",
        "point reads, 5% of queries slow (pg_sleep(0.05))",
        (dataclasses.replace(POINT_READ, weight=95), dataclasses.replace(SLEEP, weight=5)),
    ),
    Workload("many-clients", "point reads from 256 client threads", (POINT_READ,), clients=256),
    # The latency floor: one client, the service (on either intake) against one
    # plain connection, and PgBouncer for what the same two extra hops cost a
    # proxy in C; the layers over each (DB-API, SQLAlchemy) for what they add to it.
    Workload(
        "single-client",
        "point reads from one client thread",
        (POINT_READ,),
        clients=1,
        strategies=(
            "threadpool", "pgbouncer", "dbservice", "dbservice-unprepared", "mp-queue-pipe",
            "dbservice-dbapi", "dbservice-sqlalchemy", "pgbouncer-sqlalchemy",
        ),
    ),
)
