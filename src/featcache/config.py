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
import functools
import json
import math
import operator
import os
import re
import typing
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from .errors import CALLER, FeatcacheError, option, set_option, write_atomic


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


# -- typed settings: the sections every task has, declared with their constraints ---------------
def setting(constraint: str | None = None, default=MISSING):
    """A field of a declared settings section, with its constraint beside it (``int >= 1``, ...)."""
    return field(default=default, metadata={"constraint": constraint})


class ConfigKeyError(ConfigError, AttributeError):
    """A setting read naming no key of its section (an AttributeError too, so ``getattr`` behaves)."""


def _no_key(section: str, key: str, valid) -> ConfigKeyError:
    valid = [str(k) for k in valid]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean {section}.{close[0]}? " if close else ""
    return ConfigKeyError(f"config has no {section}.{key}; {hint}{section} has: {', '.join(valid) or '(no key)'}")


class _Settings(ABC):
    """What every config section offers besides one attribute per key: ``key in section``,
    :meth:`keys`, :meth:`as_dict` and an error naming the valid keys for a wrong one."""

    _section = ""

    def keys(self) -> list[str]:
        return list(self._values())

    def __contains__(self, key) -> bool:
        return key in self._values()

    def as_dict(self) -> dict:
        return {k: _plain(v) for k, v in self._values().items()}

    @abstractmethod
    def _values(self) -> dict:
        """The section's values by key (each kind of section says where they come from)."""


@dataclass(frozen=True, kw_only=True)
class DeclaredSection(_Settings):
    """A section every task has, declared as a dataclass: its fields (type, constraint, the default
    a config without the key meant); keys a task's YAML adds beside them (Stage 1's
    ``selection.probe_rows``) are typed from the YAML's values and read as attributes too."""

    def __getattr__(self, key: str):
        extra = self.__dict__.get("_extra")
        if extra is None or key.startswith("__"):
            raise AttributeError(key)
        if key in extra:
            return extra[key]
        raise _no_key(self._section, key, self._values())

    def _values(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, **self.__dict__.get("_extra", {})}


@dataclass(frozen=True, kw_only=True)
class Training(DeclaredSection):
    _section = "training"
    epochs: int = setting("int >= 1")
    batch_size: int = setting("int >= 1")
    lr: float = setting("float > 0")
    seed: int = setting("int >= 0")
    weight_decay: float = setting("float >= 0", 0.0)
    save_every: int = setting("int >= 0", 0)  # keep a checkpoint every N epochs (0: best and last only)
    patience: int = setting("int >= 0", 0)  # epochs without a better score before stopping (0: never)
    grad_clip: float | None = setting("float >= 0 or null", None)
    schedule: str = setting("one of constant, cosine", "constant")
    class_balance: str = setting("one of none, weight, sampler", "none")
    device: str | None = setting(None, "auto")


@dataclass(frozen=True, kw_only=True)
class Selection(DeclaredSection):
    _section = "selection"
    score: str = setting(None, "auc")  # the formula over val metrics (:func:`selection_score`)
    min_epoch: int = setting("int >= 1", 1)
    rule: str = setting("one of best, last", "best")


@dataclass(frozen=True, kw_only=True)
class Evaluation(DeclaredSection):
    _section = "evaluation"
    threshold: str | None = setting(None, None)  # 0.5 | val_eer | val_fpr=<x>; None: the default rule


@dataclass(frozen=True, kw_only=True)
class Logging(DeclaredSection):
    _section = "logging"
    tensorboard: bool = setting(None, False)
    # false: no PNGs per run (training curves, ROC, subgroup rates, the task's own); an ablation of
    # many runs skips their rendering, about 0.2 s a figure (`featcache evaluate RUN --plots` draws them)
    plots: bool = setting(None, True)


@dataclass(frozen=True, kw_only=True)
class CacheRecord(DeclaredSection):
    """Where a head run's cache lies (written by the trainer)."""

    _section = "cache"
    path: str | None = setting(None, None)
    relative: str | None = setting(None, None)
    fingerprint: str | None = setting(None, None)


