"""A TCP proxy between the daemon and PostgreSQL that a test can cut or stall.

Runs its own event loop on a thread. ``stop()`` drops every connection and
refuses new ones (the link is down); ``start()`` brings it back on the same
port; ``reset()`` resets every connection, as a peer that dies with data
unread does (TCP RST, not FIN), after sending the daemon some last words if
given; ``stall()`` keeps connections open but
forwards nothing (packets lost in the network); ``resume()`` lets traffic
flow again. ``accepted`` records when
each connection attempt arrived, to check the reconnect backoff.
"""

import asyncio
import socket
import struct
import threading
import time


class TcpProxy:
    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.port = None
        self.accepted = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._server = None
        self._writers = set()
        self._to_daemon = set()  # the writers of self._writers that face the daemon
        self._flowing = None
        self._call(self._init)

    def dsn(self, **params):
        params.update(host="127.0.0.1", port=self.port)
        return " ".join("%s=%s" % item for item in sorted(params.items()))

    def start(self):
        self._call(self._start)

    def stop(self):
        self._call(self._stop)

    def reset(self, last_words=b""):
        self._call(lambda: self._reset(last_words))

    def stall(self):
        self._call(self._flowing.clear)

    def resume(self):
        self._call(self._flowing.set)

    def close(self):
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, fn):
        async def run():
            result = fn()
            if asyncio.iscoroutine(result):
                await result

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _init(self):
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def _start(self):
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port or 0)
            self.port = self._server.sockets[0].getsockname()[1]

    def _stop(self):
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._to_daemon.clear()

    def _reset(self, last_words):
        for writer in list(self._writers):
            if writer in self._to_daemon and last_words:
                writer.write(last_words)  # sent at once: the connection is idle
            # A zero linger makes close() send RST: the daemon's socket errors (POLLERR).
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()
        self._to_daemon.clear()

    async def _serve(self, client_reader, client_writer):
        self.accepted.append(time.monotonic())
        self._writers.add(client_writer)
        self._to_daemon.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.add(server_writer)
        await asyncio.gather(
            self._pump(client_reader, server_writer), self._pump(server_reader, client_writer),
            return_exceptions=True,
        )
        self._to_daemon.discard(client_writer)
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader, writer):
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.transport.abort()
