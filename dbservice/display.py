"""What the command line prints: rows as an aligned table or as JSON, and the daemon's status."""

import json
import numbers


def format_table(columns, rows):
    """*rows* under their *columns*, aligned as psql does (numbers to the right), and a count."""
    if not columns:
        return "OK (the statement returns no rows)"
    cells = [[_text(value) for value in row] for row in rows]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(columns)]
    lines = [
        " | ".join(name.center(width) for name, width in zip(columns, widths)).rstrip(),
        "-+-".join("-" * width for width in widths),
    ]
    for row, texts in zip(rows, cells):
        aligned = (
            text.rjust(width) if _is_number(value) else text.ljust(width)
            for value, text, width in zip(row, texts, widths)
        )
        lines.append(" | ".join(aligned).rstrip())
    lines.append("(%d row%s)" % (len(rows), "" if len(rows) == 1 else "s"))
    return "\n".join(lines)


def rows_json(columns, rows):
    """``{"columns": [...], "rows": [[...], ...]}``; values JSON lacks become strings."""
    return json.dumps({"columns": columns, "rows": rows}, default=_json_value)


def format_status(status):
    """The figures of ``Client.status()`` for a person to read."""
    latency = status["latency_ms"]
    connections = ", ".join(
        "#%d %s (%d jobs)" % (c["number"], "busy" if c["busy"] else "idle", c["jobs_done"]) for c in status["connections"]
    )
    lines = [
        "dbserviced is running (pid %d, up %s, on %s)"
        % (status["pid"], _duration(status["uptime_s"]), status["event_loop"]),
        "  database     %s" % status["dsn"],
        "  socket       %s (%d connected)" % (status["socket"], status["socket_clients"]),
    ]
    lines.extend("  %-12s %s" % (pool["name"], _pool(pool)) for pool in status["pools"])
    lines += [
        "  connections  %s" % (connections or "none"),
        "  queue        %d queued, %d running" % (status["queue_depth"], status["jobs_running"]),
        "  jobs         %d done, %d failed, %d timed out (of the failed: %d cancelled, %d refused, %d busy)"
        % tuple(status["jobs_" + outcome] for outcome in ("done", "failed", "timed_out", "cancelled", "refused", "busy")),
        "  latency      p50 %s, p95 %s, p99 %s (last %d jobs)"
        % (_ms(latency["p50"]), _ms(latency["p95"]), _ms(latency["p99"]), latency["window"]),
    ]
    if "subscriptions" in status:  # the socket's: LISTEN/NOTIFY and COPY need it
        lines.append(
            "  listen       %d subscriptions on %d channels, %d notifications delivered, %d dropped"
            % (status["subscriptions"], status["channels_listened"], status["notifications_delivered"],
               status["notifications_dropped"])
        )
        lines.append("  copy         %d running" % status["copies_running"])
    for host in status.get("hosts", ()):
        lines.append("  %-12s %s" % (host["role"], _host(host)))
    if status["pause"] == "paused":
        lines.append("  PAUSED       no connection is open (pool, LISTEN); %d jobs wait for `dbserviced resume`" % status["requests_waiting"])
    elif status["pause"] == "pausing":
        lines.append(
            "  PAUSING      %d connections still open (running jobs, open transactions, closing); %d jobs wait"
            % (status["connections_open"], status["requests_waiting"])
        )
    if status["metrics"]:
        lines.append("  metrics      http://%s/metrics" % status["metrics"])
    if not status["database_reachable"]:
        lines.append("  WARNING      the database is unreachable: %s" % status["last_error"])
    if status["reload_error"]:
        lines.append("  WARNING      the last reload failed: %s" % status["reload_error"])
    return "\n".join(lines)


def _pool(pool):
    """One pool (the primary's, or a replica's): its connections, its waiting jobs, whether it reaches its server."""
    line = "%d open (min %d, max %d), %d idle, %d jobs waiting for one" % (
        pool["pool_size"], pool["pool_min"], pool["pool_max"], pool["pool_available"], pool["requests_waiting"],
    )
    if pool["connections_errors"]:
        line += ", %d attempts to connect failed" % pool["connections_errors"]
    if not pool["database_reachable"]:
        line += ", UNREACHABLE: %s" % pool["last_error"]
    return line


def _host(host):
    """One host of a daemon with replicas: where it is, whether it serves, its lag and load."""
    health = "up" if host["healthy"] else "DOWN (%s)" % host["last_error"]
    lag = "" if host["role"] == "primary" else ", lag %s" % (
        "unknown" if host["lag_s"] is None else "%.3f s" % host["lag_s"]
    )
    pid = "" if host["pid"] is None else ", pid %d" % host["pid"]
    return "%s: %s%s, %d jobs in flight, %d done%s" % (
        host["dsn"], health, lag, host["jobs_in_flight"], host["jobs_done"], pid,
    )


def _text(value):
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    return str(value)


def _is_number(value):
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _json_value(value):
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)  # Decimal keeps its every digit, UUID its usual form


def _ms(value):
    return "-" if value is None else "%.1f ms" % value


def _duration(seconds):
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return "%dd %dh %dm" % (days, hours, minutes)
    if hours:
        return "%dh %dm" % (hours, minutes)
    return "%dm %ds" % (minutes, seconds)
