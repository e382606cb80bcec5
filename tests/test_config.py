"""Declared constraints: one validator, one message, naming what the caller wrote."""

import pytest
from conftest import run_cli

from featcache.config import (
    CONSTRAINTS,
    ConfigError,
    Constraint,
    check_value,
    constraints_of,
    list_task_configs,
    resolve_config,
)
from featcache.errors import called_from, option

TASKS = list_task_configs()


@pytest.mark.parametrize("task", TASKS)
def test_every_invalid_value_generated_from_the_declared_constraints_is_refused_in_one_format(task):
    declared = constraints_of(task)
    assert set(CONSTRAINTS) <= set(declared)
    base = resolve_config(task)
    checked = 0
    for key, c in declared.items():
        section, _, name = key.partition(".")
        if name not in (base.get(section) or {}):
            continue  # a common key this task does not have (e.g. training.patience)
        assert c.accepts(base[section][name]), f"{task}: the default {key}={base[section][name]!r} breaks {c.spec}"
        for bad in c.invalid_examples():
            with pytest.raises(ConfigError) as err:
                resolve_config(task, sets={key: bad})
            msg = str(err.value)
            # either the type check of the default's type, or the declared constraint, in its format
            assert msg.startswith(f"sets={{{key!r}: {bad!r}}}: {key} must be "), msg
            checked += 1
    assert checked >= 10


def test_constraint_texts_and_bounds_against_a_plain_check():
    cases = {"int >= 1": [(1, True), (0, False), (1.0, True), (1.5, False), (True, False), ("1", False)],
             "float in (0, 1]": [(1, True), (0, False), (0.5, True), (1.01, False), (float("nan"), False)],
             "float > 0 or null": [(None, True), (0, False), (1e-9, True)],
             "one of best, last": [("best", True), ("worst", False)],
             "float < 10": [(9.99, True), (10, False)]}
    for spec, values in cases.items():
        c = Constraint.parse(spec)
        assert [c.accepts(v) for v, _ in values] == [ok for _, ok in values], spec
    assert Constraint.parse("float in (0, 1]").text() == "a number > 0 and <= 1"
    assert Constraint.parse("int >= 1").text() == "an integer >= 1"
    with pytest.raises(ConfigError, match="is not one of"):
        Constraint.parse("positive please")


def test_messages_name_what_the_caller_wrote(tmp_path):
    with pytest.raises(ConfigError, match=r"^sets=\['training.epochs=0'\]: training.epochs must be an integer >= 1; got 0$"):
        resolve_config("stage2", sets=["training.epochs=0"])
    with called_from("cli"):
        with pytest.raises(ConfigError, match=r"^--set training.lr=-1: training.lr must be a number > 0; got -1"):
            resolve_config("stage2", sets=["training.lr=-1"])
        assert option("overwrite") == "--overwrite" and option("stage1", "RUN") == "--stage1 RUN"
    assert option("overwrite") == "overwrite=True"
    assert option("stage1", "RUN", python="options={'stage1': RUN}") == "options={'stage1': RUN}"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("selection:\n  rule: worst\n")
    with pytest.raises(ConfigError, match=r"config_file='.*c.yaml': selection.rule must be one of best, last; got 'worst'"):
        resolve_config("stage2", config_file=cfg)
    # the command line says --set, and the message is one line with exit status 2
    proc = run_cli("train-head", "stage2", "--cache", tmp_path, "--out", tmp_path / "r", "--set",
                   "training.batch_size=0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --set training.batch_size=0: training.batch_size must be an integer >= 1; "
                                   "got 0"), proc.stderr


def test_sets_of_the_wrong_shape_are_refused_not_iterated():
    with pytest.raises(ConfigError, match=r"sets= takes a list .*got the string 'training.epochs=5'"):
        resolve_config("stage2", sets="training.epochs=5")
    assert resolve_config("stage2", sets={"training.epochs": 7})["training"]["epochs"] == 7
    assert resolve_config("stage2", sets=("training.epochs=8",))["training"]["epochs"] == 8
    with pytest.raises(ConfigError, match="takes 'section.key=value' strings; got 5"):
        resolve_config("stage2", sets=[5])
    check_value("x.y", 3, "int >= 1", "here")
    with pytest.raises(ConfigError, match="^here: x.y must be an integer >= 1; got 0$"):
        check_value("x.y", 0, "int >= 1", "here")
