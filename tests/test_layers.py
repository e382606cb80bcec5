"""Layers only look down: every import of a featcache module goes to the same or a lower layer.

The table is the one in ARCHITECTURE.md. A function-level (lazy) import of a featcache module
is refused too: it is how an upward import hides. ``cli.py`` is the one exception: its command
functions import the library lazily so that ``featcache --help`` does not load torch; cli is the
top layer, so none of its imports can point up.
"""

import ast
from pathlib import Path

import pytest
import torch

import featcache

SRC = Path(featcache.__file__).parent

#: Top-level room of featcache -> layer (higher imports lower, never the reverse).
LAYERS = {
    "__init__": 0, "errors": 0, "registry": 0, "config": 0, "runtime": 0, "progress": 0,
    "data": 1,
    "cache": 2,
    "extract": 3, "metrics": 3, "report": 3, "losses": 3,
    "heads": 4,
    "train": 5,
    "analyze": 6, "e2e": 6,
    "demo": 7,
    "api": 8,
    "cli": 9, "__main__": 9,
}
LAZY_ALLOWED = {"cli"}
#: The package's own ``__getattr__`` loads the Python surface (``featcache.api``) on first use: the
#: one import allowed to run up the layers, lazily, so that ``import featcache`` stays light.
FACADE = ("__init__", "featcache.api")


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
            package = name
        else:
            package = name.rsplit(".", 1)[0]
        yield path, name, package


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _imports(tree: ast.Module, package: str):
    """(featcache module imported, line, at function level?) for every import in the file."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def in_function(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [
                f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "featcache" or t.startswith("featcache."):
                yield t, node.lineno, in_function(node)


def test_every_room_has_a_layer():
    rooms = {_room(name) if name != "featcache" else "__init__" for _, name, _ in _modules()}
    assert rooms <= set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}; add them to ARCHITECTURE.md"


def test_no_upward_and_no_lazy_import():
    upward, lazy = [], []
    for path, name, package in _modules():
        room = "__init__" if name == "featcache" else _room(name)
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, line, nested in _imports(tree, package):
            other = _room(target) if target != "featcache" else "__init__"
            if (room, target) == FACADE and nested:
                continue
            if LAYERS[other] > LAYERS[room]:
                upward.append(f"{path.relative_to(SRC)}:{line} ({room}, layer {LAYERS[room]}) imports {target} "
                              f"(layer {LAYERS[other]})")
            if nested and room not in LAZY_ALLOWED:
                lazy.append(f"{path.relative_to(SRC)}:{line} imports {target} inside a function")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)
    assert not lazy, "function-level imports of featcache modules:\n" + "\n".join(lazy)


def test_the_checker_sees_an_upward_and_a_lazy_import():
    tree = ast.parse("from ..train.trainer import x\nfrom .. import cache\n\ndef f():\n    from ..cache import y\n")
    found = list(_imports(tree, "featcache.heads"))
    assert found == [("featcache.train.trainer", 1, False), ("featcache.cache", 2, False), ("featcache.cache", 5, True)]


def test_one_file_steps_an_optimizer():
    steppers = []
    for path, _, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("opt", "optimizer", "scaler")):
                steppers.append(str(path.relative_to(SRC)))
    assert sorted(set(steppers)) == ["train/loop.py"], steppers


def _root(node):
    """The name an attribute chain starts from (``self`` of ``self.module.rng``), or None."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _probes(source: str, names: set[str]) -> list[int]:
    """Lines of ``hasattr(x, ...)`` / ``getattr(x, ...)`` calls on the objects named ``names`` (or on
    their attributes: ``getattr(self.module, ...)``)."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
            and node.args and _root(node.args[0]) in names]


def test_the_runner_never_probes_a_backbone():
    """The Backbone base class declares every hook with a no-op default; the runner calls them."""
    assert _probes("x = 1\nif hasattr(bb, 'prepare'):\n    getattr(bb, 'finish', None)\ngetattr(cfg, 'x')\n",
                   {"bb"}) == [2, 3]
    assert _probes((SRC / "extract" / "runner.py").read_text(), {"bb", "backbone"}) == []


def test_every_backbone_hook_has_a_declared_default():
    from featcache.errors import BackboneError
    from featcache.extract import get_backbone
    from featcache.extract.registry import BACKBONES, Backbone

    hooks = ("set_decode", "batch_sampler", "prepare", "forward_async", "finish")
    assert all(callable(getattr(Backbone, h)) for h in hooks)
    for name in BACKBONES.names():
        assert issubclass(BACKBONES.get(name), Backbone), name
    bb = get_backbone("timm", "test_vit", "none")
    with pytest.raises(BackboneError, match="--decode gpu is for image backbones that take it .clip.; timm decodes"):
        bb.set_decode("gpu")
    x = torch.zeros(2, *bb.preprocess_spec()["input_size"])
    assert bb.prepare(x, torch.device("cpu")) == (x, {})
    out, ctx = bb.forward_async(x, torch.device("cpu"))
    assert ctx is None and bb.finish(out, ctx) is out and out["features"].shape == (2, bb.dim)
    assert bb.batch_sampler([0], 10, 10, 4, None) is None
    assert get_backbone("clip", "tiny").decodes == ("cpu", "gpu")


def test_the_loop_never_probes_a_job():
    """The job contract (``heads.task.Job``) declares every hook the loop, the trainer and the task base
    class call, with a no-op default: no ``hasattr``/``getattr`` of a job, a task or their parts."""
    assert _probes("getattr(self.module, 'rng', None)\nhasattr(job, 'batches')\ngetattr(x, 'y')\n",
                   {"self", "job"}) == [1, 2]
    heads = [f"heads/{p.name}" for p in sorted((SRC / "heads").glob("*.py"))]
    for rel in ("train/loop.py", "train/trainer.py", "train/ablate.py", "train/evaluate.py", *heads):
        assert _probes((SRC / rel).read_text(), {"job", "task", "self", "cls", "rng", "module"}) == [], rel


# -- settings are read typed (issue 25): no string-key read of a run config outside config.py ---------------
#: Names and attributes that hold a run config (a dict) unless a scope binds them to something else
#: (``cfg``, ``cfgs[r]``, ``self.cfg``), and the calls that return one.
CONFIG_NAMES = {"cfg", "cfgs"}
CONFIG_ATTRS = {"cfg", "cfgs"}
CONFIG_CALLS = {"load_config", "resolve_config", "_resolve"}
#: Calls that return a copy of the config they are given (``json.loads(json.dumps(cfg))``, ``locate(cfg, run)``).
COPY_CALLS = {"loads", "dumps", "deepcopy", "dict", "with_older_defaults", "without_keys", "with_setting", "locate",
              "_comparable"}


def _holds_config(node, held: set[str], other: frozenset = frozenset()) -> bool:
    """Whether ``node`` evaluates to a run config or a part of one (a section, a value); ``held``: names
    bound from one; ``other``: names of :data:`CONFIG_NAMES` this scope binds to something else."""
    if isinstance(node, ast.Name):
        return node.id in held or (node.id in CONFIG_NAMES and node.id not in other)
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name in CONFIG_CALLS:
            return True
        if name in COPY_CALLS and any(_holds_config(a, held, other) for a in node.args):
            return True
    if isinstance(node, ast.Attribute):
        return node.attr in CONFIG_ATTRS
    if isinstance(node, ast.Subscript):
        return _holds_config(node.value, held, other)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "setdefault"):
        return _holds_config(node.func.value, held, other)
    if isinstance(node, ast.BoolOp):
        return any(_holds_config(v, held, other) for v in node.values)
    if isinstance(node, ast.IfExp):
        return _holds_config(node.body, held, other) or _holds_config(node.orelse, held, other)
    return False


def _bindings(node):
    """(target, value) pairs a statement binds; a loop over configs binds each config."""
    if isinstance(node, ast.Assign):
        pairs = [(t, node.value) for t in node.targets]
    elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
        pairs = [(node.target, node.value)]
    elif isinstance(node, (ast.For, ast.comprehension)):
        pairs = [(node.target, ast.Subscript(value=node.iter, slice=ast.Constant(0)))]
    else:
        return []
    out = []
    for target, value in pairs:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            out += list(zip(target.elts, value.elts))
        else:
            out.append((target, value))
    return out


def _own_nodes(scope: ast.AST):
    """The nodes of ``scope`` outside the functions defined in it (each is a scope of its own)."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def config_reads(tree: ast.AST) -> list[int]:
    """Lines reading a run config by string key (``cfg["training"]``, ``self.cfg["loss"].get("x")``,
    ``c["k"]`` with ``c`` bound from one), per function (names bound from a config read hold one too)."""
    lines = set()
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for scope in scopes:
        held: set[str] = set()
        bound = [(t.id, v) for node in _own_nodes(scope) for t, v in _bindings(node) if isinstance(t, ast.Name)]
        # a config name that this scope binds only to something else (never to a config or a dict it builds)
        other = frozenset({name for name, _ in bound if name in CONFIG_NAMES}
                          - {name for name, v in bound if isinstance(v, ast.Dict) or _holds_config(v, set())})
        for _ in range(4):  # names bound from names bound from a config
            held |= {name for name, v in bound if _holds_config(v, held, other)}
        for node in _own_nodes(scope):
            if (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and isinstance(node.slice, ast.Constant)
                    and isinstance(node.slice.value, str) and _holds_config(node.value, held, other)):
                lines.add(node.lineno)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                  and _holds_config(node.func.value, held, other)):
                lines.add(node.lineno)
    return sorted(lines)


