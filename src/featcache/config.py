"""Task configs: the task's YAML, then ``--preset``, then ``--config FILE``, then each ``--set``.

Every task has one YAML in ``configs/`` with the sections ``model``, ``loss``, ``fairness``
(where it applies), ``training`` and ``selection``, plus ``presets:`` mapping a preset name
to overrides.  Unknown keys are an error naming the nearest valid key; a value of the wrong
type is an error naming the expected type.

Constraints are declared, not written as checks: :data:`CONSTRAINTS` holds those of the sections
every task has (``training``, ``selection``, ``logging``), and a task's YAML may declare its own in
a ``constraints:`` mapping (``loss.cvar_alpha: float in (0, 1]``).  :func:`resolve_config` checks
the resolved config against them with one validator (:func:`check_value`) and one message format,
``<where>: <key> must be <constraint>; got <value>``, where ``<where>`` is what the caller wrote:
``--set training.epochs=0`` from the command line, ``sets=['training.epochs=0']`` from Python,
``preset X`` or ``--config FILE``.
"""

from __future__ import annotations

import ast
import copy
import difflib
import math
import operator
import re
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from .errors import CALLER, FeatcacheError, set_option, write_atomic


class ConfigError(FeatcacheError):
    """A config, preset or ``--set`` override is wrong."""


#: Config files of tasks from other packages (entry point group ``featcache.tasks``), by task name;
#: filled when such a task registers with its ``config_file``.
PLUGIN_CONFIGS: dict[str, Path] = {}