@dataclass(frozen=True, kw_only=True)
class ManifestRecord(DeclaredSection):
    """Where the manifest of a run that reads images lies (written by the trainer)."""

    _section = "manifest"
    path: str | None = setting(None, None)
    relative: str | None = setting(None, None)
    sha256: str | None = setting(None, None)


@dataclass(frozen=True, kw_only=True)
class Protocol(DeclaredSection):
    """A leave-one-manipulation-out run's fold (written by ``ablate --protocol lomo``)."""

    _section = "protocol"
    name: str | None = setting(None, None)
    held_out_method: str | None = setting(None, None)


#: The sections every task has, declared; their fields' constraints are :data:`CONSTRAINTS`.
COMMON_SECTIONS: dict[str, type[DeclaredSection]] = {
    "training": Training, "selection": Selection, "evaluation": Evaluation, "logging": Logging}
#: Sections the trainer records in a run's config.yaml, declared the same way.
RECORD_SECTIONS: dict[str, type[DeclaredSection]] = {"cache": CacheRecord, "manifest": ManifestRecord,
                                                      "protocol": Protocol}
#: A task's data source (its ``source``) -> the key of its identity in the run's config.
SOURCE_IDENTITY = {"cache": "fingerprint", "manifest": "sha256"}
#: Sections keyed by name (``options.stage1``: a required run; ``inputs.stage1.fingerprint``): always
#: there, empty when a run has none.
OPEN_SECTIONS = ("options", "inputs")

#: The constraints of the sections every task has, from their fields' declarations (a task's YAML adds
#: its own under ``constraints:``).
CONSTRAINTS: dict[str, str] = {f"{name}.{f.name}": f.metadata["constraint"]
                               for name, cls in COMMON_SECTIONS.items() for f in fields(cls)
                               if f.metadata.get("constraint")}

#: Keys added after run configs were first written whose default (the YAML's, or a declared field's)
#: is not what a config without them meant: such a config is read, and compared, with these values.
OLDER_DEFAULTS: dict[str, object] = {
    "selection.probe_rows": 0,  # Stage 1: no per-epoch probe before it existed
    "training.class_balance": "none",  # no class balancing before it existed
    "model.geometry": "timm",  # the filter: timm's evaluation geometry before the design's became the default
}


class Section(_Settings):
    """A task's own config section (``model``, ``loss``, ``fairness``, ...), read-only: one attribute
    per key, each typed once when built from the task YAML's default (an int stays an int, a number
    given for ``auto`` a float, a number given for text its text, a list a tuple); a key an older config
    lacks has the YAML's value."""

    __slots__ = ("_section", "_items")

    def __init__(self, section: str, items: dict):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_items", dict(items))

    def __getattr__(self, key: str):
        if key.startswith("__") or key in ("_section", "_items"):
            raise AttributeError(key)
        try:
            return self._items[key]
        except KeyError:
            raise _no_key(self._section, key, self._items) from None

    def __setattr__(self, key, value):
        raise AttributeError(f"config section {self._section} is read-only")

    def __reduce__(self):
        return Section, (self._section, self._items)

    def __eq__(self, other) -> bool:
        return isinstance(other, Section) and (self._section, self._items) == (other._section, other._items)

    __hash__ = None

    def __repr__(self) -> str:
        return f"Section({self._section}: {', '.join(f'{k}={v!r}' for k, v in self._items.items())})"

    def _values(self) -> dict:
        return self._items


