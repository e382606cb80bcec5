"""The CLI's help lists every registered name; ``-q`` is accepted after every command; the
README's walkthrough is a script whose every step has its output checked (``make walkthrough``
runs it; here only its extraction, which is fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from featcache.cache.synth import synth_feature_cache
from featcache.cli import cli
from featcache.config import presets_of
from featcache.data.adapters import list_adapters
from featcache.extract.registry import BACKBONES
from featcache.heads.task import list_tasks

sys.path.insert(0, str(Path(__file__).parent))
import walkthrough  # noqa: E402


def _help(*args: str) -> str:
    r = CliRunner().invoke(cli, [*args, "--help"], terminal_width=100)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())  # wrapped lines joined


def test_help_lists_every_registered_name():
    tasks = list_tasks()
    assert "faap" in tasks and "stage2" in tasks
    for text in (_help("train-head"), _help("ablate")):
        for task in tasks:
            assert f"{task}: {', '.join(presets_of(task))}" in text, task  # every preset, per task
    assert f"TASK is one of: {', '.join(tasks)}." in _help("train-head")
    assert f"FORMAT is one of: {', '.join(list_adapters())}." in _help("manifest")
    extract = _help("extract")
    for name in BACKBONES.names():
        presets = BACKBONES.get(name).presets
        assert (f"{name} (offline presets: {', '.join(presets)})" if presets else name) in extract
    assert "clip (offline presets: tiny, small)" in extract
    assert f"an offline preset ({', '.join(BACKBONES.get('detr').presets)}: random" in _help("finetune-detr")
    assert "an offline preset (tiny, tiny-det: random" in _help("finetune-detr")
    group = _help("analyze")
    for name in cli.commands["analyze"].commands:
        assert name in group
    # the placeholders are filled only while the help is shown
    assert "{tasks}" in cli.commands["train-head"].help


def _leaves(group: click.Group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _leaves(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_every_command_accepts_quiet_after_it():
    missing = [" ".join(p) for p, cmd in _leaves(cli) if not any("--quiet" in o.opts for o in cmd.params)]
    assert missing == []


def test_quiet_turns_off_the_libraries_progress_bars_too(monkeypatch):
    """`featcache -q evaluate DETR_RUN` printed transformers' "Loading weights" bar."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    from featcache.cli import State

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    hub.enable_progress_bars()
    try:
        State(quiet=False, debug=False)
        assert hf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
        State(quiet=True, debug=False)
        assert not hf_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
        import os

        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for a library imported later
    finally:
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
        hf_logging.enable_progress_bar()
        hub.enable_progress_bars()


def test_analyze_map_quiet(tmp_path):
    synth_feature_cache(tmp_path / "c", rows=64, dim=8, part_rows=64)
    out = tmp_path / "map.png"
    r = CliRunner().invoke(cli, ["analyze", "map", "--cache", str(tmp_path / "c"), "--method", "pca", "--out",
                                 str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0 and "(pca, 64 points)" in r.output


def test_walkthrough_script_checks_each_step():
    blocks = walkthrough.walkthrough_blocks()
    lines = walkthrough.commands(blocks)
    used = [w for line in lines for w in line.split()]
    # the chain the README promises, in order
    order = ["synth", "manifest", "extract", "verify", "stage1", "stage2", "evaluate", "ablate", "subgroups",
             "mnv4", "calibrate", "cascade", "xai", "prototypes", "finetune-detr", "faap"]
    positions = [used.index(word) for word in order]
    assert positions == sorted(positions)
    text = walkthrough.script(blocks)
    assert "test -e runs/s2-full/summary.json ||" in text and "test -e runs/cascade ||" in text
    assert subprocess.run(["bash", "-n", "-c", text]).returncode == 0
    assert walkthrough.expected_outputs("featcache analyze prototypes runs/xai") == ["runs/xai/prototypes/prototypes.json"]
    assert walkthrough.expected_outputs("echo hi") == []


@pytest.mark.parametrize("bad", ["featcache train-head stage2 --cache c --out r", "featcache synth faces d"])
def test_walkthrough_detects_a_missing_output(tmp_path, bad):
    # a stand-in featcache that exits 0 and writes nothing: the inserted check must fail, naming the step
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "featcache").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "featcache").chmod(0o755)
    text = walkthrough.script([bad + "\n"])
    r = subprocess.run(["bash", "-c", f"export PATH={bin_dir}:$PATH\n{text}"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "step 1 left no" in r.stderr
