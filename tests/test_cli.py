"""dbserviced as operators run it: the real CLI, as subprocesses, on real daemons."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg2
import pytest
from click.testing import CliRunner

import dbservice
from conftest import held_jobs, wait_until
from daemons import client_of, dbserviced, ensure_stopped, env_for, ok
from dbservice import cli
from dbservice.config import ConfigError, StateDir, load_config
from dbservice.embedded import default_cluster_dir
from dbservice.health import mask_dsn
from dbservice.pidfile import read_pid, running_pid

PASSWORD = "hunter2-not-in-logs"


# -- one daemon shared by the round-trip tests ------------------------------------


@pytest.fixture(scope="module")
def running(dsn, tmp_path_factory):
    """A daemon on the test cluster, its password-carrying DSN from a flag, a setting
    from the environment overriding the config file, and the start's output."""
    state_dir = tmp_path_factory.mktemp("r")
    config = state_dir / "dbservice.toml"
    config.write_text("min_size = 2\nmax_size = 2\nslow_ms = 150\n")
    start = dbserviced(
        state_dir,
        "start",
        "--dsn", "%s password=%s" % (dsn, PASSWORD),
        "--config", str(config),
        "--metrics", "127.0.0.1:0",
        env={"DBSERVICE_MIN_SIZE": "1"},
    )
    yield state_dir, config, ok(start)
    ensure_stopped(state_dir)


def test_start_prints_the_pid_the_socket_and_the_database(running):
    state_dir, _, output = running
    state = StateDir(str(state_dir))
    assert "dbserviced started (pid %d)" % read_pid(state.pidfile) in output
    assert state.socket in output
    assert "password=***" in output and PASSWORD not in output


def test_the_daemon_is_detached_in_a_session_of_its_own(running):
    state_dir, _, _ = running
    pid = read_pid(StateDir(str(state_dir)).pidfile)
    assert os.getsid(pid) != os.getsid(0)  # nothing our terminal sends reaches it
    assert os.getsid(pid) != pid  # not a session leader, so it can never acquire a terminal
    assert os.readlink("/proc/%d/cwd" % pid) == "/"  # it holds no directory busy


def test_status_carries_every_figure_and_never_the_password(running):
    state_dir, _, _ = running
    with client_of(state_dir) as db:
        db.fetchval("select 1")
    result = dbserviced(state_dir, "status", "--json")
    figures = json.loads(ok(result))
    assert figures["running"] is True
    assert figures["pid"] == read_pid(StateDir(str(state_dir)).pidfile)
    assert figures["uptime_s"] > 0
    assert "password=***" in figures["dsn"] and PASSWORD not in result.stdout
    assert (figures["pool_min"], figures["pool_max"]) == (1, 2)  # the environment beats the file
    assert figures["pool_size"] >= 1
    assert all("busy" in c for c in figures["connections"]) and figures["connections"]
    for name in ("queue_depth", "jobs_done", "jobs_failed", "jobs_timed_out"):
        assert isinstance(figures[name], int)
    assert figures["jobs_done"] >= 1
    assert set(figures["latency_ms"]) >= {"p50", "p95", "p99"}
    human = ok(dbserviced(state_dir, "status"))
    assert "dbserviced is running (pid %d" % figures["pid"] in human and "p99" in human


def test_metrics_are_served_where_status_says(running):
    from prometheus_client.parser import text_string_to_metric_families

    state_dir, _, _ = running
    address = json.loads(ok(dbserviced(state_dir, "status", "--json")))["metrics"]
    assert "http://%s/metrics" % address in ok(dbserviced(state_dir, "status"))
    with urllib.request.urlopen("http://%s/metrics" % address, timeout=10) as response:
        families = {family.name: family for family in text_string_to_metric_families(response.read().decode())}
    assert families["dbservice_pool_max_connections"].samples[0].value == 2