def _plain(value):
    """A typed value back as plain YAML data (sections to dicts, tuples to lists)."""
    if isinstance(value, _Settings):
        return value.as_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _frozen(name: str, value):
    if isinstance(value, dict):
        return Section(name, {k: _frozen(f"{name}.{k}", v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(name, v) for v in value)
    return value


_NOUN = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _cast(kind, value, key: str, where: str):
    """``value`` of a declared field as its annotated type (an int given for a float becomes a float,
    a number given for text its text), or one :class:`ConfigError` in the one format."""
    args = typing.get_args(kind)
    if args:  # X | None
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            kind is float or float(value).is_integer())
    else:
        ok = isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: {key} must be {_NOUN[kind]}{', or null' if args else ''}; got {value!r}")
    return kind(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed_items(section: str, values: dict, defaults: dict, where: str) -> dict:
    """A task section's values typed by the YAML's defaults; keys the values lack from
    :data:`OLDER_DEFAULTS`, else the YAML."""
    out = {}
    for key in [*values, *(k for k in defaults if k not in values)]:
        name = f"{section}.{key}"
        if key in values:
            value = _check_type(defaults[key], values[key], name, where) if key in defaults else values[key]
            if isinstance(defaults.get(key), str) and defaults[key] != "auto" and _is_number(value):
                value = str(value)  # a number given for text is its text (``evaluation.categories=1``)
        else:
            value = copy.deepcopy(OLDER_DEFAULTS.get(name, defaults[key]))
        out[key] = _frozen(name, value)
    return out


def _declared(cls: type[DeclaredSection], section: str, values: dict, defaults: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for f in fields(cls):
        if f.name in values:
            kwargs[f.name] = _cast(hints[f.name], values[f.name], f"{section}.{f.name}", where)
        elif f.default is MISSING:
            raise ConfigError(f"{where}: {section}.{f.name} is missing (it must be "
                              f"{Constraint.parse(f.metadata['constraint']).text()})")
    obj = cls(**kwargs)
    object.__setattr__(obj, "_extra", _typed_items(
        section, {k: v for k, v in values.items() if k not in names},
        {k: v for k, v in defaults.items() if k not in names}, where))
    return obj


@functools.lru_cache(maxsize=32)
def _yaml_sections(path: str, mtime_ns: int) -> dict:
    raw = _read_yaml(Path(path), "task config")
    for key in ("presets", "default_preset", "constraints"):
        raw.pop(key, None)
    return raw


def _task_defaults(task) -> dict:
    """The sections of ``task``'s YAML (its defaults) with the declared fields' defaults it leaves out
    (:func:`with_declared_defaults`), or {} for a task without one."""
    if not isinstance(task, str):
        return {}
    path = config_path(task)
    if not path.is_file():
        return {}
    return with_declared_defaults(copy.deepcopy(_yaml_sections(str(path), path.stat().st_mtime_ns)))


def with_declared_defaults(sections: dict) -> dict:
    """``sections`` (in place) with every field of :data:`COMMON_SECTIONS` that has a default and that
    they leave out set to it: a task YAML (a plugin's) need not list ``logging.plots`` for
    ``--set logging.plots=false`` to be a valid key."""
    for name, cls in COMMON_SECTIONS.items():
        section = sections.setdefault(name, {})
        if isinstance(section, dict):
            for f in fields(cls):
                if f.default is not MISSING:
                    section.setdefault(f.name, copy.deepcopy(f.default))
    return sections


class Config:
    """A resolved run config as typed, read-only settings, built once: ``conf.training.epochs`` (int),
    ``conf.loss.use_cvar`` (bool), ``conf.model.classifier_hidden`` (tuple), ``conf.options.stage1``,
    ``conf.preset``. The sections every task has are :data:`COMMON_SECTIONS` (dataclasses whose
    fields carry their constraints), a task's own sections are :class:`Section` objects typed from its
    YAML; a key an older config lacks reads as the YAML's default (or the field's). A wrong key is one
    error naming the valid ones. :meth:`as_dict` gives the plain dict back (for saving and comparing)."""

    __slots__ = ("_dict", "_items")

    def __init__(self, cfg: dict, where: str = "config"):
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: a config is a mapping of sections; got {type(cfg).__name__}")
        object.__setattr__(self, "_dict", copy.deepcopy(cfg))
        defaults = _task_defaults(cfg.get("task"))
        names = [*cfg, *(k for k in (*COMMON_SECTIONS, *RECORD_SECTIONS, *OPEN_SECTIONS, *defaults) if k not in cfg)]
        items: dict = {"task": None, "preset": None}
        for name in names:
            value = cfg.get(name)
            default = defaults.get(name)
            sectioned = name in COMMON_SECTIONS or name in RECORD_SECTIONS or name in OPEN_SECTIONS
            if (sectioned or isinstance(default, dict)) and not isinstance(value, (dict, type(None))):
                raise ConfigError(f"{where}: {name} is a section (a mapping of keys); got {value!r}")
            if name in COMMON_SECTIONS or name in RECORD_SECTIONS:
                cls = COMMON_SECTIONS.get(name) or RECORD_SECTIONS[name]
                items[name] = _declared(cls, name, value or {}, default or {}, where)
            elif isinstance(value, dict) or isinstance(default, dict) or name in OPEN_SECTIONS:
                items[name] = Section(name, _typed_items(name, value or {}, default or {}, where))
            else:
                items[name] = copy.deepcopy(value if name in cfg else default)
        object.__setattr__(self, "_items", items)

    @classmethod
    def of(cls, cfg: dict | Config, where: str = "config") -> Config:
        """The typed view of ``cfg`` (``cfg`` itself when it is one already)."""
        return cfg if isinstance(cfg, Config) else cls(cfg, where)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_dict", "_items"):
            raise AttributeError(name)
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigKeyError(f"config has no section {name!r}; {hint}it has: {', '.join(self._items)}") from None

    def __setattr__(self, key, value):
        raise AttributeError("a Config is read-only; resolve a new one (resolve_config, sets=...)")

    def __reduce__(self):
        return Config, (self._dict,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self._dict == other._dict

    __hash__ = None

    def __repr__(self) -> str:
        return f"Config(task={self._items['task']!r}, preset={self._items['preset']!r})"

    def as_dict(self) -> dict:
        """The config as it was given: a plain dict (a copy) for config.yaml, comparisons and JSON."""
        return copy.deepcopy(self._dict)


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


@dataclass(frozen=True)
class Shortcut:
    """A setting given through a shortcut option, an item of ``sets`` beside the ``section.key=value``
    strings: ``Shortcut("training.epochs", 0, "epochs")`` is ``train-e2e --epochs 0`` (``epochs=0`` from
    Python), a task's ``--smoothing 1`` is ``Shortcut("loss.smoothing", "1", "smoothing")``. Its errors
    name the option as the caller wrote it (:func:`errors.option`), not a ``--set`` never typed; a
    string value is read as YAML, as a ``--set`` value is."""

    key: str
    value: object
    option: str  # the Python keyword; the CLI flag is derived from it


def _as_items(sets) -> list[tuple[str, object, str]]:
    """``sets`` as (key, value, how the caller wrote it): a list of ``section.key=value`` strings and
    :class:`Shortcut` items, or from Python a dict ``{"section.key": value}``; anything else is
    refused, never iterated."""
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
        if isinstance(item, Shortcut):
            value = _yaml_value(item.value) if isinstance(item.value, str) else item.value
            out.append((item.key, value, option(item.option, item.value)))
            continue
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
    return parts, _yaml_value(raw)


def _yaml_value(raw: str):
    """A value written as text (``--set k=0.5``, ``--smoothing 0.5``) read as YAML: a number, a bool,
    a list, null; the text itself where it is no valid YAML; '' for blank."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


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
    cfg = with_declared_defaults(copy.deepcopy(raw))
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


# -- run configs as dicts: what the trainer writes into one, and how two are compared ------------------
def _plain_copy(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=str))


def without_keys(cfg: dict, keys) -> dict:
    """A copy of ``cfg`` (as JSON data) without each dotted key of ``keys`` (``training.seed``, ``preset``)."""
    c = _plain_copy(cfg)
    for dotted in keys:
        *path, last = dotted.split(".")
        node = c
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return c


def with_setting(cfg: dict, key: str, value) -> dict:
    """A copy of ``cfg`` (as JSON data) with the dotted ``key`` set to ``value`` (its sections made as needed)."""
    c = _plain_copy(cfg)
    *path, last = key.split(".")
    node = c
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return c


def given_settings(cfg: dict, sections) -> dict:
    """``{"section.key": value}`` for every key ``cfg`` holds in ``sections`` (what to pass as ``sets`` to
    resolve a config again as it was)."""
    return {f"{name}.{k}": v for name in sections for k, v in (cfg.get(name) or {}).items()}


def with_settings(cfg: dict, settings: dict | None, task: str) -> dict:
    """A copy of ``cfg`` with ``settings`` (``{"evaluation.thresholds": [0.9, 0.98]}``) set: each must be
    a setting of ``task``'s config today (one line otherwise)."""
    defaults = _task_defaults(task)
    c = _plain_copy(cfg)
    for key, value in (settings or {}).items():
        section, _, name = key.partition(".")
        if name not in (defaults.get(section) or {}):
            raise ConfigError(f"{key} is not a setting of {task} runs")
        c = with_setting(c, key, value)
    return c


def with_older_defaults(cfg: dict) -> dict:
    """A copy of ``cfg`` with each key of its task's YAML that it lacks (in a section it has) set to what
    such a config meant, as :class:`Config` reads it: :data:`OLDER_DEFAULTS`' value, else the YAML's (and
    a declared field's key of :data:`OLDER_DEFAULTS`): a run saved without a key is the same run as one
    saved with that value (it is reused, resumed, extended)."""
    c = _plain_copy(cfg)
    defaults = _task_defaults(c.get("task"))
    for dotted, value in OLDER_DEFAULTS.items():
        section, key = dotted.split(".", 1)
        if section in COMMON_SECTIONS and key in {f.name for f in fields(COMMON_SECTIONS[section])}:
            defaults.setdefault(section, {}).setdefault(key, value)
    for section, keys in defaults.items():
        if isinstance(keys, dict) and isinstance(c.get(section), dict):
            for key, value in keys.items():
                c[section].setdefault(key, _plain_copy(OLDER_DEFAULTS.get(f"{section}.{key}", value)))
    return c


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two configs."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def locate(cfg: dict, run_dir) -> dict:
    """``cfg`` (in place) with its inputs' paths relative to ``run_dir`` added (``cache.relative`` or
    ``manifest.relative``, ``inputs.<name>.relative``): a run moved or copied together with them
    finds them again."""
    run_dir = Path(run_dir).resolve()
    for kind in SOURCE_IDENTITY:
        source = cfg.get(kind)
        if isinstance(source, dict) and source.get("path"):
            source["relative"] = os.path.relpath(Path(source["path"]).resolve(), run_dir)
    for name, entry in (cfg.get("inputs") or {}).items():
        if (cfg.get("options") or {}).get(name):
            entry["relative"] = os.path.relpath(Path(cfg["options"][name]).resolve(), run_dir)
    return cfg


def where_independent(cfg: dict) -> dict:
    """A copy of ``cfg`` without where its inputs lie: the cache is compared by its fingerprint (a
    manifest by its sha256), a required run by ``inputs.<name>.fingerprint`` (a config written
    before runs were fingerprinted keeps its path; :func:`run_config_differences` compares such
    configs by path)."""
    c = with_older_defaults(cfg)
    for kind, key in SOURCE_IDENTITY.items():
        source = c.get(kind)
        if isinstance(source, dict):
            source.pop("relative", None)
            if source.get(key):
                source.pop("path", None)
    for name, entry in (c.get("inputs") or {}).items():
        entry.pop("relative", None)
        (c.get("options") or {}).pop(name, None)
    return c


def run_config_differences(saved: dict, new: dict) -> list[str]:
    """:func:`config_differences` of two run configs, inputs matched by fingerprint wherever they
    lie (a moved ablation, re-pointed with ``--cache`` / ``--stage1``, is the same ablation); the
    ``logging`` section left out (what a run writes beside its results, ``logging.plots``,
    ``logging.tensorboard``, does not make it another run: it is reused and resumed)."""
    a, b = (without_keys(where_independent(c), ["logging"]) for c in (saved, new))
    if ("inputs" in a) != ("inputs" in b):  # one written before runs were fingerprinted: compared by path
        a, b = with_older_defaults(saved), with_older_defaults(new)
        for c in (a, b):
            c.pop("inputs", None)
            c.pop("logging", None)
            for kind in SOURCE_IDENTITY:
                (c.get(kind) or {}).pop("relative", None)
    return config_differences(a, b)


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
