"""A daemon that fails on purpose, as a bug of ours would, to prove one failed job costs no other.

Python imports this module at start-up in every process that has this
directory on its ``PYTHONPATH``. With ``DBSERVICE_FAULT`` set to a step, the
daemon raises a RuntimeError in that step for the jobs whose SQL (for
``reply``: whose result; for ``handle``: whose frame) carries the text of
``DBSERVICE_FAULT_MARKER``; every other job runs as it always does. The
steps: ``decode`` (the job built from its frame's message), ``submit`` (the job handed
to the engine), ``reply`` (its reply encoded), ``handle`` (a frame of any
kind about to be handled: a status request, a LISTEN, a CANCEL...),
``handled`` (such a frame once handled, its reply sent if it is one sent at once).
"""

import os

_step = os.environ.get("DBSERVICE_FAULT")
FAULT_MARKER = os.environ.get("DBSERVICE_FAULT_MARKER", "")


def _fault():
    raise RuntimeError("a fault injected in the %s step" % _step)


def _faulty_decode(from_wire):
    def decode(cls, message, *args):
        job = from_wire(message, *args)
        if FAULT_MARKER in job.sql:
            _fault()
        return job

    return classmethod(decode)


def _faulty_queue(queue):
    def queue_job(engine, pending):
        if FAULT_MARKER in pending.job.sql:
            _fault()
        return queue(engine, pending)

    return queue_job


def _faulty_handle(handle, after):
    def handle_frame(protocol, job_id, kind, payload):
        marked = FAULT_MARKER.encode() in payload
        if marked and not after:
            _fault()
        handle(protocol, job_id, kind, payload)
        if marked:
            _fault()

    return handle_frame


def _faulty_encode(encode_reply):
    def encode(ok, value, max_bytes):
        if FAULT_MARKER in repr(value):
            _fault()
        return encode_reply(ok, value, max_bytes)

    return encode


if _step == "decode":  # either intake's
    from dbservice.jobs import Job

    Job.from_wire = _faulty_decode(Job.from_wire)
elif _step == "submit":
    from dbservice import engine

    engine.Engine._queue = _faulty_queue(engine.Engine._queue)
elif _step == "reply":  # either intake's
    from dbservice import queue_intake, socket_intake

    socket_intake.encode_reply = _faulty_encode(socket_intake.encode_reply)
    queue_intake.encode_reply = _faulty_encode(queue_intake.encode_reply)
elif _step in ("handle", "handled"):  # either intake's
    from dbservice import queue_intake, socket_intake

    socket_intake._ClientProtocol._handle = _faulty_handle(socket_intake._ClientProtocol._handle, _step == "handled")
    queue_intake._ReplyChannel._receive = _faulty_handle(queue_intake._ReplyChannel._receive, _step == "handled")
