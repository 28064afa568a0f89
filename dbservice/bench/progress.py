"""A progress bar on stderr while the bench runs: cells done, the current one, time so far."""

import sys
import time


class Progress:
    """Shows ``[#####-----] 7/26 1m10s dbservice · write``.

    On a terminal it redraws one line; elsewhere (CI logs, a pipe) it prints
    one line per cell.
    """

    WIDTH = 24

    def __init__(self, total, stream=None):
        self.total = total
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.started = time.monotonic()
        self.tty = self.stream.isatty()

    def begin(self, label):
        """A new cell starts; the ones before it are done."""
        self._draw(label)

    def end(self, count=1):
        """*count* cells are done (or will not run)."""
        self.done = min(self.total, self.done + count)

    def close(self):
        self._draw("done")
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _draw(self, label):
        filled = self.WIDTH * self.done // max(1, self.total)
        elapsed = int(time.monotonic() - self.started)
        line = "[%s%s] %d/%d %dm%02ds %s" % (
            "#" * filled,
            "-" * (self.WIDTH - filled),
            self.done,
            self.total,
            elapsed // 60,
            elapsed % 60,
            label,
        )
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