def test_status_prints_the_figures_it_gives_as_json(running, admin):
    state_dir, _, _ = running
    with client_of(state_dir) as db:
        assert [db.fetchval("select %s::int", [i]) for i in range(3)] == [0, 1, 2]
        with pytest.raises(psycopg2.errors.DivisionByZero):
            db.fetchval("select 1 / 0")
        with held_jobs(admin, db):
            figures = json.loads(ok(dbserviced(state_dir, "status", "--json")))
            human = ok(dbserviced(state_dir, "status"))
    assert figures["jobs_done"] > figures["jobs_failed"] >= 1  # so that a mix-up would show
    jobs = "%d done, %d failed, %d timed out" % (figures["jobs_done"], figures["jobs_failed"], figures["jobs_timed_out"])
    assert jobs in human
    assert "0 queued, 1 running" in human


def test_query_prints_an_aligned_table_or_json(running):
    state_dir, _, _ = running
    table = ok(dbserviced(state_dir, "query", "select %s::int * 2 as answer, %s as word", "21", "hi"))
    assert table.splitlines() == [
        "answer | word",
        "-------+-----",
        "    42 | hi",
        "(1 row)",
    ]
    rows = json.loads(ok(dbserviced(state_dir, "query", "--json", "select 1.5::numeric as n, null as z")))
    assert rows == {"columns": ["n", "z"], "rows": [["1.5", None]]}
    assert ok(dbserviced(state_dir, "query", "do $$ begin end $$")).strip() == "OK (the statement returns no rows)"


def test_query_errors_exit_1_with_the_servers_message(running):
    state_dir, _, _ = running
    result = dbserviced(state_dir, "query", "select * from no_such_table")
    assert result.returncode == 1
    assert 'relation "no_such_table" does not exist' in result.stderr


def test_connect_with_no_arguments_finds_the_daemon(running, monkeypatch):
    state_dir, _, _ = running
    monkeypatch.delenv("DBSERVICE_SOCKET", raising=False)
    monkeypatch.setenv("DBSERVICE_HOME", str(state_dir))
    with dbservice.connect(timeout=30) as db:
        assert db.fetchval("select 'found'") == "found"


def test_a_second_start_is_refused(running):
    state_dir, _, _ = running
    pid = read_pid(StateDir(str(state_dir)).pidfile)
    result = dbserviced(state_dir, "start", "--dsn", "dbname=whatever")
    assert result.returncode == 1
    assert "already running" in result.stderr and str(pid) in result.stderr
    assert read_pid(StateDir(str(state_dir)).pidfile) == pid
    ok(dbserviced(state_dir, "status"))


def test_a_second_daemon_cannot_take_the_pidfile_of_a_running_one(running):
    """What closes the race of two starts at once: the running daemon's lock on its pidfile."""
    state = StateDir(str(running[0]))
    acquire = "import sys; from dbservice.pidfile import Pidfile; Pidfile(sys.argv[1]).acquire()"
    result = subprocess.run(
        [sys.executable, "-c", acquire, state.pidfile], stderr=subprocess.PIPE, text=True, timeout=30
    )
    assert result.returncode != 0 and "AlreadyRunning" in result.stderr
    assert "pid %d" % read_pid(state.pidfile) in result.stderr


def test_slow_jobs_are_logged_without_the_password(running):
    state_dir, _, _ = running
    log = StateDir(str(state_dir)).log
    with client_of(state_dir) as db:
        db.fetchval("select pg_sleep(0.3) /* slow-marker */")
    wait_until(lambda: "slow-marker" in _read(log), message="the slow job's log line")
    line = next(line for line in _read(log).splitlines() if "slow-marker" in line)
    assert "slow job" in line
    assert PASSWORD not in _read(log)


def test_a_slow_jobs_sql_is_logged_on_one_line_cut_short_with_password_literals_masked(running):
    state_dir, _, _ = running
    log = StateDir(str(state_dir)).log
    sql = (
        "select pg_sleep(0.3) /* slow-cut-marker: alter role app password 'hunter2-in-sql' */\n"
        + "-- a long comment line\n" * 20
        + "/* slow-cut-tail */"
    )
    with client_of(state_dir) as db:
        db.fetchval(sql)
    wait_until(lambda: "slow-cut-marker" in _read(log), message="the slow job's log line")
    line = next(line for line in _read(log).splitlines() if "slow-cut-marker" in line)
    assert "password '***'" in line and "hunter2-in-sql" not in _read(log)
    assert "*/ -- a long comment line -- a long comment line" in line  # its lines joined
    assert line.endswith("...") and "slow-cut-tail" not in line


