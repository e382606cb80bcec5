"""Task configs: the task's YAML, then ``--preset``, then ``--config FILE``, then each ``--set``.

Every task has one YAML in ``configs/`` with the sections ``model``, ``loss``, ``fairness``
(where it applies), ``training`` and ``selection``, plus ``presets:`` mapping a preset name
to overrides.  Unknown keys are an error naming the nearest valid key; a value of the wrong
type is an error naming the expected type.
"""

from __future__ import annotations

import ast
import copy
import difflib
import math
import operator
from importlib import resources
from pathlib import Path

import yaml

from .errors import FeatcacheError, write_atomic


class ConfigError(FeatcacheError):
    """A config, preset or ``--set`` override is wrong."""


def config_path(task: str) -> Path:
    return Path(str(resources.files("featcache") / "configs" / f"{task}.yaml"))


def list_task_configs() -> list[str]:
    folder = Path(str(resources.files("featcache") / "configs"))
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections")
    return data


def _merge(base: dict, override: dict, source: str, prefix: str = "") -> None:
    """Apply ``override`` onto ``base`` in place; only keys that exist in ``base`` are allowed."""
    for key, value in override.items():
        name = f"{prefix}{key}"
        if key not in base:
            close = difflib.get_close_matches(str(key), [str(k) for k in base], n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(map(str, base))}"
            raise ConfigError(f"{source}: unknown config key {name!r}{hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} is a section; give keys under it, e.g. {name}.<key>=...")
            _merge(base[key], value, source, f"{name}.")
        else:
            base[key] = _check_type(base[key], value, name, source)


def _check_type(default, value, name: str, source: str):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(default, float) and value == "auto":
                return value
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
        return type(default)(value) if isinstance(default, int) else float(value)
    if isinstance(default, str) and isinstance(value, (int, float)) and default == "auto":
        return float(value)
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
    return value


def parse_set(item: str) -> tuple[list[str], object]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set training.epochs=5")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def resolve_config(task: str, preset: str | None = None, config_file: str | Path | None = None,
                   sets: tuple[str, ...] | list[str] = ()) -> dict:
    """The resolved config of ``task``, with ``preset`` and ``preset_name`` recorded in it."""
    path = config_path(task)
    if not path.is_file():
        raise ConfigError(f"no config for task {task!r}; tasks with configs: {', '.join(list_task_configs())}")
    raw = _read_yaml(path, "task config")
    presets = raw.pop("presets", {}) or {}
    default_preset = raw.pop("default_preset", None)
    cfg = copy.deepcopy(raw)
    name = preset or default_preset
    if name is not None:
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r} for {task}; presets: {', '.join(presets) or '(none)'}")
        _merge(cfg, presets[name] or {}, f"preset {name}")
    if config_file is not None:
        _merge(cfg, _read_yaml(Path(config_file), "--config"), f"--config {config_file}")
    for item in sets:
        keys, value = parse_set(item)
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, f"--set {item}")
    cfg["preset"] = name
    return cfg


def presets_of(task: str) -> list[str]:
    raw = _read_yaml(config_path(task), "task config")
    return list((raw.get("presets") or {}).keys())


def save_config(cfg: dict, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(cfg, sort_keys=False))


def load_config(path: str | Path) -> dict:
    return _read_yaml(Path(path), "run config")


# -- the selection formula ------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def selection_score(formula: str, metrics: dict) -> float:
    """Evaluate a formula such as ``auc - 0.001 * f_fpr`` over metric names (+ - * / only).

    A metric that is NaN makes the score NaN, which never wins model selection.
    """

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in metrics:
                raise ConfigError(f"selection formula {formula!r} names {node.id!r}; "
                                  f"logged metrics are {', '.join(sorted(metrics))}")
            value = metrics[node.id]
            return float("nan") if value is None else float(value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ConfigError(f"selection formula {formula!r}: only metric names, numbers and + - * / are allowed")

    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError:
        raise ConfigError(f"selection formula {formula!r} is not an expression") from None
    try:
        return ev(tree)
    except ZeroDivisionError:
        return math.nan
