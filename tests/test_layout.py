"""The package's layout rules, read from its imports (issue 22; the code map in README.md).

Every ``import`` of every module in ``kimi_linear/`` and ``kernels/kda/`` (installed as
``kimi_linear.kernels``) counts, at module level and inside functions alike, and so does a
module named by a string (``importlib.import_module("kimi_linear.x")``, the lazy-export tables):
an import moved into a function to dodge a cycle is still an edge here.

The rules:

1. No import cycle among ``kimi_linear`` modules.
2. No upward dependency: each module sits on one floor of :data:`FLOORS` (top first) and
   imports only its own floor or lower ones.
3. ``kimi_linear/ops/`` and the kernels import nothing of ``kimi_linear`` above ``ops/``.
4. Only ``kimi_linear/backends.py`` (and the kernels themselves) import ``kimi_linear.kernels``
   or ``fla``.
5. ``layers/`` never imports ``hf/``, ``optim/`` or ``lightning/``; ``model.py`` never imports
   ``optim/`` or ``lightning/``; ``hf/`` never imports ``model.py`` (floors).
6. ``config.py`` and ``ops/options.py`` import no torch (checked in a fresh interpreter where
   ``import torch`` fails).
7. ``kimi_linear/`` never reaches ``benchmarks/`` or ``experiments/``, by import or by path.
8. Only ``kimi_linear/lightning/`` imports Lightning.
9. A file of more than :data:`MAX_LINES` lines in the package says, in its module docstring,
   which one job it holds ("One job: ...").
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (module-name prefix, folder) of every source tree of the package.
SOURCES = (("kimi_linear.kernels", ROOT / "kernels" / "kda"), ("kimi_linear", ROOT / "kimi_linear"))

#: The dependency order, top floor first. A module belongs to the first floor with a pattern
#: equal to its name or a prefix of it followed by ``.`` (the root package's ``__init__``,
#: ``kimi_linear``, matches only itself).
FLOORS: tuple[tuple[str, ...], ...] = (
    ("kimi_linear", "kimi_linear.cli"),
    ("kimi_linear.lightning",),
    ("kimi_linear.info", "kimi_linear.context_parallel", "kimi_linear.plot", "kimi_linear.testing"),
    ("kimi_linear.model",),
    ("kimi_linear.hf",),
    ("kimi_linear.layers",),
    ("kimi_linear.flops", "kimi_linear.cache"),
    ("kimi_linear.backends",),
    ("kimi_linear.kernels",),
    ("kimi_linear.config",),
    ("kimi_linear.ops",),
    ("kimi_linear.optim", "kimi_linear.tokenizer"),
    ("kimi_linear.errors", "kimi_linear.packing", "kimi_linear.sharding"),
)

#: What ``ops/`` and the kernels may import of the package (rule 3).
BELOW_OPS = ("kimi_linear.ops", "kimi_linear.kernels", *FLOORS[-1])

#: Rule 5, beyond the floors: importer prefix -> forbidden target prefixes.
NEVER = {
    "kimi_linear.layers": ("kimi_linear.hf", "kimi_linear.optim", "kimi_linear.lightning"),
    "kimi_linear.model": ("kimi_linear.optim", "kimi_linear.lightning"),
    "kimi_linear.hf": ("kimi_linear.model",),
}

MAX_LINES = 600

_MODULE_STRING = re.compile(r"kimi_linear(?:\.\w+)+")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    #: target module -> line numbers of the imports
    imports: dict[str, list[int]] = field(default_factory=dict)
    #: third-party top-level names imported -> line numbers
    external: dict[str, list[int]] = field(default_factory=dict)


def _module_name(prefix: str, root: Path, path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join([prefix, *parts]), is_package


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (not module names in code)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _lazy_table(tree: ast.Module) -> dict[str, str]:
    """A package's ``_LAZY = {"name": "module", ...}`` table of lazily exported names."""
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return {
                k.value: v.value
                for k, v in zip(node.value.keys, node.value.values, strict=True)
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
            }
    return {}


def load_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for prefix, root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            name, is_package = _module_name(prefix, root, path)
            if name in modules:  # kernels/kda is not also under kimi_linear/
                raise AssertionError(f"{name} is defined twice ({modules[name].path}, {path})")
            tree = ast.parse(path.read_text(), filename=str(path))
            modules[name] = Module(name, path, is_package, tree)
    for module in modules.values():
        _read_imports(module, modules)
    return modules


