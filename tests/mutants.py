"""Planted bugs (mutants) that the test suite must catch: a pytest plugin and a runner.

Each mutant is a small plausible bug, planted by monkeypatching when the test session starts;
the repository's files are never modified (kernel mutants import an edited copy of a kernel
module, written to a temporary directory, in place of the original). The runner runs each
mutant's target tests and reports whether they failed, as they must::

    python tests/mutants.py                 # every mutant: caught / MISSED (exit 1 if missed)
    python tests/mutants.py dg_state_term   # some of them
    python tests/mutants.py --list

or by hand, as a pytest plugin (``tests`` on the path)::

    MUTANT=dk_x2_term PYTHONPATH=tests python -m pytest -p mutants tests/test_kernels_grads.py

Kernel mutants edit the source text of ``kimi_linear.kernels.chunk_bwd``; when the kernels are
rewritten and a pattern no longer occurs, the mutant reports "pattern not found" (update its
pattern to the new code) instead of passing silently. A mutant that crashes the test process
(out-of-bounds writes under the interpreter) counts as caught.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    doc: str
    tests: tuple[str, ...]  #: test files (or node ids) that must fail
    edits: tuple[tuple[str, str], ...] = ()  #: (old, new) in kernels/kda/chunk_bwd.py
    plant: Callable[[], None] | None = field(default=None, compare=False)


def _plant_chunk_offsets() -> None:
    """Every packed sequence gets the first sequence's chunk count in ``chunk_offsets``."""
    import kimi_linear.kernels.utils as U
    import torch
    import triton

    @functools.lru_cache(maxsize=128)
    def chunk_tables(offsets, device, chunk_size=U.CHUNK_SIZE):
        indices, chunk_offsets, first = [], [0], None
        for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
            num = triton.cdiv(eos - bos, chunk_size)
            first = num if first is None else first
            indices.extend([n, c] for c in range(num))
            chunk_offsets.append(chunk_offsets[-1] + first)  # the bug: `first`, not `num`
        t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
        return U.ChunkTables(
            t(list(offsets)), t(indices).reshape(-1, 2), t(chunk_offsets), len(indices)
        )

    U.chunk_tables = chunk_tables


def _plant_lr_per_epoch() -> None:
    from kimi_linear.lightning.module import KimiLinearLitModule

    original = KimiLinearLitModule.configure_optimizers

    def configure_optimizers(self):
        out = original(self)
        out["lr_scheduler"]["interval"] = "epoch"  # the bug
        return out

    KimiLinearLitModule.configure_optimizers = configure_optimizers


def _zero_grad(w):
    """``w``'s values with a zero gradient (``w`` stays in the graph: its ``.grad`` is zeros)."""
    return w.detach() + 0 * w


def _plant_moe_grouped_zero_w2() -> None:
    import torch
    import torch.nn.functional as F

    from kimi_linear.layers.moe import GroupedExperts

    def _run_grouped_mm(self, x_sorted, counts):
        offs = counts.cumsum(0).to(torch.int32)
        gate = torch._grouped_mm(x_sorted, self.w1.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(x_sorted, self.w3.transpose(-2, -1), offs=offs)
        w2 = _zero_grad(self.w2)  # the bug
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)

    GroupedExperts._run_grouped_mm = _run_grouped_mm


def _plant_moe_loop_zero_w1() -> None:
    import torch
    import torch.nn.functional as F

    from kimi_linear.layers.moe import GroupedExperts

    def _run_loop(self, x_sorted, counts):
        outputs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            xe = x_sorted[start : start + n]
            w1 = _zero_grad(self.w1[e])  # the bug
            outputs.append(
                F.linear(F.silu(F.linear(xe, w1)) * F.linear(xe, self.w3[e]), self.w2[e])
            )
            start += n
        if not outputs:
            return x_sorted.new_zeros(0, self.hidden_size)
        return torch.cat(outputs, dim=0)

    GroupedExperts._run_loop = _run_loop


KERNEL_TESTS = ("tests/test_kernels_grads.py",)
MUTANTS: dict[str, Mutant] = {
    "dg_state_term": Mutant(
        "dg misses exp(G_last) rowsum(S0 * dS1) on each chunk's last row (vanishes without a "
        "short tail chunk or weak decay)",
        KERNEL_TESTS,
        (
            (
                "b_dgl = tl.sum(b_x2k, axis=0) + tl.exp(b_gl) * b_sds",
                "b_dgl = tl.sum(b_x2k, axis=0)",
            ),
        ),
    ),
    "dg_x2k_term": Mutant(
        "dg misses -X2 k El (the chunk-end state gradient's term)",
        KERNEL_TESTS,
        (
            (
                "b_dg = b_x1 * b_q * b_e - b_x2k - b_x3e * b_k",
                "b_dg = b_x1 * b_q * b_e - b_x3e * b_k",
            ),
        ),
    ),
    "dg_intra_q_term": Mutant(
        "dg misses the intra-chunk q^ Yq term",
        KERNEL_TESTS,
        (("dG_p + off_r, b_q * b_yq + b_beta", "dG_p + off_r, b_beta"),),
    ),
    "dk_x2_term": Mutant(
        "dk misses X2 El (the chunk-end state gradient's term)",
        KERNEL_TESTS,
        (("b_dk = b_x2 * b_el - b_x3e +", "b_dk = -b_x3e +"),),
    ),
    "dk_x3_term": Mutant(
        "dk misses -X3 E (through the residual's S0 k)",
        KERNEL_TESTS,
        (("b_dk = b_x2 * b_el - b_x3e +", "b_dk = b_x2 * b_el +"),),
    ),
    "dk_zk_term": Mutant(
        "dk misses the intra-chunk Zk term (column side of dL)",
        KERNEL_TESTS,
        (
            (
                "b_beta[:, None] * b_yk + b_zq + b_zk, mask=m_rd)",
                "b_beta[:, None] * b_yk + b_zq, mask=m_rd)",
            ),
        ),
    ),
    "chunk_offsets": Mutant(
        "varlen: every packed sequence gets the first sequence's chunk count",
        ("tests/test_kernels_varlen.py",),
        plant=_plant_chunk_offsets,
    ),
    "lr_per_epoch": Mutant(
        "the LR scheduler steps once per epoch instead of every optimizer step",
        ("tests/test_schedule.py",),
        plant=_plant_lr_per_epoch,
    ),
    "moe_grouped_zero_w2": Mutant(
        "MoE grouped_mm path: zero gradient for the experts' w2",
        ("tests/test_moe.py::test_grouped_mm_matches_loop",),
        plant=_plant_moe_grouped_zero_w2,
    ),
    "moe_loop_zero_w1": Mutant(
        "MoE loop path: zero gradient for the experts' w1",
        ("tests/test_moe.py::test_gradients_match_naive_reference",),
        plant=_plant_moe_loop_zero_w1,
    ),
}