def test_slow_ms_0_logs_no_job(dsn, daemon_dir):
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn, "--slow-ms", "0", "--min-size", "0"))
    state = StateDir(str(daemon_dir))
    with client_of(daemon_dir) as db:
        assert db.fetchval("select pg_sleep(0.2)::text || 'unlogged-marker'") == "unlogged-marker"
    os.kill(read_pid(state.pidfile), signal.SIGUSR1)  # logs a line after the job's, if it had one
    wait_until(lambda: "reopened the log file" in _read(state.log), message="the daemon's next log line")
    assert "slow job" not in _read(state.log)


def test_reload_applies_the_log_level(running):
    state_dir, config, _ = running
    log = StateDir(str(state_dir)).log
    settings = config.read_text()
    try:
        config.write_text(settings + 'log_level = "ERROR"\n')
        ok(dbserviced(state_dir, "reload"))
        with client_of(state_dir) as db:
            db.fetchval("select pg_sleep(0.3)::text || 'quiet-marker'")  # a warning: not logged now
    finally:
        config.write_text(settings)
        ok(dbserviced(state_dir, "reload"))
    with client_of(state_dir) as db:
        db.fetchval("select pg_sleep(0.3)::text || 'loud-marker'")
    wait_until(lambda: "loud-marker" in _read(log), message="the slow job's log line")
    assert "quiet-marker" not in _read(log)


def test_reload_resizes_the_pool_while_jobs_keep_flowing(running):
    state_dir, config, _ = running
    errors, done = [], []
    stop = threading.Event()

    def keep_querying():
        with client_of(state_dir) as db:
            while not stop.is_set():
                try:
                    done.append(db.fetchval("select pg_sleep(0.02)::text || 'ok'"))
                except Exception as exc:  # every one of them must succeed
                    errors.append(exc)

    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        for _ in range(4):
            executor.submit(keep_querying)
        try:
            wait_until(lambda: len(done) >= 20, message="jobs flowing before the reload")
            config.write_text("min_size = 3\nmax_size = 4\nslow_ms = 150\n")
            output = ok(dbserviced(state_dir, "reload"))
            assert "pool 1-4" in output  # max_size from the file; min_size still from the environment
            before = len(done)
            with client_of(state_dir) as db:
                wait_until(lambda: db.status()["pool_size"] >= 3, message="the pool to grow")
            wait_until(lambda: len(done) >= before + 20, message="jobs flowing after the reload")
        finally:
            stop.set()
    assert errors == []
    assert json.loads(ok(dbserviced(state_dir, "status", "--json")))["pool_max"] == 4


def test_reload_shrinks_the_pool_idle_connections_at_once_busy_ones_as_their_jobs_end(running, admin):
    state_dir, config, _ = running
    settings = config.read_text()

    def pool_size(db, size, jobs=0):
        def figures():
            status = db.status()
            return status["pool_size"], status["jobs_running"]

        wait_until(lambda: figures() == (size, jobs), message="%d connections, %d jobs running" % (size, jobs))

    def reload_max_size(max_size):
        config.write_text("max_size = %d\n" % max_size)
        assert "pool 1-%d" % max_size in ok(dbserviced(state_dir, "reload"))

    try:
        with client_of(state_dir) as db:
            for busy in (True, False):
                reload_max_size(4)
                with held_jobs(admin, db, count=4):
                    pool_size(db, 4, jobs=4)
                    if busy:
                        reload_max_size(2)
                if not busy:
                    pool_size(db, 4)
                    reload_max_size(2)
                pool_size(db, 2)
    finally:
        config.write_text(settings)
        ok(dbserviced(state_dir, "reload"))


def test_a_reload_with_a_broken_config_file_keeps_the_settings(running):
    state_dir, config, _ = running
    good = config.read_text()
    config.write_text("max_size = 'many'\n")
    try:
        result = dbserviced(state_dir, "reload")
    finally:
        config.write_text(good)
    assert result.returncode == 1
    assert "max_size" in result.stderr and "settings stay" in result.stderr
    with client_of(state_dir) as db:
        assert db.fetchval("select 1") == 1


