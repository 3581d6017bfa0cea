"""Text and JSON that come from files or the network: parsed with bounds, and made safe to print or store.

Everything fracgen shows or records passes through here, so a manifest, a lock file or a server cannot move the
terminal's cursor, inject rich markup, spread one error over many lines, or get a password echoed into a log.
"""

from __future__ import annotations

import json
import os
import re
import stat
import unicodedata
from pathlib import Path

from fracgen.errors import FracgenError

MAX_JSON_BYTES = 1 << 28  # a manifest holds every class's system: 0.7 MB at 1000 classes, ~70 MB at the 100,000 max
MAX_WORD = 200  # characters of one name (a path, a URL) in a printed line; longer ones keep their two ends

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]*@")
_QUERY = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s?#]*)\?[^\s#]*")
_WORD = re.compile(rf"\S{{{MAX_WORD + 1},}}")


def redact(text: str) -> str:
    """`text` with the secrets URLs may carry replaced by ***: a user:password@ and a (signed) query string."""
    return _QUERY.sub(r"\1?***", _USERINFO.sub(r"\1***@", text))


def _visible(ch: str) -> str:
    if ch in "\n\r\t":
        return " "  # one message, one line
    if unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn") and ch != " ":
        # control characters move the cursor or recolour a terminal; format characters (bidi overrides) reorder
        # what is shown
        return ascii(ch)[1:-1]
    return ch


def without_controls(text: object) -> str:
    """`text` with its line breaks kept and every other control or format character written as an escape: a block
    of lines (a command) shown as it is, nothing in it able to move a terminal's cursor."""
    return "".join(ch if ch == "\n" else _visible(ch) if ch not in "\t" else ch for ch in str(text))


def printable(text: object) -> str:
    """`text` as one line a terminal shows as it is: secrets in URLs redacted, control and format characters
    written as escapes, and names longer than MAX_WORD characters cut in the middle. Rich markup is the
    printer's to escape (`rich.markup.escape`)."""
    text = "".join(_visible(ch) for ch in redact(str(text)))
    return _WORD.sub(lambda m: f"{m.group()[:MAX_WORD // 2]}...{m.group()[-MAX_WORD // 4:]}", text)


def parse_json(data: bytes | str, what: str, max_bytes: int = MAX_JSON_BYTES) -> object:
    """JSON from a file or a server, or one FracgenError line naming `what`: bounded in size (`max_bytes`) and in
    nesting (the parser's recursion limit, ~1000 levels, is reported instead of crashing)."""
    if len(data) > max_bytes:
        raise FracgenError(f"{what} is larger than the {max_bytes:,} bytes fracgen reads")
    try:
        return json.loads(data)
    except RecursionError:
        raise FracgenError(f"{what} is not usable: its JSON is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FracgenError(f"{what} is not valid JSON: {e}") from None


def read_json(path: str | Path, what: str | None = None, max_bytes: int = MAX_JSON_BYTES) -> object:
    """`parse_json` of a file, reading no more than `max_bytes` + 1 bytes of it."""
    what = what or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FracgenError(f"{what} is unreadable: {e.strerror or e}") from None
    return parse_json(data, what, max_bytes)


def open_regular(path: str | Path, what: str | None = None):
    """`path` opened for reading (binary) only if it is a regular file, itself and not through a link: a link to
    /dev/zero never ends, and a FIFO blocks the open itself (hence O_NONBLOCK, harmless on a regular file).
    FileNotFoundError as open() raises it; anything else not readable is one FracgenError line."""
    what = what or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a link
        raise FracgenError(f"{what} is {'a link' if os.path.islink(path) else 'unreadable'} "
                           f"({e.strerror or e}): not read") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FracgenError(f"{what} is not a regular file (a FIFO, device or folder): not read")
    return os.fdopen(fd, "rb")
