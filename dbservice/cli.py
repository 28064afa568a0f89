"""dbserviced: the command line that starts, stops, reloads and questions the daemon."""

import json
import signal
import sys
import time

import click
import psycopg2

from . import __version__, daemon
from .client import connect
from . import config
from .config import ConfigError, StateDir, load_config
from .display import format_status, format_table, rows_json
from .errors import Error
from .pidfile import AlreadyRunning, running_pid, wait_for_exit

#: ``dbserviced status`` exit codes, as LSB init scripts expect them.
EXIT_NOT_RUNNING = 3
EXIT_UNKNOWN = 4

#: Seconds ``dbserviced reload`` waits for the daemon to say it has reloaded.
RELOAD_TIMEOUT = 10.0
#: Seconds ``dbserviced pause`` waits by default for the running jobs to end.
PAUSE_TIMEOUT = 60.0

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

def _setting_option(field):
    text = field.metadata["help"]
    default = config.daemon_default(field)
    if default is not None and default != ():
        text += " [default: %s]" % default
    return click.option(
        "--" + (field.metadata["flag"] or field.name).replace("_", "-"),
        field.name,
        type=config.value_type(field),
        multiple=config.is_list(field),
        metavar=field.metadata["metavar"],
        envvar="DBSERVICE_" + field.name.upper(),
        show_envvar=True,
        help=text,
    )


def setting_options(command):
    """The daemon's settings as options; each also reads its DBSERVICE_* variable."""
    for field in reversed(config.operator_settings()):
        command = _setting_option(field)(command)
    return command


state_dir_option = click.option(
    "--state-dir",
    metavar="DIR",
    envvar="DBSERVICE_HOME",
    show_envvar=True,
    help="where the daemon keeps its socket, secret, pidfile and log [default: ~/.local/state/dbservice]",
)

config_option = click.option(
    "--config",
    "config_path",
    metavar="FILE",
    envvar="DBSERVICE_CONFIG",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="a TOML file of settings, named as the options are (min_size = 4); flags and "
    "DBSERVICE_* variables win over it",
)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="dbserviced", message="%(prog)s %(version)s")
def main():
    """Run and operate dbservice, the PostgreSQL query daemon with a connection pool.

    Every setting is a flag, a DBSERVICE_* environment variable or a key of the
    --config file, which win in that order. Without a DSN the daemon runs its
    own PostgreSQL cluster, so on a fresh machine this is enough:

    \b
        dbserviced start
        dbserviced query "select %s::int * 2" 21
        dbserviced status
        dbserviced stop

    Applications find a daemon started with the default state directory with
    dbservice.connect().
    """


@main.command()
@click.option(
    "--foreground",
    is_flag=True,
    help="stay attached and log to stderr, for systemd, supervisors and containers",
)
@state_dir_option
@config_option
@setting_options
def start(foreground, state_dir, config_path, **given):
    """Start the daemon; return once it accepts jobs.

    It detaches from the terminal, holds STATE_DIR/dbserviced.pid and logs to
    STATE_DIR/dbserviced.log. It refuses to start while another daemon runs
    with the same state directory.
    """
    _start(_daemon(state_dir, given, config_path), foreground)


@main.command()
@click.option(
    "--timeout",
    type=float,
    metavar="SECONDS",
    envvar="DBSERVICE_STOP_TIMEOUT",
    show_envvar=True,
    help="how long running and queued jobs may still take [default: stop_timeout]",
)
@click.option("--force", is_flag=True, help="answer every queued and running job with an error at once")
@state_dir_option
@config_option
def stop(timeout, force, state_dir, config_path):
    """Stop the daemon, letting the jobs it has finish.

    It takes no new jobs; running and queued ones get up to --timeout seconds,
    and whatever is left then is answered with an error, so no client hangs.
    The socket and the pidfile go, and so does the embedded PostgreSQL, if
    the daemon runs one (its data stays).
    """
    state = StateDir(state_dir)
    if timeout is None:
        timeout = _config(config_path).stop_timeout
    pid = _stop(state, timeout, force)
    click.echo("dbserviced stopped (pid %d)" % pid if pid else "dbserviced is not running")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