def test_sigusr1_reopens_the_log_file(running):
    state_dir, _, _ = running
    state = StateDir(str(state_dir))
    os.rename(state.log, state.log + ".1")  # what logrotate does
    os.kill(read_pid(state.pidfile), signal.SIGUSR1)
    wait_until(lambda: "reopened the log file" in _read(state.log), message="a new log file")


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


# -- stopping ---------------------------------------------------------------------


def _submit_and_wait_until_queued(state_dir, sql, clients):
    """Have *clients* clients submit one job each; return once the daemon has them all."""
    executor = concurrent.futures.ThreadPoolExecutor(clients)

    def one(i):
        with client_of(state_dir) as db:
            return db.fetchval(sql, [i])

    futures = [executor.submit(one, i) for i in range(clients)]
    with client_of(state_dir) as db:
        wait_until(
            lambda: _received(db.status()) == clients,
            message="the daemon to hold every job",
        )
    executor.shutdown(wait=False)
    return futures


def _received(status):
    # queue_depth counts the job the dispatcher holds while it waits for a connection
    names = ("queue_depth", "jobs_running", "jobs_done", "jobs_failed")
    return sum(status[name] for name in names)


def test_stop_lets_every_submitted_job_finish(dsn, daemon_dir):
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn, "--max-size", "1"))
    futures = _submit_and_wait_until_queued(daemon_dir, "select pg_sleep(0.2)::text || %s", clients=6)
    ok(dbserviced(daemon_dir, "stop"))
    assert sorted(f.result(timeout=10) for f in futures) == [str(i) for i in range(6)]
    state = StateDir(str(daemon_dir))
    assert not os.path.exists(state.socket) and not os.path.exists(state.pidfile)
    assert dbserviced(daemon_dir, "status").returncode == cli.EXIT_NOT_RUNNING


def test_stop_force_answers_every_waiting_client_at_once(dsn, daemon_dir):
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn, "--max-size", "1"))
    futures = _submit_and_wait_until_queued(daemon_dir, "select pg_sleep(60)::text || %s", clients=3)
    began = time.monotonic()
    ok(dbserviced(daemon_dir, "stop", "--force"))
    for future in futures:
        with pytest.raises(dbservice.ServiceUnavailable, match="stopped before the job"):
            future.result(timeout=10)
    assert time.monotonic() - began < 15


def test_stop_timeout_ends_a_graceful_stop_that_takes_too_long(dsn, daemon_dir):
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn, "--max-size", "1"))
    futures = _submit_and_wait_until_queued(daemon_dir, "select pg_sleep(60)::text || %s", clients=2)
    began = time.monotonic()
    ok(dbserviced(daemon_dir, "stop", "--timeout", "0.5"))
    for future in futures:
        with pytest.raises(dbservice.ServiceUnavailable, match="stopped before the job"):
            future.result(timeout=10)
    assert time.monotonic() - began < 15


@pytest.mark.parametrize("left_by", ["a dead process", "a pid another process has now"])
def test_a_stale_pidfile_is_replaced(dsn, daemon_dir, left_by):
    state = StateDir(str(daemon_dir))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        if left_by == "a dead process":
            other.kill()
            other.wait()
        os.makedirs(state.path, mode=0o700, exist_ok=True)
        with open(state.pidfile, "w") as f:
            f.write("%d\n" % other.pid)
        assert dbserviced(daemon_dir, "status").returncode == cli.EXIT_NOT_RUNNING
        ok(dbserviced(daemon_dir, "start", "--dsn", dsn))
        assert read_pid(state.pidfile) not in (None, other.pid)
        ok(dbserviced(daemon_dir, "status"))
    finally:
        other.kill()
        other.wait()


def test_foreground_logs_to_stderr_and_stops_on_sigterm(dsn, daemon_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "dbservice.cli", "start", "--foreground", "--dsn", dsn],
        env=env_for(daemon_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: running_pid(StateDir(str(daemon_dir)).pidfile) == process.pid, message="the pidfile")
        wait_until(lambda: dbserviced(daemon_dir, "status").returncode == 0, message="the daemon to answer")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "dbservice serving" in stderr and "dbserviced stopped" in stderr