def _resolve(target: str, names: list[str], modules: dict[str, Module]) -> Iterator[str]:
    """The package modules that ``from target import names`` loads."""
    if target not in modules:
        # a name under a package we do not know (e.g. a deleted module): keep it visible
        if target.startswith("kimi_linear"):
            yield target
        return
    lazy = _lazy_table(modules[target].tree) if modules[target].is_package else {}
    for name in names:
        sub = f"{target}.{name}"
        if sub in modules:
            yield sub
        elif name in lazy:
            yield lazy[name]
        else:
            yield target


def _read_imports(module: Module, modules: dict[str, Module]) -> None:
    package = module.name if module.is_package else module.name.rpartition(".")[0]

    def add(target: str, line: int) -> None:
        if target != module.name:
            module.imports.setdefault(target, []).append(line)

    def add_external(name: str, line: int) -> None:
        module.external.setdefault(name.partition(".")[0], []).append(line)

    docstrings = _docstring_nodes(module.tree)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kimi_linear"):
                    add(alias.name, node.lineno)
                else:
                    add_external(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("kimi_linear"):
                for resolved in _resolve(target, [a.name for a in node.names], modules):
                    add(resolved, node.lineno)
            else:
                add_external(target, node.lineno)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            # a module named by a string: importlib.import_module, lazy tables, entry points
            text = node.value.partition(":")[0]
            if _MODULE_STRING.fullmatch(text) and text in modules:
                add(text, node.lineno)


def floor_of(name: str) -> int:
    for i, patterns in enumerate(FLOORS):
        if any(name == p or (p != "kimi_linear" and name.startswith(p + ".")) for p in patterns):
            return i
    raise AssertionError(f"{name} is on no floor of tests/test_layout.py FLOORS: place it")


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _edges(modules: dict[str, Module]) -> Iterator[tuple[Module, str, int]]:
    for module in modules.values():
        for target, lines in sorted(module.imports.items()):
            yield module, target, lines[0]


def _where(module: Module, line: int) -> str:
    return f"{module.path.relative_to(ROOT)}:{line}"


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return load_modules()


def test_every_import_names_an_existing_module(modules):
    bad = [
        f"{_where(m, line)} imports {t}, which is not a module of the package"
        for m, t, line in _edges(modules)
        if t not in modules
    ]
    assert not bad, "\n".join(bad)


def test_every_module_is_on_a_floor(modules):
    for name in modules:
        floor_of(name)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node (or with a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_strongly_connected_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(modules):
    graph = {m.name: {t for t in m.imports if t in modules} for m in modules.values()}
    cycles = strongly_connected(graph)
    lines = []
    for component in cycles:
        lines.append(f"cycle among {len(component)} modules:")
        for name in component:
            m = modules[name]
            for t in sorted(set(m.imports) & set(component)):
                lines.append(f"  {_where(m, m.imports[t][0])}: {name} -> {t}")
    assert not cycles, "\n".join(lines)


def test_no_upward_dependencies(modules):
    bad = []
    for m, t, line in _edges(modules):
        if t in modules and floor_of(t) < floor_of(m.name):
            bad.append(
                f"{_where(m, line)}: {m.name} (floor {floor_of(m.name)}) imports {t} "
                f"(floor {floor_of(t)}, above it)"
            )
    assert not bad, "\n".join(bad)


def test_ops_and_kernels_import_nothing_above_ops(modules):
    bad = [
        f"{_where(m, line)}: {m.name} imports {t}"
        for m, t, line in _edges(modules)
        if _is_under(m.name, ("kimi_linear.ops", "kimi_linear.kernels"))
        and not _is_under(t, BELOW_OPS)
    ]
    assert not bad, "\n".join(bad)


def test_only_the_dispatcher_imports_the_kernels_or_fla(modules):
    allowed = ("kimi_linear.backends", "kimi_linear.kernels")
    bad = [
        f"{_where(m, line)}: {m.name} imports {t}"
        for m, t, line in _edges(modules)
        if _is_under(t, ("kimi_linear.kernels",)) and not _is_under(m.name, allowed)
    ]
    bad += [
        f"{_where(m, lines[0])}: {m.name} imports fla"
        for m in modules.values()
        for name, lines in m.external.items()
        if name == "fla" and not _is_under(m.name, allowed)
    ]
    assert not bad, "\n".join(bad)


def test_never_import_rules(modules):
    bad = [
        f"{_where(m, line)}: {m.name} imports {t}"
        for m, t, line in _edges(modules)
        for importer, forbidden in NEVER.items()
        if _is_under(m.name, (importer,)) and _is_under(t, forbidden)
    ]
    assert not bad, "\n".join(bad)


def test_only_lightning_imports_lightning(modules):
    bad = [
        f"{_where(m, lines[0])}: {m.name} imports {name}"
        for m in modules.values()
        for name, lines in m.external.items()
        if name in ("lightning", "pytorch_lightning")
        and not _is_under(m.name, ("kimi_linear.lightning",))
    ]
    assert not bad, "\n".join(bad)


def test_package_never_reaches_benchmarks_or_experiments(modules):
    bad = []
    for m in modules.values():
        for name, lines in m.external.items():
            if name in ("benchmarks", "experiments"):
                bad.append(f"{_where(m, lines[0])}: {m.name} imports {name}")
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Attribute) and node.attr == "spec_from_file_location":
                bad.append(f"{_where(m, node.lineno)}: {m.name} loads a module by file path")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("insert", "append")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "path"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "sys"
            ):
                bad.append(f"{_where(m, node.lineno)}: {m.name} edits sys.path")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["kimi_linear.config", "kimi_linear.ops.options"])
