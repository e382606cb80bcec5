"""Progress bars that stay readable when nobody watches a terminal (the bottom layer).

:func:`bar` takes tqdm's arguments and returns a tqdm bar:

- on a terminal (or in a notebook): tqdm's own bar (``tqdm.auto``), unchanged;
- elsewhere (stderr redirected to a file, CI, ``nohup``, SLURM): a bar that prints plain lines,
  one every ``log_interval`` seconds at most (10 s by default, or ``FEATCACHE_PROGRESS_INTERVAL``),
  nothing for a loop shorter than that, and one final summary line when it closes (the count,
  elapsed time, rate and postfix), so a log holds a handful of lines, not one per refresh;
- with ``disable=True`` (``--quiet``): nothing at all.

``TQDM_DISABLE=1`` and tqdm's other ``TQDM_*`` variables still apply.

:func:`library_bars` turns the Hugging Face libraries' own bars (transformers' "Loading weights",
hub downloads) off with featcache's, so ``--quiet`` hides them too.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

#: Seconds between two lines of a bar off a terminal.
LOG_INTERVAL = 10.0


def bar(iterable=None, *, log_interval: float | None = None, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or with ``total=``) that suits where stderr goes (module docstring)."""
    stream = kwargs.pop("file", None) or sys.stderr
    if kwargs.get("disable") or _interactive(stream):
        return auto_tqdm(iterable, file=stream, **kwargs)
    if log_interval is None:
        log_interval = float(os.environ.get("FEATCACHE_PROGRESS_INTERVAL", LOG_INTERVAL))
    return LogBar(iterable, file=_Lines(stream), log_interval=log_interval, **kwargs)


@contextmanager
def library_bars(enabled: bool):
    """Within the block, Hugging Face's own progress bars are off unless ``enabled``; their state
    before it comes back after (transformers reads the hub's setting when it is first imported,
    so a block that imports it leaves it as it would have been)."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub

    hub_was_off = hub.are_progress_bars_disabled()
    tl = sys.modules.get("transformers.utils.logging")
    tl_was_on = tl.is_progress_bar_enabled() if tl is not None else not hub_was_off
    hub.disable_progress_bars()
    if tl is not None:
        tl.disable_progress_bar()
    try:
        yield
    finally:
        tl = sys.modules.get("transformers.utils.logging")
        if tl is not None and tl_was_on:
            tl.enable_progress_bar()
        if hub_was_off:
            hub.disable_progress_bars()
        else:
            hub.enable_progress_bars()


def _interactive(stream) -> bool:
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws its widget
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Lines:
    """A stream that drops tqdm's cursor-only writes (bare ``\\r`` and ``\\n``) so lines stay lines."""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)

    def write(self, s: str) -> None:
        if s.strip("\r\n"):
            self.stream.write(s)

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()


class LogBar(tqdm):
    """tqdm printing whole lines at most every ``log_interval`` seconds, and a last one on close."""

    def __init__(self, iterable=None, *args, log_interval: float = LOG_INTERVAL, **kwargs):
        self.log_interval = float(log_interval)
        self._line_t = time.time()  # time of the last line written; the start counts as one
        self._line_n = None  # the count shown by the last line
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("dynamic_ncols", False)
        kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.0), self.log_interval)
        super().__init__(iterable, *args, **kwargs)

    def refresh(self, nolock=False, lock_args=None):
        """Display only when ``log_interval`` has passed since the last line (or the start)."""
        if self.disable or time.time() - self._line_t < self.log_interval:
            return False
        return super().refresh(nolock=nolock, lock_args=lock_args)

    def display(self, msg=None, pos=None):
        if msg == "" or (msg is None and self.n == self._line_n):  # a clear, or nothing new to say
            return True
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        self._line_t, self._line_n = time.time(), self.n
        return True

    def clear(self, nolock=False):
        """Nothing to clear: lines already written stay."""