def test_status_says_what_is_wrong_with_a_running_daemon(daemon_dir):
    unreachable = "host=127.0.0.1 port=1 dbname=nowhere user=nobody connect_timeout=1"
    ok(dbserviced(daemon_dir, "start", "--dsn", unreachable))
    result = dbserviced(daemon_dir, "status")
    assert "the database is unreachable" in result.stdout + result.stderr
    os.unlink(StateDir(str(daemon_dir)).socket)  # the daemon lives on, but nobody can reach it
    result = dbserviced(daemon_dir, "status")
    assert result.returncode == cli.EXIT_UNKNOWN
    assert "does not answer" in result.stderr


def test_commands_without_a_daemon_say_so_with_their_exit_codes(state_dir):
    assert dbserviced(state_dir, "status").returncode == cli.EXIT_NOT_RUNNING
    assert json.loads(dbserviced(state_dir, "status", "--json").stdout) == {"running": False}
    assert "not running" in ok(dbserviced(state_dir, "stop"))
    result = dbserviced(state_dir, "query", "select 1")
    assert result.returncode == 1 and "dbserviced start" in result.stderr


# -- the embedded PostgreSQL ----------------------------------------------------------


def test_with_no_dsn_the_daemon_runs_its_own_postgresql_and_keeps_its_data(daemon_dir):
    cluster = default_cluster_dir(str(daemon_dir))
    try:
        output = ok(dbserviced(daemon_dir, "start"))
        assert "host=%s" % os.path.join(cluster, "tmp") in output
        ok(dbserviced(daemon_dir, "query", "create table kept (note text)"))
        ok(dbserviced(daemon_dir, "query", "insert into kept values (%s)", "survives a restart"))
        postmaster = os.path.join(cluster, "data", "postmaster.pid")
        server = read_pid(postmaster)
        with client_of(daemon_dir) as db, db.transaction() as tx:
            tx.execute("insert into kept values (%s)", ["committed across a restart"])
            restart = subprocess.Popen([sys.executable, "-m", "dbservice.cli", "restart"], env=env_for(daemon_dir),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: "took the socket over" in _read(StateDir(str(daemon_dir)).log),
                       message="the new daemon to take over")
            tx.commit()  # on the old daemon, which then hands its client over and exits
        assert restart.wait(60) == 0, restart.stderr.read()
        # the new daemon adopted the running server: not restarted, nothing lost
        assert read_pid(postmaster) == server
        assert ok(dbserviced(daemon_dir, "query", "select count(*) from kept")).splitlines()[2].strip() == "2"
        # a daemon killed outright leaves its postmaster behind; the next start stops it
        os.kill(read_pid(StateDir(str(daemon_dir)).pidfile), signal.SIGKILL)
        with open(postmaster) as f:
            orphan = int(f.readline())
        os.kill(orphan, 0)  # still running
        ok(dbserviced(daemon_dir, "start"))
        assert "survives a restart" in ok(dbserviced(daemon_dir, "query", "select note from kept"))
        with open(postmaster) as f:
            assert int(f.readline()) != orphan
        ok(dbserviced(daemon_dir, "stop"))
        # stopped with the daemon
        assert not os.path.exists(os.path.join(cluster, "data", "postmaster.pid"))
    finally:
        ensure_stopped(daemon_dir)
        subprocess.run(["rm", "-rf", cluster], check=True)


