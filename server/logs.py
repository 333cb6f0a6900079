"""Log records no request can forge: the formatter every ``optic`` command logs through."""

from __future__ import annotations

import logging
import re

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