@state_dir_option
def status(as_json, state_dir):
    """Show the daemon's pid, uptime, database, pool, queue, jobs and latency.

    Exits with 0 when the daemon runs, 3 when it does not, and 4 when it runs
    but does not answer on its socket (starting, or stuck) or cannot reach its
    database.
    """
    state = StateDir(state_dir)
    pid = running_pid(state.pidfile)
    if pid is None:
        click.echo(json.dumps({"running": False}) if as_json else "dbserviced is not running (%s)" % state.path)
        sys.exit(EXIT_NOT_RUNNING)
    try:
        with connect(socket=state.socket) as client:
            figures = client.status()
    except Error as exc:
        click.echo("dbserviced (pid %d) does not answer: %s" % (pid, exc), err=True)
        sys.exit(EXIT_UNKNOWN)
    click.echo(json.dumps(dict(figures, running=True), indent=2) if as_json else format_status(figures))
    if not figures["database_reachable"]:
        click.echo(
            "dbserviced (pid %d) cannot reach its database (%s): %s" % (pid, figures["dsn"], figures["last_error"]),
            err=True,
        )
        sys.exit(EXIT_UNKNOWN)


@main.command()
@state_dir_option
@config_option
@setting_options
def restart(state_dir, config_path, **given):
    """Start a new daemon with these settings that takes over from the running one: no job fails.

    The new daemon (new code, new settings) opens its pool, then takes the
    socket over; the old one hands it each client at a job boundary, the
    connection itself, and exits once it has none left (after
    stop_timeout at most, which ends what is left as a stop does). The
    embedded PostgreSQL, if any, passes to the new daemon without a
    restart. If the new daemon cannot start, the old one serves on and
    this exits 1 saying why. With no daemon running, it starts one.
    """
    dbd = _daemon(state_dir, given, config_path)
    old = running_pid(dbd.state.pidfile)
    if old is None:
        _start(dbd, foreground=False)
        return
    dbd.successor = True
    try:
        info = dbd.start_detached()
    except daemon.StartError as exc:
        raise click.ClickException("%s; the running daemon (pid %d) serves on" % (exc, old)) from None
    click.echo("dbserviced restarted (pid %d): it took the socket over from pid %d" % (info["pid"], old))
    if wait_for_exit(old, dbd.settings.stop_timeout + daemon.FAST_STOP_TIMEOUT):
        click.echo("  the old daemon (pid %d) handed its clients over and exited" % old)
    else:
        click.echo("warning: the old daemon (pid %d) is still running; see the log %s" % (old, dbd.state.log),
                   err=True)


@main.command()
@state_dir_option
def reload(state_dir):
    """Read the config file again and apply it while jobs keep flowing.

    Pool size and timeouts, stop_timeout, slow_ms and the log level change
    (flags and environment variables given at start still win over the
    file); the DSN needs a restart. The daemon gets SIGHUP.
    """
    state = StateDir(state_dir)
    with _client(state) as client:
        before = client.status()["reloads"]
        if daemon.signal_daemon(state, signal.SIGHUP) is None:
            raise click.ClickException("dbserviced stopped meanwhile (%s)" % state.path)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while True:
            figures = client.status()
            if figures["reloads"] > before:
                break
            if time.monotonic() > deadline:
                raise click.ClickException(
                    "dbserviced did not reload within %.0f s; see its log %s" % (RELOAD_TIMEOUT, state.log)
                )
            time.sleep(0.05)
    if figures["reload_error"]:
        raise click.ClickException("the reload failed, the settings stay: %s" % figures["reload_error"])
    click.echo(
        "dbserviced reloaded (pid %d): pool %d-%d" % (figures["pid"], figures["pool_min"], figures["pool_max"])
    )