def test_replicas_n_runs_streaming_standbys_of_the_embedded_postgresql_that_a_restart_adopts(daemon_dir):
    cluster = default_cluster_dir(str(daemon_dir))
    standbys = ["%s-replica%d" % (cluster, number) for number in (1, 2)]

    def hosts():
        return json.loads(ok(dbserviced(daemon_dir, "status", "--json")))["hosts"]

    try:
        ok(dbserviced(daemon_dir, "start", "--replicas", "2"))
        wait_until(lambda: all(host["healthy"] and host["lag_s"] is not None for host in hosts()),
                   message="both standbys to be polled")
        figures = hosts()
        assert [host["role"] for host in figures] == ["primary", "replica", "replica"]
        for host, directory in zip(figures, [cluster] + standbys):
            assert "host=%s" % os.path.join(directory, "tmp") in host["dsn"]
            with open(os.path.join(directory, "data", "postmaster.pid")) as f:
                assert host["pid"] == int(f.readline())
        assert "True" in ok(dbserviced(daemon_dir, "query", "select pg_is_in_recovery()"))  # read on a standby
        text = ok(dbserviced(daemon_dir, "status"))
        assert text.count("  replica ") == 2 and "pid %d" % figures[1]["pid"] in text
        # a restart adopts the standbys as it does the primary: not restarted under the old daemon's reads
        ok(dbserviced(daemon_dir, "restart", "--replicas", "2"))
        assert [host["pid"] for host in hosts()] == [host["pid"] for host in figures]
        assert "left running" not in _read(StateDir(str(daemon_dir)).log)
        assert "True" in ok(dbserviced(daemon_dir, "query", "select pg_is_in_recovery()"))
        # one the new daemon does not keep is stopped by the old one, not left running unknown to both
        ok(dbserviced(daemon_dir, "restart", "--replicas", "1"))
        assert [host["pid"] for host in hosts()] == [host["pid"] for host in figures[:2]]
        wait_until(lambda: not os.path.exists(os.path.join(standbys[1], "data", "postmaster.pid")),
                   message="the standby no daemon keeps to stop")
        ok(dbserviced(daemon_dir, "stop"))
        for directory in [cluster] + standbys:  # stopped with the daemon
            assert not os.path.exists(os.path.join(directory, "data", "postmaster.pid"))
    finally:
        ensure_stopped(daemon_dir)
        subprocess.run(["rm", "-rf", cluster, *standbys], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's server runs as another user")
def test_a_cluster_dir_the_server_user_cannot_reach_is_refused(daemon_dir, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    result = dbserviced(daemon_dir, "start", "--cluster-dir", str(private / "cluster"))
    assert result.returncode == 1
    assert "cannot enter %s" % private in result.stderr and "--cluster-dir" in result.stderr
    assert not (private / "cluster").exists()


# -- configuration and help -------------------------------------------------------------


def test_flags_beat_the_config_file_which_beats_the_defaults(tmp_path):
    config = tmp_path / "dbservice.toml"
    config.write_text('max_size = 7\nmin_size = 3\nlog_level = "debug"\n')
    settings = load_config({"max_size": 5, "slow_ms": None}, str(config))
    assert (settings.min_size, settings.max_size) == (3, 5)
    assert settings.log_level == "DEBUG"
    assert settings.slow_ms == 1000.0


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("max_sise = 3\n", "'max_sise', which is no setting"),
        ("max_size = '3'\n", "must be an integer"),
        ("min_size = 11\nmax_size = 10\n", "min_size <= max_size"),
        ("max_size = [\n", "not valid TOML"),
        ("metrics = 'localhost'\n", "metrics must be HOST:PORT"),
        ("max_queue = -1\n", "max_queue must not be negative"),
        ("log_level = 'loud'\n", "log_level must be one of"),
    ],
)
def test_a_bad_config_file_is_refused_saying_what_is_wrong(dsn, daemon_dir, text, complaint):
    config = daemon_dir / "dbservice.toml"
    config.write_text(text)
    # With a DSN: a daemon that started after all runs on the test cluster, and is stopped.
    result = dbserviced(daemon_dir, "start", "--config", str(config), "--dsn", dsn)
    assert result.returncode == 1
    assert complaint in result.stderr
    assert not os.path.exists(StateDir(str(daemon_dir)).pidfile)


@pytest.mark.parametrize(
    "dsn, still_shown",
    [
        ("host=db user=app password=s3cret-dsn", "host=db"),
        ("postgresql://app:s3cret-dsn@db/app", "host=db"),
        ("host=db password=s3cret-dsn dbname='unterminated", "does not parse"),
    ],
    ids=["keywords", "uri", "unparsable"],
)
def test_a_dsn_is_shown_without_its_password(dsn, still_shown):
    shown = mask_dsn(dsn)
    assert "s3cret-dsn" not in shown
    assert still_shown in shown


def test_settings_show_neither_the_password_nor_the_secret():
    """A Settings in a traceback or a debug line must not carry them: its repr masks both."""
    from dbservice.config import Settings

    shown = repr(Settings(dsn="host=db user=app password=s3cret-dsn", authkey=b"s3cret-key"))
    assert "s3cret" not in shown
    assert "host=db" in shown and "password=***" in shown and "authkey=***" in shown


