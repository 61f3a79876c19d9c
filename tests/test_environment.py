"""The repository never shadows a dependency: Python started as users start it imports fla and
transformers' KimiLinear.

Python puts the working directory (``python -c``, ``python -m``, so ``python -m benchmarks.x`` from
the root) or a script's folder (``python tests/mutants.py``) first on ``sys.path``. A module of ours found there under a bare
name that an installed distribution also uses wins over the real one: that is how a top-level
``kernels/`` package and ``benchmarks/kernels.py`` broke ``import fla`` and transformers (which
import the PyPI package ``kernels``) for every new user. The checks below start fresh
interpreters from each folder a user or a test starts Python in.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folders that end up first on ``sys.path``: the repository root (``python -m``, ``python -c``,
#: ``python -m pytest``, ``python -m benchmarks.x``), the package folders a user may start Python
#: in (``benchmarks/``, ``experiments/``) and ``tests/`` (pytest's rootdir-relative imports).
ENTRY_FOLDERS = ("", "benchmarks", "experiments", "tests")
IMPORT_DEPENDENCIES = (
    "import fla.ops.kda, fla.ops.kda.naive; "
    "import transformers; from transformers import KimiLinearForCausalLM, KimiLinearConfig; "
    "print('imports ok')"
)


def importable_names(folder: Path) -> set[str]:
    """Top-level names that ``folder`` on ``sys.path`` makes importable as regular modules or
    packages (a folder without ``__init__.py`` is a namespace portion, which a regular package
    found later on ``sys.path`` wins over, so it cannot shadow)."""
    names = set()
    for p in folder.iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").is_file():
            names.add(p.name)
    return names


def taken_names() -> dict[str, list[str]]:
    """Top-level import names of every installed distribution (ours excluded) and the stdlib."""
    taken = {
        name: dists
        for name, dists in importlib.metadata.packages_distributions().items()
        if "kimi-linear" not in dists and "kimi_linear" not in dists
    }
    for name in sys.stdlib_module_names:
        taken.setdefault(name, ["<stdlib>"])
    return taken


@pytest.mark.parametrize("folder", ENTRY_FOLDERS, ids=lambda f: f or "root")
def test_no_module_of_the_repository_shadows_a_dependency(folder: str) -> None:
    taken = taken_names()
    clashes = {
        name: taken[name] for name in sorted(importable_names(ROOT / folder)) if name in taken
    }
    assert not clashes, (
        f"{folder or 'the repository root'} makes these names importable ahead of the installed "
        f"distributions that own them: {clashes}; rename the module (or drop its __init__.py)"
    )


def test_kernels_folder_is_not_a_package() -> None:
    """``kernels/`` holds ``kimi_linear.kernels`` one level down (``kernels/kda``), so it is at most
    a namespace portion, never the ``kernels`` that transformers imports."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "kda" / "__init__.py").is_file()


def _python(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("folder", ENTRY_FOLDERS, ids=lambda f: f or "root")
def test_dependencies_import_from_every_entry_folder(folder: str) -> None:
    """``python -c`` from a folder puts that folder first on ``sys.path``, exactly as running a
    script by path does for the script's folder."""
    res = _python("-c", IMPORT_DEPENDENCIES, cwd=ROOT / folder)
    assert res.returncode == 0 and "imports ok" in res.stdout, res.stderr[-3000:]


def test_our_kernels_and_fla_backend_resolve_from_the_root() -> None:
    """From the root (first on ``sys.path`` for ``python -m``): our kernels import as
    ``kimi_linear.kernels`` and ``kda_backend='fla'`` resolves (it used to fail, saying 'install
    flash-linear-attention', because fla could not import the PyPI ``kernels``)."""
    code = (
        IMPORT_DEPENDENCIES
        + "\nimport kimi_linear.kernels as k; assert k.chunk_kda and k.fused_recurrent_kda"
        + "\nfrom kimi_linear.backends import _fla_backend"
        + "\nprint(_fla_backend().name)"
    )
    res = _python("-c", code, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["imports", "ok", "fla"], res.stdout


def test_scripts_import_as_modules_of_the_root_without_path_edits() -> None:
    """``benchmarks`` and ``experiments`` are packages run as ``python -m benchmarks.<name>`` from
    the root: no script edits ``sys.path``, and every one imports (siblings as ``benchmarks.x``)
    with ``sys.path`` untouched."""
    modules = [
        f"{folder}.{p.stem}"
        for folder in ("benchmarks", "experiments")
        for p in sorted((ROOT / folder).glob("*.py"))
        if p.stem != "__init__"
    ]
    editing = [
        m for m in modules if "sys.path" in (ROOT / (m.replace(".", "/") + ".py")).read_text()
    ]
    assert not editing, f"these scripts edit sys.path: {editing}"
    code = (
        "import importlib, sys; before = list(sys.path)\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "assert sys.path == before, 'sys.path changed'; print('ok')"
    )
    res = _python("-c", code, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.split() == ["ok"], res.stderr[-3000:]


def test_compile_check_module_path_still_works() -> None:
    res = _python("-m", "kimi_linear.kernels.compile_check", "--help", cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage" in res.stdout.lower()


@pytest.mark.slow
def test_gpu_check_dry_run_reaches_fla(tmp_path: Path) -> None:
    """The GPU suite started as its README says (``python -m`` from the root) compares with fla:
    at least one correctness item has fla's result beside ours, and no item lost fla."""
    res = _python(
        "-m", "benchmarks.gpu_check", "--dry-run", "--parts", "correctness",
        "--out-dir", str(tmp_path), cwd=ROOT, timeout=1200,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    items = json.loads((tmp_path / "gpu_check_correctness.json").read_text())["items"]
    assert not [i["name"] for i in items if "fla_error" in i], items
    with_fla = [
        i
        for i in items
        if i["status"] == "pass" and any("fla_err_vs_fp64" in r for r in i.get("checks", []))
    ]
    assert with_fla, items


def test_a_shadowed_dependency_is_reported_as_such(tmp_path: Path) -> None:
    """A user's own ``triton.py`` in the working directory breaks fla's import (fla imports
    triton in every version; our dispatcher does not at import time): the backend error says
    fla is installed but failed to import, names the file found instead, and does not tell the
    user to install fla again."""
    shadow = tmp_path / "triton.py"
    shadow.write_text("raise ImportError('a script of the working directory', name='triton')\n")
    res = _python(
        "-c", "from kimi_linear.backends import _fla_backend; _fla_backend()", cwd=tmp_path
    )
    assert res.returncode != 0, res.stdout
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: kda_backend='fla'"), res.stderr[-3000:]
    assert "installed but failed to import" in last and "shadow" in last, last
    assert "is not installed" not in last, last


def test_import_failure_tells_missing_from_broken() -> None:
    from kimi_linear.errors import import_failure

    missing = ModuleNotFoundError("No module named 'fla'", name="fla")
    assert import_failure(missing, "fla.ops.kda", "pip install x") == (
        "fla is not installed (pip install x)"
    )
    no_triton = ModuleNotFoundError("No module named 'triton'", name="triton")
    assert "triton is not installed" in import_failure(
        no_triton, "kimi_linear.kernels", "pip install triton", ("triton",)
    )
    broken = ImportError("cannot import name 'X' from 'kernels'", name="kernels", path="/a/k.py")
    text = import_failure(broken, "fla.ops.kda", "pip install x")
    assert "installed but failed to import" in text and "/a/k.py" in text
    deep = ModuleNotFoundError("No module named 'einops'", name="einops")
    assert "installed but failed to import" in import_failure(deep, "fla.ops.kda", "pip install x")
