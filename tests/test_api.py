"""The Python surface: ``import featcache`` is light, its names are the library's, load_run reads a run."""

import json
import subprocess
import sys

import pandas as pd
import pytest

import featcache
from featcache.errors import FeatcacheError


def test_import_featcache_does_not_import_torch_and_the_surface_is_the_librarys():
    code = "import sys, featcache; assert 'torch' not in sys.modules; print(sorted(featcache.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "load_run" in out and "train_head" in out
    from featcache.extract import extract
    from featcache.train import train_head
    assert featcache.extract_features is extract and featcache.train_head is train_head
    assert set(featcache.__all__) <= set(dir(featcache))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        featcache.nope  # noqa: B018


def test_load_run_reads_what_the_run_wrote(stage2_run, tmp_path):
    run = featcache.load_run(stage2_run)
    assert run.config["task"] == "stage2" and run.config["preset"] == "none"
    summary = json.loads((stage2_run / "summary.json").read_text())
    assert run.summary == summary
    assert run.metrics("test") == json.loads((stage2_run / "eval" / "test" / "metrics.json").read_text())
    assert run.metric("test", "auc") == summary["test"]["auc"]
    preds = run.predictions("test")
    assert len(preds) == run.metrics("test")["n"] and set(preds["label"]) == {0, 1}
    assert {"test", "val"} <= set(run.evaluations())
    with pytest.raises(FeatcacheError, match=r"no evaluation 'celebdf_test'.*evaluations: .*test"):
        run.metrics("test", "celebdf")
    with pytest.raises(FeatcacheError, match="no metric 'nope'"):
        run.metric("test", "nope")
    with pytest.raises(FeatcacheError, match="not a featcache run directory"):
        featcache.load_run(tmp_path)
    assert isinstance(preds, pd.DataFrame)
