"""Fuzzing the decoders: random frames and messages never crash or hang the daemon."""

import pickle
import socket

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dbservice
from dbservice import jobs, wire

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children) | st.dictionaries(
        st.text(max_size=5), children, max_size=3
    ),
    max_leaves=12,
)


@FUZZ
@given(st.binary(max_size=300))
def test_job_decoder_on_random_bytes(data):
    try:
        job = jobs.loads_job(data)
    except dbservice.JobRefused:
        return
    assert isinstance(job, jobs.Job)


@FUZZ
@given(values, st.sampled_from(sorted(jobs.JOB_KINDS) + ["", "x"]), values, values)
@example(params=b"\x00", kind="begin", timeout=None, tx=0)  # BEGIN's options not a dict
@example(params={"isolation_level": []}, kind="begin", timeout=None, tx=0)
def test_job_decoder_on_random_messages(params, kind, timeout, tx):
    for message in [("select 1", params, kind, timeout, tx), params, (params,)]:
        data = pickle.dumps(message)
        for cut in (len(data), len(data) // 2):  # whole and truncated
            try:
                job = jobs.loads_job(data[:cut])
            except dbservice.JobRefused:
                continue
            assert isinstance(job, jobs.Job)


@FUZZ
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_frame_reader_on_random_streams(data, chunk):
    """The daemon's frame reader, fed in arbitrary pieces: frames or FrameError, nothing else."""
    reader = wire.FrameReader(max_size=64)
    frames = []
    try:
        for start in range(0, len(data), chunk):
            reader.feed(data[start : start + chunk])
            while (frame := reader.next_frame()) is not None:
                frames.append(frame)
    except wire.FrameError:
        pass
    assert len(frames) <= len(data) // wire.HEADER.size
    # what it cut out is exactly what was framed
    offset = 0
    for job_id, kind, payload in frames:
        assert wire.encode_frame(job_id, kind, payload) == data[offset : offset + wire.HEADER.size + len(payload)]
        offset += wire.HEADER.size + len(payload)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=200), st.booleans())
def test_daemon_survives_random_bytes(socket_service, data, authenticate):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(socket_service.socket)
    try:
        if authenticate:
            wire.client_handshake(sock, socket_service.authkey)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # whatever it answers, it ends the conversation
            pass
    except socket.timeout:
        raise AssertionError("the daemon neither answered nor hung up on %r" % data) from None
    except OSError:
        pass  # it hung up first: fine
    finally:
        sock.close()
    with socket_service.client(timeout=10) as c:
        assert c.fetchval("select 1") == 1
