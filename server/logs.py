"""Log records no request can forge: the formatter every ``optic`` command logs through."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

# C0/C1 controls except tab and newline, DEL, and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class EscapingFormatter(logging.Formatter):
    """Log records that no request can forge or garble: control characters (ANSI escapes, carriage
    returns) are written as ``\\xNN``, and every continuation line (tracebacks) is indented, so only a
    real record starts a line with its timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        text = _CONTROL.sub(_escape, super().format(record))
        return text.replace("\n", "\n    ")


class RateLimit(logging.Filter):
    """At most ``burst`` warnings (and worse) per call site (logger, level, file and line) per ``seconds``.

    A client that can make a call fail the same way (an INTERNAL error, a
    failing batch) could otherwise write log lines, and tracebacks, as fast as
    it sends. The first record after a quiet spell says how many were dropped.
    """

    def __init__(self, burst: int = 20, seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.seconds, self._clock = burst, seconds, clock
        self._sites: OrderedDict[tuple[str, int, str, int], tuple[float, int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:  # what the server says on its own: start, loads, drain
            return True
        # The call site, not the text: some messages arrive formatted, with a new object's name in each.
        key = (record.name, record.levelno, record.pathname, record.lineno)
        now = self._clock()
        with self._lock:
            start, count, dropped = self._sites.pop(key, (now, 0, 0))
            if now - start >= self.seconds:
                start, count = now, 0
            keep = count < self.burst
            if keep:
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this dropped]"
                count, dropped = count + 1, 0
            else:
                dropped += 1
            self._sites[key] = (start, count, dropped)
            while len(self._sites) > 1000:  # call sites are few; this bounds the table whatever happens
                self._sites.popitem(last=False)
        return keep