@main.command()
@click.option(
    "--timeout", type=float, default=PAUSE_TIMEOUT, show_default=True, metavar="SECONDS",
    help="how long to wait for the jobs running and the transactions open to end",
)
@state_dir_option
def pause(timeout, state_dir):
    """Hold new jobs and close every connection to the database, for its restart or failover.

    As PgBouncer's PAUSE: jobs running, and transactions open, go on to
    their end, and their connections close; new jobs wait, each up to its
    own timeout (pool_timeout without one), until `dbserviced resume`. The
    LISTEN connection of subscribers closes too; new subscriptions are
    answered, and at resume every subscriber gets a NotificationsLost
    marker. With replicas, only the primary is paused. Exits 0 once no
    connection is open, and 1 if some still are after --timeout: the daemon
    then stays paused, waiting for them.
    """
    state = StateDir(state_dir)
    with _client(state) as client:
        try:
            figures = client.pause(timeout)
        except Error as exc:
            raise click.ClickException(str(exc)) from None
    if figures["pause"] != "paused":
        raise click.ClickException(
            "dbserviced is pausing, but after %g s %d connections are still open (%d transactions): "
            "the database is still in use. It goes on waiting; `dbserviced status` shows when it is "
            "paused, and `dbserviced resume` gives up" % (timeout, figures["connections_open"], figures["transactions_open"])
        )
    click.echo(
        "dbserviced paused: no connection to the database is open (the pool's and LISTEN's closed); "
        "new jobs wait until `dbserviced resume` (%d waiting)" % figures["held"]
    )


@main.command()
@state_dir_option
def resume(state_dir):
    """Release the jobs a pause held: connections open again, by the DSN anew."""
    state = StateDir(state_dir)
    with _client(state) as client:
        figures = client.resume()
    if figures["pause"] is None:
        click.echo("dbserviced was not paused")
    else:
        click.echo("dbserviced resumed: %d jobs that waited go on" % figures["held"])


@main.command()
@click.argument("sql")
@click.argument("params", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help='print {"columns": [...], "rows": [[...], ...]}')
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, metavar="SECONDS", help="how long the job may take"
)
@state_dir_option
def query(sql, params, as_json, timeout, state_dir):
    """Run one SQL statement through the daemon and print its rows.

    Each PARAM fills one %s of the SQL, as text: cast it where the type
    matters (dbserviced query 'select %s::int + 1' 41). The statement is its own transaction.
    """
    state = StateDir(state_dir)
    try:
        with _client(state, timeout) as client:
            columns, rows = client.fetchtable(sql, list(params) or None)
    except psycopg2.Error as exc:
        raise click.ClickException((exc.pgerror or str(exc)).strip()) from None
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(rows_json(columns, rows) if as_json else format_table(columns, rows))


def _config(config_path):
    try:
        return load_config({}, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _daemon(state_dir, given, config_path):
    try:
        return daemon.Daemon(StateDir(state_dir), given, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _start(dbd, foreground):
    state = dbd.state
    pid = running_pid(state.pidfile)
    if pid is not None:
        raise click.ClickException(str(AlreadyRunning(state.pidfile, pid)))
    try:
        dbd.prepare()
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    if foreground:
        sys.exit(dbd.run())
    try:
        pid = dbd.start_detached()["pid"]
    except daemon.StartError as exc:
        raise click.ClickException(str(exc)) from None
    with _client(state) as client:
        figures = client.status()  # the proof that the socket answers
    click.echo("dbserviced started (pid %d)" % pid)
    click.echo("  socket    %s" % state.socket)
    click.echo("  database  %s" % figures["dsn"])
    click.echo("  log       %s" % state.log)
    if not figures["database_reachable"]:
        click.echo(
            "warning: the database is not reachable yet (%s); the daemon keeps trying" % figures["last_error"],
            err=True,
        )


def _stop(state, timeout, force):
    try:
        return daemon.stop(state, timeout, force)
    except daemon.StopError as exc:
        raise click.ClickException(str(exc)) from None


def _client(state, timeout=None):
    if running_pid(state.pidfile) is None:
        raise click.ClickException(
            "dbserviced is not running with the state directory %s; start it with `dbserviced start`" % state.path
        )
    try:
        return connect(socket=state.socket, timeout=timeout)
    except Error as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main(prog_name="dbserviced")
