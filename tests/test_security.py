"""Authentication, forged pickles and the restricted unpickler."""

import datetime
import decimal
import os
import pickle
import socket
import uuid

import pytest

import dbservice
from conftest import start_service, wait_until
from dbservice import jobs, wire


class _Forged:
    """Pickles to a call of os.system: what an attacker would send."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def forged_pickle(marker):
    return pickle.dumps(("select 1", [_Forged("touch %s" % marker)], "all", None, None))


def raw_connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_transaction_control_sql_is_written_by_the_daemon():
    begin = jobs.loads_job(pickle.dumps(("drop table x", {"isolation_level": "Serializable", "readonly": True,
                                                          "deferrable": False}, "begin", None, 3)))
    assert begin.sql == "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY NOT DEFERRABLE"
    assert begin.params is None
    assert jobs.loads_job(pickle.dumps(("drop table x", None, "commit", None, 3))).sql == "COMMIT"
    assert jobs.loads_job(pickle.dumps(("", {"isolation_level": 2}, "begin", None, 3))).sql == (
        "BEGIN ISOLATION LEVEL REPEATABLE READ"
    )


def test_restricted_unpickler_admits_every_parameter_type():
    params = [
        None, True, 1, 2**70, 1.5, "t", b"b", bytearray(b"x"), (1,), [2], {"k": "v"},
        datetime.datetime.now(datetime.timezone.utc), datetime.date.today(), datetime.time(1),
        datetime.timedelta(1), decimal.Decimal("1.1"), uuid.uuid4(), uuid.uuid1(),
    ]
    job = jobs.loads_job(pickle.dumps(("select 1", params, "all", 3.0, None), 5))
    assert job.params == params
    assert job.timeout == 3.0


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(("select 1", [_Forged("true")], "all", None, None)),
        pickle.dumps(("select 1", [pickle.PickleError()], "all", None, None)),
        pickle.dumps(("select 1", [object()], "all", None, None)),
        b"cos\nsystem\n(S'true'\ntR.",  # protocol 0, by hand
    ],
    ids=["os.system", "exception", "object", "protocol-0"],
)
def test_restricted_unpickler_refuses_other_classes(payload):
    with pytest.raises(dbservice.JobRefused, match="may not carry"):
        jobs.loads_job(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        pickle.dumps("just a string"),
        pickle.dumps(("select 1", None, "all", None)),  # a field short
        pickle.dumps(("select 1", None, "bogus", None, None)),
        pickle.dumps(("select 1", None, "all", -1, None)),
        pickle.dumps((1, None, "all", None, None)),
        pickle.dumps(("select 1", "not params", "all", None, None)),
        pickle.dumps(("select 1", None, "all", None, "tx")),
        pickle.dumps(("", {"isolation_level": "chaos"}, "begin", None, 1)),
        pickle.dumps(("", {"isolation_level": "serializable; drop table x"}, "begin", None, 1)),
        pickle.dumps(("", {"readonly": "yes"}, "begin", None, 1)),
        pickle.dumps(("", {"autocommit": True}, "begin", None, 1)),
        pickle.dumps(("", None, "commit", None, None)),
    ],
)
def test_malformed_jobs_are_refused_with_a_reason(payload):
    with pytest.raises(dbservice.JobRefused):
        jobs.loads_job(payload)


def test_forged_pickle_from_an_authenticated_peer_executes_nothing(socket_service, tmp_path):
    marker = tmp_path / "pwned"
    sock = raw_connect(socket_service.socket)
    wire.client_handshake(sock, socket_service.authkey)
    sock.sendall(wire.encode_frame(7, wire.MSG_JOB, forged_pickle(marker)))
    job_id, kind, body = wire.recv_frame(sock)
    assert (job_id, kind) == (7, wire.MSG_ERROR)
    error = pickle.loads(body)
    assert isinstance(error, dbservice.JobRefused)
    assert "posix.system" in str(error) or "os.system" in str(error)
    # the same connection still serves proper jobs
    sock.sendall(wire.encode_frame(8, wire.MSG_JOB, jobs.dumps_job(jobs.Job("select 5", None, "value"))))
    assert wire.recv_frame(sock)[:2] == (8, wire.MSG_RESULT)
    sock.close()
    assert not marker.exists()


@pytest.mark.parametrize("kind", [wire.MSG_AUTH, wire.MSG_JOB])
def test_unauthenticated_bytes_are_never_decoded(socket_service, tmp_path, kind):
    marker = tmp_path / "pwned"
    sock = raw_connect(socket_service.socket)
    wire.recv_frame(sock)  # the daemon's challenge
    # a pickle instead of the answer: too long for a handshake frame, so dropped
    sock.sendall(wire.encode_frame(0, kind, forged_pickle(marker)))
    with pytest.raises((dbservice.ServiceUnavailable, ConnectionError)):
        wire.recv_frame(sock)
    sock.close()
    # a short wrong answer: refused, then dropped
    sock = raw_connect(socket_service.socket)
    wire.recv_frame(sock)
    sock.sendall(wire.encode_frame(0, kind, b"\x80\x05N." + wire.new_challenge()))
    assert wire.recv_frame(sock)[2] == wire.FAILURE
    with pytest.raises((dbservice.ServiceUnavailable, ConnectionError)):
        wire.recv_frame(sock)
    sock.close()
    assert not marker.exists()
    with socket_service.client() as c:
        assert c.fetchval("select 1") == 1


def test_wrong_secret_is_refused(socket_service):
    with pytest.raises(dbservice.AuthenticationError, match="refused our secret"):
        dbservice.connect(socket=socket_service.socket, authkey=b"not the secret")


def test_daemon_that_does_not_know_the_secret_is_not_trusted(tmp_path):
    """Mutual authentication: a client does not talk to an impostor daemon."""
    os.chmod(tmp_path, 0o700)
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    client = raw_connect(path)
    impostor, _ = listener.accept()
    # The impostor welcomes any answer but cannot answer the client's challenge.
    impostor.sendall(wire.encode_frame(0, wire.MSG_AUTH, wire.new_challenge()))
    impostor.sendall(wire.encode_frame(0, wire.MSG_AUTH, wire.WELCOME + b"\0" * 32))
    with pytest.raises(dbservice.AuthenticationError, match="does not know our secret"):
        wire.client_handshake(client, b"the real secret")
    for s in (client, impostor, listener):
        s.close()


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701], ids=oct)
def test_socket_directory_open_to_others_is_refused(dsn, tmp_path, mode):
    directory = tmp_path / "open"
    directory.mkdir()
    os.chmod(directory, mode)
    svc = dbservice.DBService(dsn, socket=str(directory / "s.sock"), min_size=0, max_size=1)
    with pytest.raises(dbservice.ServiceUnavailable, match="chmod 700"):
        svc.start()


def test_a_file_in_the_sockets_place_is_left_alone(dsn, tmp_path):
    os.chmod(tmp_path, 0o700)
    path = tmp_path / "s.sock"
    path.write_text("not a socket")
    svc = dbservice.DBService(dsn, socket=str(path), min_size=0, max_size=1)
    with pytest.raises(dbservice.ServiceUnavailable, match="is not a socket"):
        svc.start()
    assert path.read_text() == "not a socket"


def test_a_socket_another_service_serves_is_not_taken_over(socket_service):
    svc = dbservice.DBService(socket_service.settings.dsn, socket=socket_service.socket, min_size=0, max_size=1)
    with pytest.raises(dbservice.ServiceUnavailable, match="already serves"):
        svc.start()
    with socket_service.client(timeout=10) as c:
        assert c.fetchval("select 1") == 1


def test_a_client_that_does_not_authenticate_in_time_is_dropped(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=0, max_size=1, auth_timeout=1.0) as svc:
        sock = raw_connect(svc.socket)
        assert wire.recv_frame(sock)[1] == wire.MSG_AUTH  # the challenge, which it never answers
        with svc.client(timeout=10) as c:
            with pytest.raises((dbservice.ServiceUnavailable, ConnectionError)):
                wire.recv_frame(sock)  # the daemon hangs up, well within the 10 s socket timeout
            wait_until(lambda: c.status()["socket_clients"] == 1, message="the daemon to drop it")
        sock.close()


def test_socket_is_owner_only(socket_service):
    assert os.stat(socket_service.socket).st_mode & 0o077 == 0
    assert os.stat(os.path.dirname(socket_service.socket)).st_mode & 0o077 == 0


def test_oversized_frame_is_refused_without_buffering_it(socket_service):
    sock = raw_connect(socket_service.socket)
    wire.client_handshake(sock, socket_service.authkey)
    sock.sendall(wire.HEADER.pack(1 << 30, 9, wire.MSG_JOB))  # claims 1 GiB, sends nothing
    job_id, kind, body = wire.recv_frame(sock)  # answered at once, not after a GiB
    assert (job_id, kind) == (9, wire.MSG_ERROR)
    assert "max_frame" in str(pickle.loads(body))
    sock.close()
    with socket_service.client() as c:
        assert c.fetchval("select 1") == 1


def _job_of(size):
    """A job whose pickle takes exactly *size* bytes: ``select 1`` and a comment."""
    for pad in range(size):
        payload = jobs.dumps_job(jobs.Job("select 1 /* %s */" % ("x" * pad), None, "value"))
        if len(payload) == size:
            return payload
    raise AssertionError("no job pickles to %d bytes" % size)


def test_a_job_of_max_frame_bytes_is_served_and_one_byte_more_refused(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_frame=4096) as svc:
        sock = raw_connect(svc.socket)
        wire.client_handshake(sock, svc.authkey)
        sock.sendall(wire.encode_frame(1, wire.MSG_JOB, _job_of(4096)))
        assert wire.recv_frame(sock) == (1, wire.MSG_RESULT, pickle.dumps(1, jobs.PICKLE_PROTOCOL))
        sock.sendall(wire.encode_frame(2, wire.MSG_JOB, _job_of(4097)))
        _, kind, body = wire.recv_frame(sock)
        message = str(pickle.loads(body))
        assert kind == wire.MSG_ERROR and "4097 bytes" in message and "(max_frame 4096)" in message
        sock.close()


def test_an_oversized_job_is_skipped_and_the_connection_goes_on(dsn, socket_path):
    with start_service(dsn, socket_path, min_size=1, max_size=1, max_frame=1000) as svc:
        sock = raw_connect(svc.socket)
        assert wire.client_handshake(sock, svc.authkey) == 1000  # the daemon says its limit
        big = pickle.dumps(("select %s", ["x" * 2000], "value", None, None))
        small = pickle.dumps(("select 'after'", None, "value", None, None))
        sock.sendall(wire.encode_frame(1, wire.MSG_JOB, big) + wire.encode_frame(2, wire.MSG_JOB, small))
        first, second = wire.recv_frame(sock), wire.recv_frame(sock)
        assert first[:2] == (1, wire.MSG_ERROR) and "max_frame 1000" in str(pickle.loads(first[2]))
        assert second[:2] == (2, wire.MSG_RESULT) and pickle.loads(second[2]) == "after"
        sock.close()
