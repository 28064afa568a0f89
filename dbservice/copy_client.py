"""COPY from the client's side: a file streamed to or from the daemon, as psycopg2's copy methods read and write it.

``copy_expert(sql, file, size=8192)``, ``copy_from(file, table, ...)`` and
``copy_to(file, table, ...)`` take psycopg2's arguments (:class:`CopyMethods`,
on every client and transaction that has a socket). The file is read
*size* bytes at a time (``str`` chunks are encoded, as psycopg2 does, in the
connection's encoding) or written a frame at a time (decoded when it is a
text file, an ``io.TextIOBase``). The daemon runs the COPY on a pooled
connection (see copying.py) and the data flows under credit, so that
neither side holds more than a window of it.

The exchange is written once, with no I/O (:func:`conversation`), and driven
by :func:`copy_on_channel` on a blocking channel and :func:`copy_on_connection`
on the asyncio client's connection.
"""

import asyncio
import codecs
import collections
import inspect
import io
import pickle
from typing import Any, Callable, Deque, Generator, Generic, Iterable, List, Optional, Tuple, TypeVar

from .errors import Error, QueryTimeout
from .jobs import COPY, Job
from .queries import encode_job, reply_wait
from .wire import (
    COPY_CREDIT,
    COPY_IN,
    COPY_OUT,
    MSG_CANCEL,
    MSG_COPY,
    MSG_COPY_CREDIT,
    MSG_COPY_DATA,
    MSG_COPY_DONE,
    MSG_COPY_STARTED,
    MSG_ERROR,
    MSG_RESULT,
)

#: What a conversation asks of its driver.
SEND = "send"  # (SEND, kind, payload): send a frame of the job
RECEIVE = "receive"  # (RECEIVE,): the job's next frame, as (kind, payload)
READ = "read"  # (READ, size): the file's next chunk ("" or b"" at its end)
WRITE = "write"  # (WRITE, data): write it to the file

#: A conversation: it yields what to do, is sent what came of it, and returns the rowcount.
Conversation = Generator[Tuple[Any, ...], Any, int]
#: What a table's COPY job carries (see table_form()).
TableForm = Tuple[str, str, Optional[List[str]], str, str]

# What the copy methods return: the rowcount (Client), or a coroutine of it (AsyncClient).
_Count = TypeVar("_Count")


class CopyMethods(Generic[_Count]):
    """psycopg2's copy methods, over a ``_copy(job, file, size)`` of each client or transaction.

    Each returns the number of rows copied. A COPY is one job: *timeout*
    covers all of it (the client's own timeout by default).
    """

    timeout: Optional[float]
    _tx: Optional[int]
    _copy: Callable[[Job, Any, int], _Count]  # what a subclass provides: running the COPY job, streaming the file

    def copy_expert(self, sql: str, file: Any, size: int = 8192, *, timeout: Optional[float] = None) -> _Count:
        """Run *sql*, a ``COPY ... FROM STDIN`` (reading *file*) or ``COPY ... TO STDOUT`` (writing it)."""
        return self._copy(self._copy_job(sql, None, timeout), file, size)

    def copy_from(
        self, file: Any, table: str, sep: str = "\t", null: str = "\\N", size: int = 8192,
        columns: Optional[Iterable[str]] = None, *, timeout: Optional[float] = None,
    ) -> _Count:
        """Copy *file*'s lines, in COPY's text format, into *table* (a name, quoted: no schema; see copy_expert())."""
        form = table_form(COPY_IN, file, table, sep, null, columns)
        return self._copy(self._copy_job("", form, timeout), file, size)

    def copy_to(
        self, file: Any, table: str, sep: str = "\t", null: str = "\\N", columns: Optional[Iterable[str]] = None,
        *, timeout: Optional[float] = None,
    ) -> _Count:
        """Write *table*'s rows to *file* in COPY's text format."""
        form = table_form(COPY_OUT, file, table, sep, null, columns)
        return self._copy(self._copy_job("", form, timeout), file, 8192)

    def _copy_job(self, sql: str, form: Optional[TableForm], timeout: Optional[float]) -> Job:
        return Job(sql, form, COPY, self.timeout if timeout is None else timeout, self._tx)


def table_form(
    direction: str, file: Any, table: str, sep: str, null: str, columns: Optional[Iterable[str]]
) -> TableForm:
    """What a COPY job carries for copy_from() or copy_to(): the daemon writes its SQL (copying.CopyJob)."""
    method, caller = ("read", "copy_from") if direction == COPY_IN else ("write", "copy_to")
    if not callable(getattr(file, method, None)):
        raise TypeError("%s() needs a file with a %s() method, not %s" % (caller, method, type(file).__name__))
    return direction, table, None if columns is None else list(columns), sep, null


def conversation(job: Job, size: int, text: bool) -> Conversation:
    """The client's side of a COPY job, with no I/O: a generator of what to do (SEND, RECEIVE, READ, WRITE).

    Each RECEIVE is sent back the job's next frame, each READ the file's next
    chunk; an error of the file's is thrown in, and ends the COPY on the
    daemon before it is raised. *text*: the file wants ``str``. Returns the
    job's rowcount; raises its error.
    """
    yield SEND, MSG_COPY, encode_job(job)
    while True:
        kind, payload = yield (RECEIVE,)
        if kind == MSG_COPY_CREDIT:
            continue  # for data sent already
        if kind != MSG_COPY_STARTED:
            return _reply(kind, payload)
        direction, codec, window = pickle.loads(payload)
        if direction == COPY_IN:
            ended = yield from _send_file(size, codec, window)
        else:
            ended = yield from _receive_file(text, codec, window)
        if ended is not None:
            return _reply(*ended)