def register_config_file(task: str, path: str | Path) -> None:
    """Record the YAML of a task that lives outside featcache (its ``config_file``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task {task!r} names config file {path}, which does not exist")
    PLUGIN_CONFIGS[task] = path


def config_path(task: str) -> Path:
    own = Path(str(resources.files("featcache") / "configs" / f"{task}.yaml"))
    if not own.is_file() and task not in PLUGIN_CONFIGS:
        for ep in entry_points(group="featcache.tasks", name=task):
            ep.load()  # the plugin's module registers its task, which records its config_file
    return own if own.is_file() or task not in PLUGIN_CONFIGS else PLUGIN_CONFIGS[task]


def list_task_configs() -> list[str]:
    folder = Path(str(resources.files("featcache") / "configs"))
    return sorted({p.stem for p in folder.glob("*.yaml")} | set(PLUGIN_CONFIGS))


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


def _merge(base: dict, override: dict, source: str, prefix: str = "", sources: dict | None = None) -> None:
    """Apply ``override`` onto ``base`` in place; only keys that exist in ``base`` are allowed.
    ``sources`` records, per dotted key set, the ``source`` that set it (for messages)."""
    for key, value in override.items():
        name = f"{prefix}{key}"
        if key not in base:
            close = difflib.get_close_matches(str(key), [str(k) for k in base], n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(map(str, base))}"
            raise ConfigError(f"{source}: unknown config key {name!r}{hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} is a section; give keys under it, e.g. {name}.<key>=...")
            _merge(base[key], value, source, f"{name}.", sources)
        else:
            base[key] = _check_type(base[key], value, name, source)
            if sources is not None:
                sources[name] = source


def _check_type(default, value, name: str, source: str):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false; got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(default, float) and value == "auto":
                return value
            raise ConfigError(f"{source}: {name} must be a number; got {value!r}")
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{source}: {name} must be an integer; got {value!r}")
        return type(default)(value) if isinstance(default, int) else float(value)
    if isinstance(default, str) and isinstance(value, (int, float)) and default == "auto":
        return float(value)
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{source}: {name} must be a list; got {value!r}")
    return value


# -- declared constraints ----------------------------------------------------------------------
_CONSTRAINT = re.compile(
    r"^(?P<type>int|float|number)\s*(?:(?P<op>>=|>|<=|<)\s*(?P<bound>-?[\d.e+-]+)"
    r"|in\s*(?P<lo_br>[\[(])\s*(?P<lo>-?[\d.e+-]+)\s*,\s*(?P<hi>-?[\d.e+-]+|inf)\s*(?P<hi_br>[\])]))?"
    r"(?P<or_none>\s+or\s+null)?$"
    r"|^one of\s+(?P<options>.+)$")


@dataclass(frozen=True)
class Constraint:
    """One declared constraint, parsed from its text (``int >= 1``, ``float in (0, 1]``,
    ``float > 0 or null``, ``one of best, last``); :meth:`text` is how messages say it."""

    spec: str
    kind: str  # int | float | number | options
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    options: tuple = ()
    nullable: bool = False

    @classmethod
    def parse(cls, spec: str) -> Constraint:
        m = _CONSTRAINT.match(spec.strip())
        if m is None:
            raise ConfigError(f"constraint {spec!r} is not one of: 'int >= 1', 'float in (0, 1]', "
                              "'float > 0 or null', 'one of a, b'")
        if m["options"]:
            return cls(spec, "options", options=tuple(o.strip() for o in m["options"].split(",")))
        low = high = None
        low_open = high_open = False
        if m["op"]:
            bound = float(m["bound"])
            if m["op"].startswith(">"):
                low, low_open = bound, m["op"] == ">"
            else:
                high, high_open = bound, m["op"] == "<"
        elif m["lo"] is not None:
            low, low_open = float(m["lo"]), m["lo_br"] == "("
            high = None if m["hi"] == "inf" else float(m["hi"])
            high_open = m["hi_br"] == ")"
        return cls(spec, m["type"], low, high, low_open, high_open, nullable=bool(m["or_none"]))

    def text(self) -> str:
        if self.kind == "options":
            return "one of " + ", ".join(self.options)
        noun = {"int": "an integer", "float": "a number", "number": "a number"}[self.kind]
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return noun + (" " + " and ".join(parts) if parts else "") + (", or null" if self.nullable else "")

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "options":
            return str(value) in self.options
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        if math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def invalid_examples(self) -> list:
        """Values this constraint refuses (for the test that generates invalid settings)."""
        if self.kind == "options":
            return ["not-an-option", 3]
        out = ["text", True] + ([None] if not self.nullable else [])
        if self.low is not None:
            out.append(self.low if self.low_open else self.low - 1)
        if self.high is not None:
            out.append(self.high if self.high_open else self.high + 1)
        if self.kind == "int":
            out.append((self.low or 0) + 1.5)
        return out


#: The constraints of the sections every task has; a task's YAML adds its own (``constraints:``).
CONSTRAINTS = {
    "training.epochs": "int >= 1",
    "training.batch_size": "int >= 1",
    "training.lr": "float > 0",
    "training.weight_decay": "float >= 0",
    "training.seed": "int >= 0",
    "training.save_every": "int >= 0",
    "training.patience": "int >= 0",
    "training.grad_clip": "float >= 0 or null",
    "training.schedule": "one of constant, cosine",
    "training.class_balance": "one of none, weight, sampler",
    "selection.min_epoch": "int >= 1",
    "selection.rule": "one of best, last",
}


def check_value(key: str, value, constraint: str | Constraint, where: str) -> None:
    """The one validator: ``value`` of ``key`` against ``constraint``, or one :class:`ConfigError`
    in the one format (``<where>: <key> must be <constraint>; got <value>``)."""
    c = constraint if isinstance(constraint, Constraint) else Constraint.parse(constraint)
    if not c.accepts(value):
        raise ConfigError(f"{where}: {key} must be {c.text()}; got {value!r}")


def _lookup(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate(cfg: dict, constraints: dict[str, str], sources: dict[str, str]) -> None:
    """Check every declared key present in ``cfg``; ``sources`` says who set each key."""
    for key, spec in constraints.items():
        present, value = _lookup(cfg, key)
        if present:
            check_value(key, value, spec, sources.get(key, "the task's config"))


def _as_items(sets) -> list[tuple[str, object, str]]:
    """``sets`` as (key, value, how the caller wrote it): a list of ``section.key=value`` strings,
    or from Python a dict ``{"section.key": value}``; anything else is refused, never iterated."""
    if isinstance(sets, (str, bytes)):
        raise ConfigError(f"sets= takes a list of 'section.key=value' strings (e.g. sets=[{sets!r}]) or a dict "
                          f"{{'section.key': value}}; got the string {sets!r}")
    if isinstance(sets, dict):
        return [(str(k), v, f"sets={{{k!r}: {v!r}}}") for k, v in sets.items()]
    try:
        items = list(sets)
    except TypeError:
        raise ConfigError(f"sets= takes a list of 'section.key=value' strings; got {sets!r}") from None
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"sets= takes 'section.key=value' strings; got {item!r} in {items!r}")
        keys, value = parse_set(item)
        out.append((".".join(keys), value, set_option(item)))
    return out



def parse_set(item: str) -> tuple[list[str], object]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"{set_option(item)}: expected section.key=value, e.g. {set_option('training.epochs=5')}")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"{set_option(item)}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def resolve_config(task: str, preset: str | None = None, config_file: str | Path | None = None,
                   sets: tuple[str, ...] | list[str] | dict = ()) -> dict:
    """The resolved config of ``task``, with ``preset`` recorded in it, checked against the
    declared constraints (:data:`CONSTRAINTS` and the YAML's ``constraints:``).

    ``sets``: ``section.key=value`` strings (``--set``), or from Python a dict
    ``{"section.key": value}``.
    """
    path = config_path(task)
    if not path.is_file():
        raise ConfigError(f"no config for task {task!r}; tasks with configs: {', '.join(list_task_configs())}")
    raw = _read_yaml(path, "task config")
    presets = raw.pop("presets", {}) or {}
    default_preset = raw.pop("default_preset", None)
    declared = {**CONSTRAINTS, **(raw.pop("constraints", None) or {})}
    cfg = copy.deepcopy(raw)
    sources: dict[str, str] = {}
    name = preset or default_preset
    if name is not None:
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r} for {task}; presets: {', '.join(presets) or '(none)'}")
        _merge(cfg, presets[name] or {}, f"preset {name}", sources=sources)
    if config_file is not None:
        written = f"--config {config_file}" if CALLER.get() == "cli" else f"config_file={str(config_file)!r}"
        _merge(cfg, _read_yaml(Path(config_file), written), written, sources=sources)
    for key, value, written in _as_items(sets):
        nested = value
        for k in reversed([p for p in key.split(".") if p]):
            nested = {k: nested}
        _merge(cfg, nested, written, sources=sources)
    validate(cfg, declared, sources)
    cfg["preset"] = name
    return cfg


def constraints_of(task: str) -> dict[str, Constraint]:
    """Every constraint declared for ``task`` (the common ones and its YAML's), parsed."""
    raw = _read_yaml(config_path(task), "task config")
    return {k: Constraint.parse(v) for k, v in {**CONSTRAINTS, **(raw.get("constraints") or {})}.items()}


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
