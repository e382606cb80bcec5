"""Declared constraints: one validator, one message, naming what the caller wrote."""

import copy
import pickle
import typing
from dataclasses import MISSING, fields

import pytest
from conftest import run_cli

from featcache.config import (
    COMMON_SECTIONS,
    CONSTRAINTS,
    OLDER_DEFAULTS,
    Config,
    ConfigError,
    ConfigKeyError,
    Constraint,
    check_value,
    constraints_of,
    list_task_configs,
    load_config,
    resolve_config,
    save_config,
    without_keys,
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
    # a shortcut option (train-e2e's --epochs, finetune-detr's --lr) is named as typed, from either side
    proc = run_cli("train-e2e", "mnv4", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "e", "--epochs", "0",
                   check=False)
    assert (proc.returncode, proc.stderr.strip()) == (2, "error: --epochs 0: training.epochs must be an integer >= 1; got 0")
    proc = run_cli("finetune-detr", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "d", "--lr", "0", check=False)
    assert (proc.returncode, proc.stderr.strip()) == (2, "error: --lr 0.0: training.lr must be a number > 0; got 0.0")
    from featcache.e2e import train_e2e
    from featcache.e2e.detr_finetune import finetune_detr

    with pytest.raises(ConfigError, match=r"^batch_size=0: training.batch_size must be an integer >= 2; got 0$"):
        train_e2e(tmp_path / "m.csv", tmp_path / "e", batch_size=0)
    with pytest.raises(ConfigError, match=r"^epochs=0: training.epochs must be an integer >= 1; got 0$"):
        finetune_detr(tmp_path / "m.csv", tmp_path / "d", epochs=0)
    assert not (tmp_path / "e").exists() and not (tmp_path / "d").exists()  # refused before anything is written


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


# -- the typed settings (config.Config) ----------------------------------------------------------------------
def _yaml_sections(task):
    import yaml

    from featcache.config import config_path

    raw = yaml.safe_load(config_path(task).read_text())
    return {k: v for k, v in raw.items() if isinstance(v, dict) and k not in ("presets", "constraints")}


@pytest.mark.parametrize("task", TASKS)
def test_every_setting_reads_as_its_declared_type(task):
    conf = Config.of(resolve_config(task))
    hints = {name: typing.get_type_hints(cls) for name, cls in COMMON_SECTIONS.items()}
    for name, cls in COMMON_SECTIONS.items():
        section = getattr(conf, name)
        assert isinstance(section, cls)
        for f in fields(cls):
            kind = hints[name][f.name]
            assert isinstance(getattr(section, f.name), typing.get_args(kind) or kind), (task, name, f.name)
    for name, values in _yaml_sections(task).items():
        section = getattr(conf, name)
        for key, default in values.items():
            value = getattr(section, key)
            if isinstance(default, list):
                assert isinstance(value, tuple) and list(value) == default
            elif default is not None and not (default == "auto" and not isinstance(value, str)):
                assert type(value) is type(default), (task, name, key, value, default)
    assert conf.task == task and conf.preset == resolve_config(task)["preset"]


def test_the_image_tasks_settings_are_typed_too():
    """The filter and the DETR fine-tune (their YAMLs: configs/mnv4.yaml, configs/detr.yaml) are typed as
    every own task is (the test above runs for each); the values their code reads, as it reads them."""
    assert {"mnv4", "detr"} <= set(TASKS)
    m = Config.of(resolve_config("mnv4", sets=["training.num_workers=2", "evaluation.batch_size=64.0"]))
    assert (m.model.image_size, m.model.geometry, m.training.num_workers, m.evaluation.batch_size) == (256, "design", 2, 64)
    assert type(m.evaluation.batch_size) is int and m.training.mixed_precision is False and m.training.augment is True
    assert m.evaluation.thresholds == (0.9, 0.95, 0.98, 0.99) and m.training.amp_dtype == "fp16"
    d = Config.of(resolve_config("detr", sets=["evaluation.categories=1"]))
    assert d.training.split == "train" and d.selection.score == "0" and d.selection.rule == "last"
    assert d.evaluation.categories == "1" and d.training.grad_clip == 0.1 and d.model.name == "tiny"


def test_settings_are_cast_once_from_what_the_caller_wrote():
    conf = Config.of(resolve_config("stage2", sets=["training.lr=1", "loss.lambda_ldam=1", "model.dropout=0",
                                                    "loss.sinkhorn_blur=2"]))
    assert conf.training.lr == 1.0 and type(conf.training.lr) is float
    assert type(conf.loss.lambda_ldam) is float and type(conf.model.dropout) is float
    assert conf.loss.sinkhorn_blur == 2.0 and type(conf.loss.sinkhorn_blur) is float  # a number given for auto
    assert Config.of(resolve_config("stage2")).loss.sinkhorn_blur == "auto"  # auto stays as it is
    assert conf.training.grad_clip is None and Config.of(resolve_config("faap")).training.grad_clip == 0.1
    assert conf.model.classifier_hidden == (384, 192) and conf.loss.use_cvar is True
    assert conf.training.epochs == 50 and conf.selection.min_epoch == 11 and conf.fairness.warmup_end == 10
    assert conf.evaluation.threshold == "val_eer" and conf.logging.tensorboard is False
    assert Config.of(conf) is conf
    # a config file with a value of the wrong type: one line in the one format, naming the key
    bad = resolve_config("stage2")
    bad["training"]["epochs"] = "ten"
    with pytest.raises(ConfigError, match=r"^RUN/config.yaml: training.epochs must be an integer; got 'ten'$"):
        Config.of(bad, where="RUN/config.yaml")
    del bad["training"]["epochs"]
    with pytest.raises(ConfigError, match=r"^config: training.epochs is missing \(it must be an integer >= 1\)$"):
        Config.of(bad)


def test_a_wrong_key_names_the_valid_ones_and_the_view_is_read_only():
    conf = Config.of(resolve_config("stage2"))
    with pytest.raises(ConfigKeyError, match=r"config has no loss.lamda_ldam; did you mean loss.lambda_ldam\? "
                                             r"loss has: use_cvar, use_ldam, "):
        _ = conf.loss.lamda_ldam
    with pytest.raises(ConfigKeyError, match=r"no training.epoch; did you mean training.epochs\? training has: epochs"):
        _ = conf.training.epoch
    with pytest.raises(ConfigKeyError, match=r"no section 'trainig'; did you mean training\?"):
        _ = conf.trainig
    assert isinstance(ConfigKeyError("x"), AttributeError) and not hasattr(conf.loss, "lamda_ldam")
    assert "stage1" not in conf.options and conf.options.keys() == []  # options: keyed by name, empty here
    with pytest.raises(AttributeError):
        conf.loss.tau = 1.0
    with pytest.raises(AttributeError):
        conf.training.epochs = 3
    with pytest.raises(AttributeError):
        conf.loss = None


def test_as_dict_gives_the_plain_config_back(tmp_path):
    cfg = resolve_config("stage2", "minimal", sets=["training.epochs=12"])
    cfg.update(options={"stage1": "/runs/s1"}, inputs={"stage1": {"fingerprint": "ab", "relative": "../s1"}},
               cache={"path": "/caches/c", "fingerprint": "cd"})
    conf = Config.of(cfg)
    assert conf.as_dict() == cfg and conf.as_dict() is not cfg
    assert conf.loss.as_dict() == cfg["loss"] and conf.model.as_dict() == cfg["model"]  # tuples back to lists
    assert conf.training.as_dict() == {**cfg["training"], "patience": 0, "grad_clip": None, "schedule": "constant"}
    assert conf.options.stage1 == "/runs/s1" and conf.inputs.stage1.fingerprint == "ab" and conf.cache.path == "/caches/c"
    cfg["training"]["epochs"] = 99  # the view was built once, from a copy
    assert conf.training.epochs == 12
    save_config(conf.as_dict(), tmp_path / "config.yaml")
    assert Config.of(load_config(tmp_path / "config.yaml")) == conf
    assert pickle.loads(pickle.dumps(conf)) == conf and copy.deepcopy(conf.loss) == conf.loss


def test_a_config_written_before_a_key_existed_still_loads():
    from featcache.config import run_config_differences, with_older_defaults

    new2 = resolve_config("stage2", sets=["training.class_balance=weight"])
    old2 = without_keys(new2, ["training.class_balance", "loss.ce_weight_rule"])
    conf = Config.of(old2)
    assert conf.training.class_balance == OLDER_DEFAULTS["training.class_balance"] == "none"  # what it meant
    assert conf.loss.ce_weight_rule == "cvar"  # the task YAML's default
    # compared as what it meant: the same run as one saved with class_balance none, another than weight's
    assert run_config_differences(old2, resolve_config("stage2")) == []
    assert run_config_differences(old2, new2) == ["training.class_balance: 'none' -> 'weight'"]
    assert "probe_rows" not in with_older_defaults(old2)["selection"]  # stage2 has no such key
    old1 = resolve_config("stage1")
    del old1["selection"]["probe_rows"], old1["logging"]
    conf1 = Config.of(old1)
    assert conf1.selection.probe_rows == OLDER_DEFAULTS["selection.probe_rows"] == 0  # no per-epoch probe then
    assert conf1.logging.tensorboard is False and "probe_rows" not in conf1.as_dict()["selection"]
    # a filter run written before model.geometry (and evaluation.thresholds) existed: timm's geometry, the
    # YAML's thresholds, and its own values typed by the YAML
    filt = Config.of({"task": "mnv4", "model": {"name": "m", "image_size": 224},
                      "training": {"epochs": 2, "batch_size": 4, "lr": 1e-4, "seed": 0, "num_workers": 0}})
    assert filt.training.num_workers == 0 and filt.model.image_size == 224 and filt.selection.rule == "best"
    assert filt.model.geometry == "timm" and resolve_config("mnv4")["model"]["geometry"] == "design"
    assert filt.evaluation.thresholds == (0.9, 0.95, 0.98, 0.99) and filt.training.augment is True


def test_the_declared_constraints_are_the_fields_declarations():
    declared = {f"{name}.{f.name}": f.metadata["constraint"] for name, cls in COMMON_SECTIONS.items()
                for f in fields(cls) if f.metadata.get("constraint")}
    assert CONSTRAINTS == declared and len(declared) >= 12
    kinds = {"int": int, "float": float, "options": str}
    for name, cls in COMMON_SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if not f.metadata.get("constraint"):
                continue
            c = Constraint.parse(f.metadata["constraint"])
            assert kinds[c.kind] in (typing.get_args(hints[f.name]) or (hints[f.name],)), f.name
            assert c.nullable == (type(None) in typing.get_args(hints[f.name])), f.name
            if f.default is not MISSING:
                assert c.accepts(f.default), f"{name}.{f.name}: the default {f.default!r} breaks {c.spec}"
    # the generator of invalid values above covers each of them (every task has these sections)
    for task in TASKS:
        assert set(CONSTRAINTS) <= set(constraints_of(task))