def test_no_string_key_config_read_outside_the_config_module():
    reads = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel != "config.py":
            lines = config_reads(ast.parse(path.read_text()))
            if lines:
                reads[rel] = lines
    assert not reads, f"read settings as typed attributes (config.Config.of(cfg).section.key): {reads}"


def test_the_counter_sees_string_key_config_reads():
    code = ("def f(self, cfgs, other):\n"
            "    t = self.cfg['training']\n"                   # 2
            "    for c in cfgs:\n"
            "        c.get('x', 1)\n"                           # 4
            "    m, n = self.cfg['model'], 1\n"                 # 5
            "    m['k'], n['k'], other['k']\n"                  # 6 (m only)
            "    s = (t.get('selection') or {})\n"              # 7
            "    s['rule'], self.conf.training.epochs\n"        # 8
            "    self.cfg['options'] = {}\n"                    # a write, not a read
            "def g(c):\n"
            "    return c['k'], self.conf.loss.tau\n"          # c is no config here
            "def h(model):\n"
            "    cfg = dict(timm_config(model))\n"             # cfg is no run config here
            "    return cfg['mean'], load_config(p).get('manifest')\n")  # 14: load_config's only
    assert config_reads(ast.parse(code)) == [2, 4, 5, 6, 7, 8, 14]