def _send_file(size: int, codec: str, window: int) -> Generator[Tuple[Any, ...], Any, Optional[Tuple[int, bytes]]]:
    """Send the file under the daemon's credit; the job's reply if it came before the end of the data."""
    credit = window
    largest = window // 4
    while True:
        try:
            chunk = yield READ, size
        except Exception:
            yield from _cancel()
            raise
        if not chunk:
            break
        if isinstance(chunk, str):
            chunk = chunk.encode(codec)
        for start in range(0, len(chunk), largest):
            while credit <= 0:
                kind, payload = yield (RECEIVE,)
                if kind != MSG_COPY_CREDIT:
                    return kind, payload  # the COPY failed (or was stopped) before the end of our data
                credit += COPY_CREDIT.unpack(payload)[0]
            piece = chunk[start:start + largest]
            yield SEND, MSG_COPY_DATA, piece
            credit -= len(piece)
    yield SEND, MSG_COPY_DONE, b""
    return None


def _receive_file(text: bool, codec: str, window: int) -> Generator[Tuple[Any, ...], Any, Tuple[int, bytes]]:
    """Write the daemon's data to the file, granting credit back as it is written; the reply that ends it."""
    decoder = codecs.getincrementaldecoder(codec)() if text else None
    unacknowledged = 0
    while True:
        kind, payload = yield (RECEIVE,)
        if kind != MSG_COPY_DATA:
            return kind, payload
        try:
            yield WRITE, payload if decoder is None else decoder.decode(payload)
        except Exception:
            yield from _cancel()
            raise
        unacknowledged += len(payload)
        if unacknowledged >= window // 4:
            yield SEND, MSG_COPY_CREDIT, COPY_CREDIT.pack(unacknowledged)
            unacknowledged = 0


def _cancel() -> Generator[Tuple[Any, ...], Any, None]:
    """The file failed: have the daemon stop the COPY (none of a COPY FROM commits), and wait for its reply."""
    yield SEND, MSG_CANCEL, b""
    while True:
        kind, _ = yield (RECEIVE,)
        if kind in (MSG_RESULT, MSG_ERROR):
            return


def _reply(kind: int, payload: bytes) -> int:
    value = pickle.loads(payload)
    if kind == MSG_ERROR:
        raise value
    if kind != MSG_RESULT:
        raise Error("the dbservice daemon answered a COPY with a frame of kind %d" % kind)
    rowcount: int = value
    return rowcount


def copy_on_channel(channel: Any, job: Job, file: Any, size: int) -> int:
    """Run the COPY *job* on *channel*, a blocking Channel, reading or writing *file*; its rowcount."""
    talk = conversation(job, size, isinstance(file, io.TextIOBase))
    with channel.exchange(reply_wait(job.timeout)) as link:
        action = next(talk)
        while True:
            try:
                if action[0] == RECEIVE:
                    result = link.receive()
                elif action[0] == SEND:
                    result = link.send(action[1], action[2])
                else:
                    try:
                        result = file.read(action[1]) if action[0] == READ else file.write(action[1])
                    except Exception as exc:
                        action = talk.throw(exc)
                        continue
                action = talk.send(result)
            except StopIteration as done:
                rowcount: int = done.value
                return rowcount


async def copy_on_connection(connection: Any, job: Job, file: Any, size: int) -> int:
    """Run the COPY *job* on the asyncio client's *connection*; the file's read() and write() may be coroutines."""
    talk = conversation(job, size, isinstance(file, io.TextIOBase))
    frames = FrameQueue(reply_wait(job.timeout))
    job_id = connection.open_stream(frames)
    try:
        action = next(talk)
        while True:
            try:
                if action[0] == RECEIVE:
                    result = await frames.get()
                elif action[0] == SEND:
                    result = await connection.write(job_id, action[1], action[2])
                else:
                    try:
                        result = file.read(action[1]) if action[0] == READ else file.write(action[1])
                        if inspect.isawaitable(result):
                            result = await result
                    except Exception as exc:
                        action = talk.throw(exc)
                        continue
                action = talk.send(result)
            except StopIteration as done:
                rowcount: int = done.value
                return rowcount
    except asyncio.CancelledError:
        if connection.lost is None:
            connection.write_nowait(job_id, MSG_CANCEL, b"")  # the daemon stops the COPY
        raise
    finally:
        connection.close_stream(job_id)


class FrameQueue:
    """The frames of one job on the asyncio client's connection, as they come (a COPY's, bounded by its credit)."""

    def __init__(self, timeout: Optional[float]) -> None:
        self.timeout = timeout
        self._frames: Deque[Tuple[int, bytes]] = collections.deque()
        self._ready: "Optional[asyncio.Future[None]]" = None  # the future get() waits on
        self._lost: Optional[BaseException] = None

    def frame(self, kind: int, payload: bytes) -> None:
        self._frames.append((kind, payload))
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def lost(self, error: BaseException) -> None:
        self._lost = error
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def get(self) -> Tuple[int, bytes]:
        """The next frame, as (kind, payload); the connection's error once it is lost."""
        while not self._frames:
            if self._lost is not None:
                raise self._lost
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._ready, self.timeout)
            except asyncio.TimeoutError:
                raise QueryTimeout("no reply from the dbservice daemon within %.1f s" % (self.timeout or 0)) from None
            finally:
                self._ready = None
        return self._frames.popleft()