def test_an_unreachable_database_is_named_without_its_password(socket_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dsn = "host=127.0.0.1 port=%d dbname=app user=app password=s3cret-dsn connect_timeout=1" % port
    with dbservice.DBService(dsn, socket=socket_path, min_size=1, max_size=1) as svc, svc.client() as db:
        wait_until(lambda: db.status()["database_reachable"] is False, message="the first attempt to fail")
        with pytest.raises(dbservice.ServiceUnavailable) as unreachable:
            db.fetchval("select 1")
        figures = db.status()
    assert "port=%d" % port in str(unreachable.value) and "s3cret" not in str(unreachable.value)
    assert "password=***" in figures["dsn"] and "s3cret" not in json.dumps(figures)


def test_every_setting_is_a_flag_a_variable_and_a_key_of_the_file(tmp_path):
    from dbservice import config as settings

    help_text = CliRunner().invoke(cli.main, ["start", "--help"]).output
    values = {int: 7, float: 7.5, str: None}
    lines = []
    for field in settings.operator_settings():
        assert "--" + (field.metadata["flag"] or field.name).replace("_", "-") in help_text
        assert "DBSERVICE_" + field.name.upper() in help_text
        value = values[settings.value_type(field)]
        if value is not None and not settings.is_list(field):
            lines.append("%s = %r" % (field.name, value))
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_config({}, str(path))
    assert loaded.max_client_jobs == 7 and loaded.stop_timeout == 7.5


def test_replicas_are_a_repeated_flag_or_a_list_in_the_file(tmp_path):
    path = tmp_path / "replicas.toml"
    path.write_text('replicas = ["host=r1 dbname=app", "postgresql://r2/app"]\nmax_replica_lag = 2.5\n')
    loaded = load_config({}, str(path))
    assert loaded.replicas == ("host=r1 dbname=app", "postgresql://r2/app") and loaded.max_replica_lag == 2.5
    assert load_config({"replicas": ("host=r3",)}, str(path)).replicas == ("host=r3",)  # the flags win
    assert load_config({"replicas": ()}, str(path)).replicas == loaded.replicas  # none given
    path.write_text('replicas = "host=r1"\n')
    with pytest.raises(ConfigError, match="must be a list of strings"):
        load_config({}, str(path))
    with pytest.raises(ConfigError, match="--replica DSN"):
        load_config({"dsn": "host=db", "embedded_replicas": 2})
    with pytest.raises(ConfigError, match="does not parse"):
        load_config({"replicas": ("host=r1 =oops",)})
    result = CliRunner().invoke(cli.main, ["start", "--help"])
    assert "--replica DSN" in result.output and "--replicas N" in result.output


@pytest.mark.parametrize("command", ["start", "stop", "status", "restart", "reload", "pause", "resume", "query"])
def test_every_command_explains_its_options(command):
    result = CliRunner().invoke(cli.main, [command, "--help"])
    assert result.exit_code == 0
    assert "--state-dir" in result.output and "DBSERVICE_HOME" in result.output
    if command in ("start", "restart"):
        for option in ("--dsn", "--min-size", "--max-size", "--slow-ms", "--log-level", "--config"):
            assert option in result.output


def test_bin_dbserviced_runs_the_same_cli():
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin", "dbserviced")
    result = subprocess.run([sys.executable, script, "--help"], stdout=subprocess.PIPE, text=True, timeout=30)
    assert result.returncode == 0 and "dbserviced start" in result.stdout


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=oct)
def test_a_secret_others_can_read_is_refused(dsn, daemon_dir, mode):
    state = StateDir(str(daemon_dir))
    os.makedirs(state.path, mode=0o700, exist_ok=True)
    with open(state.secret, "w") as f:
        f.write("0123456789abcdef\n")
    os.chmod(state.secret, mode)
    result = dbserviced(daemon_dir, "start", "--dsn", dsn)
    assert result.returncode != 0
    assert "chmod 600" in result.stderr
    assert running_pid(state.pidfile) is None
    os.chmod(state.secret, 0o600)
    ok(dbserviced(daemon_dir, "start", "--dsn", dsn))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give the secret to another user")
