"""Every frame a client sends gets its one reply, even one the daemon fails on: what both intakes share.

An intake handles each frame through :meth:`FrameAnswers.answer`. Should
our own code raise meanwhile, the frame's job or request is answered all the
same, with an InternalError (:func:`reply_error`), and the frames after it
are handled as usual: they may be other jobs of the same client, or on the
queue intake other clients' jobs. Which answer a frame's kind gets is the
intake's own ``_failed``.
"""

import logging

import psycopg2

from .errors import Error, InternalError

logger = logging.getLogger("dbservice.answering")


def reply_error(exc, what, *args):
    """The error to answer a job or request with that failed with *exc*; *what* names it for the log.

    The database's errors and dbservice's (a JobRefused: the job's own
    fault) are answered as they are. Anything else was raised by our own
    code, a bug of ours: logged here, once, with its traceback, and answered
    with an InternalError.
    """
    if isinstance(exc, (psycopg2.Error, Error)):
        return exc
    logger.error("the daemon failed on " + what, *args, exc_info=exc)
    return InternalError.of(exc)


class FrameAnswers:
    """Mixed into an intake's end of a client: the frame being handled, until it is answered.

    The class sets ``_answering = None`` as it starts, has a
    ``_failed(job_id, kind, error)`` that answers a frame it failed on, and
    calls :meth:`answered` from its ``reply``.
    """

    __slots__ = ()

    def answer(self, job_id, kind, payload, handle, client):
        """``handle(job_id, kind, payload)``; should it raise, ``_failed`` answers the frame instead.

        *client* names the frame's sender for the log.
        """
        self._answering = job_id
        try:
            handle(job_id, kind, payload)
        except Exception as exc:
            self._failed(job_id, kind, reply_error(exc, "a frame (kind %d, job %d) of %s", kind, job_id, client))
        finally:
            self._answering = None

    def answered(self, job_id):
        """*job_id*'s reply goes out: should the frame's handling fail after it, none other is due."""
        if job_id == self._answering:
            self._answering = None

    def unanswered(self, job_id):
        """True while the frame of *job_id* being handled has had no reply."""
        return job_id == self._answering