def _run_file_names() -> set[str]:
    from featcache.runtime import RunDir

    return {v for k, v in vars(RunDir).items() if k.isupper() and isinstance(v, str) and "." in v}


def test_run_file_names_are_spelled_only_by_run_dir():
    """Issue 25: every run-file name (config.yaml, summary.json, best.safetensors, ...) is spelled in
    runtime.RunDir and read from it everywhere else (string constants, docstrings aside)."""
    names = _run_file_names()
    assert {"config.yaml", "summary.json", "best.safetensors", "resume.pt", "metrics.json"} <= names
    spelled = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "runtime.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        spelled += [f"{rel}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
                    and n.value in names]
    assert not spelled, f"read these names from featcache.runtime.RunDir: {spelled}"


def test_no_function_is_over_80_lines_of_code():
    """Issue 25: no function in src/ over 80 lines of code; its docstring does not count (a dataset adapter
    quotes the layout it reads above its code: ARCHITECTURE.md, "Contracts")."""
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = n.body[0]
                doc = (first.end_lineno - first.lineno + 1
                       if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else 0)
                lines = n.end_lineno - n.lineno + 1 - doc
                if lines > 80:
                    long.append(f"{path.relative_to(SRC)}:{n.lineno} {n.name} ({lines} lines)")
    assert not long, f"split these into parts: {long}"