def test_a_secret_of_another_user_is_refused(dsn, daemon_dir):
    state = StateDir(str(daemon_dir))
    os.makedirs(state.path, mode=0o700, exist_ok=True)
    with open(state.secret, "w") as f:
        f.write("0123456789abcdef\n")
    os.chmod(state.secret, 0o600)
    os.chown(state.secret, 65534, 65534)
    result = dbserviced(daemon_dir, "start", "--dsn", dsn)
    assert result.returncode != 0
    assert "belongs to uid 65534" in result.stderr
    assert running_pid(state.pidfile) is None


# -- a configuration that cannot work --------------------------------------------------


@pytest.fixture(scope="module")
def password_role(postgresql, admin_module):
    """A role that must log in with a password over TCP: the test cluster trusts everyone else."""
    cur = admin_module.cursor()
    cur.execute("drop role if exists pw_user; create role pw_user login password 'right-password'")
    hba = os.path.join(postgresql.base_dir, "data", "pg_hba.conf")
    with open(hba) as f:
        original = f.read()
    with open(hba, "w") as f:
        f.write("host all pw_user 127.0.0.1/32 scram-sha-256\n" + original)
    cur.execute("select pg_reload_conf()")
    yield "pw_user"
    with open(hba, "w") as f:
        f.write(original)
    cur.execute("select pg_reload_conf()")


@pytest.fixture(scope="module")
def admin_module(dsn):
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    yield conn
    conn.close()


def _with(dsn, **changes):
    from psycopg2.extensions import make_dsn

    return make_dsn(dsn, **changes)


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"dbname": "no_such_database"}, 'database "no_such_database" does not exist'),
        ({"user": "no_such_role"}, 'role "no_such_role" does not exist'),
        ({"user": "pw_user", "password": "wrong-password"}, "password authentication failed"),
    ],
    ids=["database", "role", "password"],
)
def test_start_fails_when_the_server_refuses_the_dsn_for_good(dsn, daemon_dir, password_role, change, complaint):
    result = dbserviced(daemon_dir, "start", "--dsn", _with(dsn, **change))
    assert result.returncode == 1, result.stdout + result.stderr
    assert complaint in result.stderr and "--dsn" in result.stderr
    assert "wrong-password" not in result.stderr + result.stdout
    assert dbserviced(daemon_dir, "status").returncode == cli.EXIT_NOT_RUNNING
    # the right password starts it
    if "password" in change:
        ok(dbserviced(daemon_dir, "start", "--dsn", _with(dsn, user="pw_user", password="right-password")))


def test_start_refuses_a_dsn_that_does_not_parse(daemon_dir):
    result = dbserviced(daemon_dir, "start", "--dsn", "this is not a dsn")
    assert result.returncode != 0
    assert "the DSN does not parse" in result.stderr
    assert dbserviced(daemon_dir, "status").returncode == cli.EXIT_NOT_RUNNING


def test_a_database_that_is_down_starts_but_status_says_so_and_jobs_fail_fast(daemon_dir):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = dbserviced(daemon_dir, "start", "--dsn", "host=127.0.0.1 port=%d dbname=app user=app" % port)
    assert start.returncode == 0, start.stderr
    assert "not reachable" in start.stderr
    status = dbserviced(daemon_dir, "status")
    assert status.returncode == cli.EXIT_UNKNOWN
    assert "cannot reach its database" in status.stderr and str(port) in status.stderr
    with client_of(daemon_dir) as db:
        started = time.monotonic()
        with pytest.raises(dbservice.ServiceUnavailable, match="unreachable.*%d" % port):
            db.fetchval("select 1")  # no timeout: it would wait pool_timeout (30 s)
        assert time.monotonic() - started < 5


def test_jobs_waiting_on_a_full_pool_are_logged_naming_max_size(running):
    state_dir, _, _ = running
    log = StateDir(str(state_dir)).log
    with concurrent.futures.ThreadPoolExecutor(5) as executor:
        jobs = [
            executor.submit(lambda: client_of(state_dir).fetchval("select pg_sleep(0.5) /* full-pool */"))
            for _ in range(5)
        ]
        for job in jobs:
            job.result(timeout=60)
    wait_until(lambda: "raise --max-size" in _read(log), message="the full pool's warning")
    lines = [line for line in _read(log).splitlines() if "raise --max-size" in line]
    assert len(lines) == 1  # rate-limited
    assert "max_size" in lines[0]