def test_importable_without_torch(modules, module):
    """The configuration and the backend names load where torch cannot (a fresh interpreter in
    which ``import torch`` raises), e.g. a config tool or the CLI's help."""
    assert module in modules, f"{module} is missing"
    torch_names = sorted(n for n in modules[module].external if n in ("torch", "triton", "numpy"))
    assert not torch_names, f"{module} imports {torch_names}"
    code = (
        "import sys\n"
        "for name in ('torch', 'triton', 'numpy'):\n"
        "    sys.modules[name] = None\n"
        f"import {module}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_large_files_say_their_one_job(modules):
    bad = []
    for m in modules.values():
        n = len(m.path.read_text().splitlines())
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(m.tree) or ""
        if "one job:" not in doc.lower():
            bad.append(
                f"{m.path.relative_to(ROOT)}: {n} lines, and no 'One job: ...' in its "
                "docstring (split it by job, or say which one job it holds)"
            )
    assert not bad, "\n".join(bad)


#: One source per rule (issue 22): each definition below exists exactly once in the repository
#: (package, kernels, benchmarks, experiments and tests), in the file named.
ONE_SOURCE = {
    r"^KDA_BACKENDS\s*=": "kimi_linear/ops/options.py",
    r"^def check_kda_backend\(": "kimi_linear/ops/options.py",
    r"^SAFE_GATE_LOWER_BOUND_RANGE\s*=": "kimi_linear/ops/options.py",
    r"^def check_safe_gate_bound\(": "kimi_linear/ops/options.py",
    r"^def gate_check_enabled\(": "kimi_linear/ops/options.py",
    r"^def check_cu_seqlens\(": "kimi_linear/packing.py",
    r"^def fp32_tensor_names\(": "kimi_linear/layers/fp32.py",
    r"^def rel_error\(": "kimi_linear/testing.py",
}

#: Names of rules that were stated a second time before issue 22 and must not come back.
GONE = ("_fp32_parameters =", "FP32_PARAMETER_NAMES", "check_safe_gate_argument", "def rel_err(")


def _repository_python_files() -> list[Path]:
    folders = ("kimi_linear", "kernels", "benchmarks", "experiments", "tests")
    return [
        p
        for folder in folders
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p != Path(__file__).resolve()
    ]


def test_each_rule_is_stated_once():
    files = _repository_python_files()
    texts = {p: p.read_text() for p in files}
    bad = []
    for pattern, home in ONE_SOURCE.items():
        rx = re.compile(pattern, re.MULTILINE)
        hits = [
            f"{p.relative_to(ROOT)}:{t.count(chr(10), 0, m.start()) + 1}"
            for p, t in texts.items()
            for m in rx.finditer(t)
        ]
        if [h.rpartition(":")[0] for h in hits] != [home]:
            bad.append(f"{pattern!r} should be defined once, in {home}; found at {hits}")
    for name in GONE:
        hits = [str(p.relative_to(ROOT)) for p, t in texts.items() if name in t]
        if hits:
            bad.append(f"{name!r} (a second statement of a rule) is back in {hits}")
    assert not bad, "\n".join(bad)


def test_the_safe_gate_bound_is_written_once(modules):
    """The safe gate's lowest bound (-5) appears as a number only in ``ops/options.py``;
    everything else reads ``SAFE_GATE_LOWER_BOUND_RANGE``."""
    bad = []
    for m in modules.values():
        if m.name == "kimi_linear.ops.options":
            continue
        for node in ast.walk(m.tree):
            if (
                isinstance(node, ast.UnaryOp)
                and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant)
                and node.operand.value == 5
            ):
                bad.append(
                    f"{_where(m, node.lineno)}: -5 in code (use SAFE_GATE_LOWER_BOUND_RANGE)"
                )
    assert not bad, "\n".join(bad)
