"""Progress bars off a terminal: a handful of whole lines, not one per refresh (issue 15).

conftest sets TQDM_DISABLE=1; the package always passes ``disable=not progress``, and so do these
tests (``disable=False``), which overrides it.
"""

import io
import types

import tqdm.std as tqdm_std

from featcache import progress
from featcache.progress import LogBar, bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_fast_loop_off_a_terminal_writes_a_handful_of_lines():
    stream = io.StringIO()
    b = bar(range(10_000), desc="train", unit="step", file=stream, disable=False)
    for _ in b:
        b.set_postfix(loss=0.25)  # a refresh per step on a terminal
    lines = stream.getvalue().splitlines()
    assert isinstance(b, LogBar) and 1 <= len(lines) <= 3
    assert "\r" not in stream.getvalue()
    assert lines[-1].startswith("train: 100%") and "10000/10000" in lines[-1] and "loss=0.25" in lines[-1]


def test_long_loop_writes_one_line_per_interval_and_a_summary(monkeypatch):
    # A clock the test moves (20 ms a step, 50 ms interval), for the bar and for tqdm inside it:
    # the count of lines is then exact on any machine.
    now = [1000.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(tqdm_std, "time", lambda: now[0])
    stream = io.StringIO()
    with bar(total=40, desc="extract", file=stream, log_interval=0.05, disable=False) as b:
        for _ in range(40):
            now[0] += 0.02
            b.update(1)
    lines = stream.getvalue().splitlines()
    # a line when 50 ms have passed since the last one: after steps 3, 6, ..., 39 (13), then the summary
    assert len(lines) == 14  # one per interval and the summary, not one per step
    assert "40/40" in lines[-1] and len(set(lines)) == len(lines)


def test_terminal_gets_tqdm_and_quiet_gets_nothing():
    term = _Terminal()
    b = bar(range(3), file=term, disable=False)
    assert not isinstance(b, LogBar)
    list(b)
    assert "\r" in term.getvalue()  # tqdm's own redrawn bar
    quiet = io.StringIO()
    list(bar(range(10_000), file=quiet, disable=True))
    assert quiet.getvalue() == ""
    inner = io.StringIO()
    with bar(total=5, file=inner, leave=False, disable=False) as b:  # a transient inner bar leaves nothing behind
        b.update(5)
    assert inner.getvalue() == ""


def test_library_bars_hide_hugging_face_bars_with_quiet_and_restore_them():
    """`-q` hides transformers' own "Loading weights" bar (extract/finetune-detr load inside this block)."""
    import transformers.utils.logging as tl
    from huggingface_hub import utils as hub

    from featcache.progress import library_bars

    hub.enable_progress_bars()
    tl.enable_progress_bar()
    with library_bars(True):
        assert tl.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
    with library_bars(False):
        assert not tl.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
        shown = io.StringIO()
        for _ in tl.tqdm(range(3), desc="Loading weights", file=shown, disable=False):
            pass
        assert shown.getvalue() == ""  # transformers' factory hands out its empty bar
    assert tl.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()  # as before the block
    hub.disable_progress_bars()  # a user's own setting (HF_HUB_DISABLE_PROGRESS_BARS) is kept
    tl.disable_progress_bar()
    with library_bars(False):
        pass
    assert hub.are_progress_bars_disabled() and not tl.is_progress_bar_enabled()
    hub.enable_progress_bars()
    tl.enable_progress_bar()
