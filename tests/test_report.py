"""What a user reads: the ablation plot and table, metric formatting, rounded CSVs (issues 15 and 19)."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from PIL import Image

from featcache.metrics import all_metrics
from featcache.metrics.compare import paired_differences
from featcache.report.plots import plot_ablation, plot_training_curves
from featcache.report.tables import (
    METRIC_MEANINGS,
    ablation_table,
    decision_marks,
    format_metric,
    metric_legend,
    metrics_line,
    write_csv_rounded,
)


def _ablation(degenerate_preset="ldam", one_sided_preset="full"):
    rng = np.random.default_rng(0)
    rows = []
    for preset, auc, f_fpr, excess in (("none", 0.80, 30.0, 2.0), ("ldam", 0.81, 29.0, 1.5), ("full", 0.79, 12.0, -8.0)):
        for seed in range(3):
            rows.append({"preset": preset, "seed": seed, "test_auc": auc + 0.01 * rng.normal(),
                         "test_f_fpr": f_fpr + rng.normal(), "test_f_fpr_excess": excess + rng.normal(),
                         "test_acc": 0.7 + 0.01 * rng.normal(),
                         "test_degenerate": preset == degenerate_preset and seed == 0,
                         "test_one_sided": preset == one_sided_preset and seed > 0})
    return pd.DataFrame(rows)


def test_ablation_plot_shows_each_preset_with_sd_error_bars(tmp_path):
    df = _ablation()
    fig = plot_ablation(df, tmp_path / "a.png", title="stage2 ablation: runs/abl")
    assert Image.open(tmp_path / "a.png").format == "PNG"
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # one marker with error bars per preset
    for container, (_, g) in zip(bars, df.groupby("preset", sort=False)):
        line, _, (xbar, ybar) = container
        (mx,), (my,) = line.get_data()
        assert (mx, my) == (pytest.approx(g["test_f_fpr"].mean()), pytest.approx(g["test_auc"].mean()))
        # the vertical bar spans mean ± the sample sd over seeds
        seg = ybar.get_segments()[0]
        assert seg[1, 1] - seg[0, 1] == pytest.approx(2 * g["test_auc"].std(ddof=1))
        seg = xbar.get_segments()[0]
        assert seg[1, 0] - seg[0, 0] == pytest.approx(2 * g["test_f_fpr"].std(ddof=1))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none (n=3)", "ldam (n=3)", "full (n=3)"]
    assert "stage2 ablation: runs/abl" in ax.get_title() and "sd over seeds" in ax.get_title()
    assert "F_FPR" in ax.get_xlabel() and "sum over subgroups" in ax.get_xlabel()
    # the single runs are there too, faintly: 9 points
    assert sum(len(c.get_offsets()) for c in ax.collections if c.get_offsets().ndim == 2) >= 9


def test_training_curves_carry_the_title(tmp_path):
    log = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.7, 0.5], "val_auc": [0.6, 0.7], "score": [0.6, 0.7]})
    fig = plot_training_curves(log, tmp_path / "c.png", best_epoch=2, title="stage2 full seed 0")
    assert fig._suptitle.get_text() == "stage2 full seed 0"


def test_ablation_table_means_sd_differences_and_legend():
    df = _ablation()
    diffs = paired_differences(df, ["test_auc", "test_f_fpr_excess", "test_f_fpr", "test_acc"], baseline="none")
    md = ablation_table(df, diffs, title="stage2")
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| preset | n |"))
    assert header == "| preset | n | auc | acc | f_fpr | f_fpr−floor |"
    full = next(line for line in lines if line.startswith("| full | 3 |"))
    g = df[df.preset == "full"]
    assert f"{g['test_auc'].mean():.3f} ± {g['test_auc'].std(ddof=1):.3f}" in full
    assert f"{g['test_f_fpr'].mean():.1f} ± {g['test_f_fpr'].std(ddof=1):.1f}" in full
    # the degenerate run of "ldam" is left out of its fairness means, counted and marked; the note says why
    ldam = next(line for line in lines if line.startswith("| ldam | 3 |"))
    used = df[(df.preset == "ldam") & (df.seed > 0)]
    assert f"{used['test_f_fpr'].mean():.1f} ± {used['test_f_fpr'].std(ddof=1):.1f} (2/3) †1" in ldam.split("|")[5]
    assert "†" not in ldam.split("|")[3]
    assert any("0 by construction" in line and "left out" in line for line in lines)
    # two one-sided runs of "full": its fairness cell says so too (its F_FPR drop is partly a threshold)
    assert "‡2" in full.split("|")[5] and "‡" not in full.split("|")[3] and "‡" not in ldam
    assert any(line.startswith("‡ k:") and "compare auc" in line for line in lines)
    # paired differences: full's drop of F_FPR − floor (-10) is beyond the noise, marked after Holm over the
    # two presets; its raw F_FPR drop (-18) gets an interval but no `*` (the raw gap moves with the threshold)
    d = diffs.set_index(["preset", "metric"])
    header = next(line for line in lines if line.startswith("| preset | n | Δ"))
    assert header == "| preset | n | Δ auc | Δ f_fpr−floor | Δ f_fpr | Δ acc |"
    dfull = next(line for line in lines if line.startswith("| full | 3 | ") and "[" in line)
    r = d.loc[("full", "test_f_fpr_excess")]
    assert f"{r['mean']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}] *" in dfull and r["m"] == 1
    raw = d.loc[("full", "test_f_fpr")]
    assert raw["hi"] < 0 and f"{raw['mean']:+.1f} [{raw['lo']:+.1f}, {raw['hi']:+.1f}] |" in dfull
    # ldam: its degenerate seed leaves two: an interval, no verdict, and the line under the table says why
    dldam = next(line for line in lines if line.startswith("| ldam | 3 | ") and "[" in line)
    assert "(2/3)" in dldam.split("|")[4] and "*" not in dldam.split("|")[4]
    assert "- 2 seeds: too few seeds for a verdict (the interval is shown, no `*`)" in lines
    assert any(line.startswith("- `*`: Holm over m presets per metric: auc 2, f_fpr−floor 1") for line in lines)
    assert any(line.startswith("- no `*` on f_fpr:") for line in lines)
    assert any("interval over seeds only" in line for line in lines)  # no predictions given here
    assert "Δ f_fpr" in md and "paired difference to `none`" in md
    same = pd.DataFrame({"preset": ["none"] * 2 + ["cvar"] * 2, "seed": [0, 1] * 2, "test_eer": [0.2, 0.2, 0.1, 0.1]})
    assert "| cvar | 2 | -0.100 (every seed) |" in ablation_table(same, paired_differences(same, ["test_eer"]))
    # every column's meaning once: F_FPR as a sum in percentage points, ± as the sd over seeds, n, the floor,
    # Holm and what the interval covers
    assert md.count("F_FPR: sum over subgroups") == 1 and "percentage points" in md
    assert "±: sample standard deviation over seeds" in md and "n: number of rows evaluated, or of runs" in md
    assert "F_FPR − floor:" in md and "floor: the gap's mean when the subgroup codes are permuted" in md
    assert "Holm's adjustment over the presets compared" in md and "at least 3 seeds" in md
    assert "covers the true difference about 95 times in 100" in md


def test_two_seeds_give_intervals_and_no_verdict():
    df = _ablation()
    df = df[(df.seed < 2)].assign(test_degenerate=False)
    md = ablation_table(df, paired_differences(df, ["test_auc", "test_f_fpr_excess"]))
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert "too few seeds for a verdict" in md and not any(line.endswith(" * |") or " * |" in line for line in table)
    assert not any(line.startswith("- `*`: Holm") for line in md.splitlines())


def test_format_metric_precision_intervals_and_degenerate_mark():
    assert format_metric("auc", 0.91234) == "0.912"
    assert format_metric("test_f_fpr", 212.4567) == "212.5"
    assert format_metric("auc", float("nan")) == "n/a"
    assert format_metric("n", 1200) == "1200" and format_metric("tp", 3.0) == "3"
    assert format_metric("auc", 0.9, ci=[0.88, 0.93]) == "0.900 [0.880, 0.930]"
    assert format_metric("f_fpr", 0.0, degenerate=True) == "0.0 (degenerate)"
    assert format_metric("auc", 0.5, degenerate=True) == "0.500"  # only fairness metrics are void
    assert format_metric("f_meo", 4.5, one_sided=True) == "4.5 (one-sided)"
    y, score = [0, 1, 0, 1], [2.0, 3.0, 2.8, 2.5]  # every sample predicted fake; 3 of 4 pairs ordered
    m = all_metrics(y, score, groups=[0, 0, 1, 1])
    line = metrics_line(m, ["auc", "f_fpr"], ci={"auc": [0.1, 0.9]})
    assert line == "auc 0.750 [0.100, 0.900], f_fpr 0.0 (degenerate)"


def test_every_reported_metric_has_a_meaning():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    m = all_metrics(y, rng.normal(size=40), groups=rng.integers(0, 3, 40),
                    identity=[f"{label}-{i % 7}" for i, label in enumerate(y)])  # a video has one label
    assert "video_auc" in m
    missing = [k for k in m if k not in METRIC_MEANINGS and k not in ("tp", "fp", "tn", "fn", "remarks")]
    assert missing == []
    assert metric_legend(["test_auc", "val_auc", "±"]).count("\n") == 2  # each meaning once


def test_csv_rounded_json_full(tmp_path):
    df = pd.DataFrame({"preset": ["a"], "test_auc": [0.912345678], "test_f_fpr": [212.456789], "seed": [1]})
    write_csv_rounded(df, tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv")
    assert back["test_auc"].iloc[0] == 0.9123 and back["test_f_fpr"].iloc[0] == 212.46 and back["seed"].iloc[0] == 1
    assert df["test_auc"].iloc[0] == 0.912345678  # the caller's frame is untouched


def test_fairness_gaps_print_their_floor_p_value_and_coverage():
    m = {"auc": 0.912, "f_fpr": 48.4, "f_meo": 20.04, "ci95": {"auc": [0.897, 0.925]},
         "fairness_null": {"f_fpr": {"floor": 52.1, "p": 0.61}, "f_meo": {"floor": 12.0, "p": 0.000999}},
         "fairness_coverage": {"rows": 160, "of_rows": 192, "subgroups": 4, "of_subgroups": 8, "unavailable": False}}
    assert metrics_line(m, ["auc", "f_fpr", "f_meo"]) == (
        "auc 0.912 [0.897, 0.925], f_fpr 48.4 (floor 52.1, p 0.61), f_meo 20.0 (floor 12.0, p 0.001), "
        "fairness over n 160 of 192, 4 of 8 subgroups")
    whole = {**m, "fairness_coverage": {"rows": 192, "of_rows": 192, "subgroups": 8, "of_subgroups": 8}}
    assert metrics_line(whole, ["f_fpr"]) == "f_fpr 48.4 (floor 52.1, p 0.61)"
    assert metrics_line(m, ["auc"]) == "auc 0.912 [0.897, 0.925]"  # no gap printed: no coverage either
    none = {"auc": 0.9, "fairness_coverage": {"unavailable": True}}
    assert metrics_line(none, ["auc", "f_fpr"]) == "auc 0.900, f_fpr n/a (no demographics)"
    null = m["fairness_null"]
    assert format_metric("f_fpr", 0.0, degenerate=True, fairness_null=null) == "0.0 (degenerate)"
    assert format_metric("test_f_fpr", 48.4, one_sided=True, fairness_null=null) == "48.4 (floor 52.1, p 0.61; one-sided)"
    assert format_metric("auc", 0.9, fairness_null=null) == "0.900"
    # the legends say what an interval, a floor and a p-value mean
    assert "covers the detector's true value about 95 times in 100" in METRIC_MEANINGS["ci95"]
    assert "only about 83 times in 100" in METRIC_MEANINGS["ci95"]
    assert "permuted" in METRIC_MEANINGS["floor"] and "no proof of fairness" in METRIC_MEANINGS["p"]
    # a report's legend (evaluate's: the names of the marks that are on) explains them
    legend = metric_legend(["f_fpr", *(k for k, on in decision_marks(m).items() if on)])
    assert "floor: the gap's mean" in legend and "p: the share of permutations" in legend
    assert "fairness over n a of b" in legend