def missing_pattern(name: str) -> str | None:
    """The first source pattern of kernel mutant ``name`` that does not occur exactly once in
    ``kernels/kda/chunk_bwd.py`` (``None``: the mutant can be planted)."""
    source = (ROOT / "kernels" / "kda" / "chunk_bwd.py").read_text()
    for old, _ in MUTANTS[name].edits:
        if source.count(old) != 1:
            return old
    return None


def _plant_kernel_edits(name: str, edits: tuple[tuple[str, str], ...]) -> None:
    """Import an edited copy of ``kernels/kda/chunk_bwd.py`` and route ``chunk_kda``'s backward to it."""
    import kimi_linear.kernels.chunk as chunk

    source = (ROOT / "kernels" / "kda" / "chunk_bwd.py").read_text()
    for old, new in edits:
        count = source.count(old)
        if count != 1:
            raise RuntimeError(
                f"mutant {name}: pattern found {count} times in kernels/kda/chunk_bwd.py (the kernel "
                f"changed: update the mutant): {old!r}"
            )
        source = source.replace(old, new)
    # Triton reads kernel source from the file: the copy must exist on disk while it runs.
    path = Path(tempfile.mkdtemp(prefix="kda_mutant_")) / f"_mutant_{name}.py"
    path.write_text(source)
    module_name = f"kimi_linear.kernels._mutant_{name}"  # a sibling: relative imports work
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    chunk.chunk_kda_bwd = module.chunk_kda_bwd


def plant(name: str) -> None:
    """Plant mutant ``name`` in this process."""
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; known: {', '.join(MUTANTS)}")
    mutant = MUTANTS[name]
    if mutant.edits:
        _plant_kernel_edits(name, mutant.edits)
    else:
        mutant.plant()


# ------------------------------------------------------------------------- pytest plugin
def pytest_sessionstart(session) -> None:
    name = os.environ.get("MUTANT")
    if name:
        import torch

        if not torch.cuda.is_available():  # before the kernels are imported (as conftest.py)
            os.environ.setdefault("TRITON_INTERPRET", "1")
        plant(name)


def pytest_report_header(config) -> str | None:
    name = os.environ.get("MUTANT")
    return f"MUTANT {name} planted: {MUTANTS[name].doc}" if name in MUTANTS else None


# ------------------------------------------------------------------------- runner
def run_tests(tests: tuple[str, ...], mutant: str | None) -> int:
    """Exit code of ``pytest -x`` on ``tests`` in a fresh process with ``mutant`` planted."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("MUTANT", None)
    if mutant:
        env["MUTANT"] = mutant
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-p",
        "mutants",
        *tests,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"mutants to run (default: all): {', '.join(MUTANTS)}")
    p.add_argument("--list", action="store_true", help="list the mutants and their target tests")
    args = p.parse_args(argv)
    for name in args.names:
        if name not in MUTANTS:
            p.error(f"unknown mutant {name!r}; known: {', '.join(MUTANTS)}")
    names = args.names or list(MUTANTS)
    if args.list:
        for name in names:
            print(f"{name}: {MUTANTS[name].doc} [{' '.join(MUTANTS[name].tests)}]")
        return 0
    missed = 0
    # the targets must pass without a mutant, or a "catch" proves nothing
    for tests in dict.fromkeys(MUTANTS[n].tests for n in names):
        rc = run_tests(tests, None)
        if rc != 0:
            print(f"baseline: {' '.join(tests)} fails without a mutant (exit {rc}): fix that first")
            return 2
    print("| mutant | target tests | result |\n|---|---|---|")
    for name in names:
        rc = run_tests(MUTANTS[name].tests, name)
        if rc == 1:
            result = "caught"
        elif rc < 0 or rc > 128:  # the test process crashed (e.g. out-of-bounds writes)
            result = f"caught (crash, exit {rc})"
        else:  # 0: every test passed; 2-5: interrupted, internal or usage error
            result = "MISSED" if rc == 0 else f"error (exit {rc})"
        missed += not result.startswith("caught")
        print(f"| {name} | {' '.join(MUTANTS[name].tests)} | {result} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
