"""A daemon slowed down on purpose, to prove the bench's regression guard fails it.

Python imports this module at start-up in every process that has this
directory on its ``PYTHONPATH``. With ``DBSERVICE_SLOWDOWN`` set to a
fraction (0.25: a quarter), the daemon's two per-job steps (a job's frames
read, decoded and sent to PostgreSQL; its result fetched and the reply
written) each spin on for as long again as that fraction demands, so that
the daemon does the same work in 1 / (1 - fraction) times the CPU: a
daemon-bound throughput falls by the fraction. The rest of dbservice, and
every other strategy of the bench, is untouched.
"""

import os
import time

_fraction = float(os.environ.get("DBSERVICE_SLOWDOWN", "0"))


def _slowed(step, extra):
    def slowed_step(*args):
        started = time.perf_counter()
        result = step(*args)
        until = time.perf_counter() + (time.perf_counter() - started) * extra
        while time.perf_counter() < until:
            pass
        return result

    return slowed_step


if _fraction:
    from dbservice import runner, socket_intake

    _extra = _fraction / (1 - _fraction)
    socket_intake._ClientProtocol.data_received = _slowed(socket_intake._ClientProtocol.data_received, _extra)
    runner.Statement._readable = _slowed(runner.Statement._readable, _extra)
