"""The Prometheus endpoint: ``--metrics HOST:PORT`` serves the daemon's figures at ``/metrics``.

Nothing is counted for it: the collector reads, at scrape time, the very
figures ``dbserviced status`` shows (the engine's job counters, the pool's
statistics, the socket intake's counts), so there is one source of truth and
the path of a job pays nothing for the endpoint. The names follow
Prometheus' conventions and the PgBouncer exporter's: a ``dbservice_``
prefix, base units, ``_total`` counters and ``_seconds`` histograms.

The endpoint is served on the engine's own event loop, not on a thread of
its own as ``prometheus_client.start_http_server`` would: a scrape then reads
the pool's sets and counters between two of the loop's steps, never while
the loop changes them. The exposition format is ``prometheus_client``'s,
the text format or OpenMetrics as the scraper asks.
"""

import asyncio
import logging

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder

from .config import parse_address
from .stats import OUTCOMES

logger = logging.getLogger("dbservice.metrics")

#: Bytes a scrape's request (its line and headers) may take; seconds it may take to arrive.
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0


class DaemonCollector:
    """The daemon's figures as metric families, read from *engine* and *intake* (the socket's, or None)."""

    def __init__(self, engine, intake=None):
        self.engine = engine
        self.intake = intake

    def collect(self):
        engine = self.engine
        pools = engine.pools_status()  # the primary's first
        yield _gauge("database_reachable", "1 if the primary's pool can reach its database, 0 if not",
                     pools[0]["database_reachable"])
        yield _gauge("paused", "1 while paused (dbserviced pause): new jobs wait, connections close", engine.maintenance.state is not None)
        yield from _pool_figures(engine.pools, pools)
        yield _gauge("jobs_running", "jobs on a connection", engine.running)
        yield _gauge("transactions_open", "transactions that hold a connection between their jobs",
                     len(engine.transactions))
        jobs = CounterMetricFamily("dbservice_jobs", "jobs answered, by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            jobs.add_metric([outcome], engine.stats.outcomes[outcome])
        yield jobs
        yield HistogramMetricFamily(
            "dbservice_job_duration_seconds",
            "seconds from a job's arrival to its reply, its wait for a connection included",
            buckets=_buckets(engine.stats.durations), sum_value=engine.stats.durations.sum,
        )
        yield _counter("reloads", "reloads asked (SIGHUP), whether or not they succeeded", engine.reloads)
        yield _gauge("last_reload_successful", "0 if the last reload failed and the settings stayed",
                     engine.reload_error is None)
        if engine.router is not None:
            yield from _hosts(engine.router.hosts, engine.status()["hosts"])
        if self.intake is not None:
            yield from self._clients(self.intake)

    def _clients(self, intake):
        yield _gauge("client_connections", "client connections to the socket", intake.clients)
        yield _counter("client_connections_accepted", "client connections accepted on the socket",
                       intake.clients_accepted)
        yield _counter("client_connections_refused", "client connections refused: max_clients were connected",
                       intake.clients_refused)
        yield _counter("received_bytes", "bytes received from clients on the socket", intake.bytes_received)
        yield _counter("sent_bytes", "bytes of replies sent to clients on the socket", intake.bytes_sent)
        yield _gauge("copies_running", "COPY jobs running (max_copies at most)", intake.copy_slots.running)
        listening = intake.engine.listener.status()
        yield _gauge("subscriptions", "listen() subscriptions of the socket's clients", listening["subscriptions"])
        yield _gauge("channels_listened", "channels the daemon's listening connection LISTENs to",
                     listening["channels_listened"])
        yield _counter("notifications_delivered", "notifications sent to subscribers",
                       listening["notifications_delivered"])
        yield _counter("notifications_dropped", "notifications dropped for subscribers that read too slowly",
                       listening["notifications_dropped"])


def _pool_figures(pools, figures):
    """The families of each pool's figures (*figures*: its status entry), labelled by its name and role."""
    connections = GaugeMetricFamily("dbservice_pool_connections", "open connections to the database, by state",
                                    labels=_POOL + ["state"])
    gauges = [(key, GaugeMetricFamily("dbservice_" + name, documentation, labels=_POOL))
              for name, key, documentation in _POOL_GAUGES]
    counters = [(key, CounterMetricFamily("dbservice_" + name, documentation, labels=_POOL))
                for name, key, documentation in _POOL_COUNTERS]
    waits = HistogramMetricFamily("dbservice_pool_wait_seconds", "seconds a job waited for a connection: 0 for "
                                  "one lent a connection at once", labels=_POOL)
    for pool, figure in zip(pools, figures):
        labels = [figure["name"], figure["role"]]
        connections.add_metric(labels + ["idle"], figure["pool_available"])
        connections.add_metric(labels + ["busy"], figure["pool_size"] - figure["pool_available"])
        for key, family in gauges + counters:
            family.add_metric(labels, figure[key])
        waits.add_metric(labels, _buckets(pool.waits, zeros=pool.requests_immediate), pool.waits.sum)
    yield connections
    for _, family in gauges + counters:
        yield family
    yield waits


def _hosts(hosts, figures):
    """With replicas: each host's figures, labelled by its pool's name and its role."""
    families = {
        "healthy": GaugeMetricFamily("dbservice_host_healthy", "1 while the host answers its polls", labels=_HOST),
        "lag_s": GaugeMetricFamily("dbservice_host_lag_seconds", "how far a replica's replay is behind the "
                                   "primary (NaN until it has caught up once)", labels=_HOST),
        "jobs_in_flight": GaugeMetricFamily("dbservice_host_jobs_in_flight", "jobs routed to the host, not yet "
                                            "answered", labels=_HOST),
        "jobs_done": CounterMetricFamily("dbservice_host_jobs", "jobs the host answered", labels=_HOST),
        "jobs_rerun": CounterMetricFamily("dbservice_host_jobs_rerun", "jobs a replica refused or lost, run again "
                                          "on the primary", labels=_HOST),
    }
    for host, figure in zip(hosts, figures):
        labels = [host.pool.name, figure["role"]]
        for key, family in families.items():
            value = figure[key]
            family.add_metric(labels, float("nan") if value is None else float(value))
    yield from families.values()


#: The labels of a pool's figures: its name ("pool" for the primary's, "replica1"...) and its host's role.
_POOL = ["pool", "role"]

#: The labels of a host's figures: its pool's name and its role.
_HOST = ["host", "role"]

#: A pool's gauges: (metric name, status key, help).
_POOL_GAUGES = (
    ("pool_min_connections", "pool_min", "connections the pool keeps open (min_size)"),
    ("pool_max_connections", "pool_max", "connections the pool opens at most (max_size)"),
    ("jobs_waiting", "requests_waiting", "jobs waiting for a connection of the pool"),
    ("prepared_statements", "statements_prepared", "statements prepared on the pool's connections (max_prepared each)"),
)

#: A pool's counters: (metric name, status key, help).
_POOL_COUNTERS = (
    ("pool_connections_opened", "connections_num", "connections opened to the database"),
    ("pool_connection_errors", "connections_errors", "attempts to connect to the database that failed"),
    ("pool_reconnects", "reconnects", "connections opened after attempts that failed: the database came back"),
    ("pool_connections_lost", "connections_lost", "connections the server or the network closed"),
    ("pool_connections_expired", "connections_expired", "connections closed at the end of their max_lifetime"),
    ("pool_sessions_reset", "sessions_reset", "sessions reset (DISCARD ALL) after a job that may have changed them"),
)


def _gauge(name, documentation, value):
    return GaugeMetricFamily("dbservice_" + name, documentation, value=float(value))


def _counter(name, documentation, value):
    return CounterMetricFamily("dbservice_" + name, documentation, value=value)


def _buckets(histogram, zeros=0):
    """*histogram*'s (a stats.Histogram) cumulative buckets; *zeros* more observations of 0 fall in every one."""
    return [(_bound(bound), count + zeros) for bound, count in histogram.buckets()]


def _bound(bound):
    return "+Inf" if bound == float("inf") else repr(bound)


def registry_for(engine, intake=None):
    """A registry of the daemon's figures, and the process's own (CPU, memory, descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(engine, intake))
    ProcessCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """An HTTP server on the running event loop that answers ``GET /metrics`` from *registry*."""

    def __init__(self, registry, address):
        self.registry = registry
        self.address = address  # HOST:PORT as configured
        self._server = None

    @property
    def bound(self):
        """HOST:PORT the endpoint listens on (the port the system chose, if it was 0)."""
        host, port = self._server.sockets[0].getsockname()[:2]
        return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)

    @property
    def socket(self):
        """The listening socket (handed to a daemon that takes over)."""
        return self._server.sockets[0]

    async def start(self, sock=None):
        """Listen on the configured address, or on *sock*, a listening socket handed over to us."""
        if sock is None:
            host, port = parse_address(self.address)
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST)
        else:
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST)
        logger.info("serving metrics on http://%s/metrics", self.bound)

    def close(self):
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader, writer):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, content_type, body = self._answer(head)
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (status.encode(), content_type.encode(), len(body))
            )
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass  # a scraper that went away, or sent what is no request: nothing to answer
        finally:
            writer.close()

    def _answer(self, head):
        """(status, content type, body) for the request whose line and headers are *head*."""
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        if path not in ("/metrics", "/"):
            return "404 Not Found", "text/plain", b"the metrics are at /metrics\n"
        headers = dict(_header(line) for line in lines[1:] if ":" in line)
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return "200 OK", content_type, encoder(self.registry)


def _header(line):
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()
