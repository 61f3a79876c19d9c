"""The static cost model (``benchmarks/kernel_cost.py``): its counting on toy kernels with known
costs (bytes of a read-modify-write, partial reads, torch memsets and casts as launches,
exponentials and elementwise ops), its extrapolation, and a small run of ours and fla.

Toy kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _kc():
    return importlib.import_module("benchmarks.kernel_cost")


@triton.jit
def _add_one_in_place(x, N: tl.constexpr):
    """x += 1 over N fp32 elements: a read-modify-write of x."""
    o = tl.arange(0, N)
    tl.store(x + o, tl.load(x + o) + 1.0)


@triton.jit
def _copy_first_half(x, y, N: tl.constexpr):
    """y[:N//2] = x[:N//2] (x of N elements is half read, y half written)."""
    o = tl.arange(0, N)
    m = o < N // 2
    tl.store(y + o, tl.load(x + o, mask=m, other=0.0), mask=m)


@triton.jit
def _transcendentals(x, y, N: tl.constexpr):
    """y = exp(x) + 2 * exp2(x) + log(x): 2N exponentials, N logs, 3N other float ops."""
    o = tl.arange(0, N)
    b = tl.load(x + o)
    tl.store(y + o, tl.exp(b) + 2.0 * tl.exp2(b) + tl.log(b))


@triton.jit
def _dot_kernel(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """c = a @ b for one [M, K] x [K, N] tile."""
    om, on, ok = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    ta = tl.load(a + om[:, None] * K + ok[None, :])
    tb = tl.load(b + ok[:, None] * N + on[None, :])
    tl.store(c + om[:, None] * N + on[None, :], tl.dot(ta, tb))


def _only(rec, kind):
    events = [e for e in rec.events if e.kind == kind]
    assert len(events) == 1, [(e.kind, e.name) for e in rec.events]
    return events[0]


def test_read_modify_write_counts_twice():
    kc = _kc()
    x = torch.zeros(64)
    rec, _ = kc.record(lambda: _add_one_in_place[(1,)](x, N=64))
    ev = _only(rec, "triton")
    assert ev.name == "_add_one_in_place"
    assert ev.args == {"x": [256.0, 256.0]}  # 64 fp32 read, then written: 512 bytes
    assert ev.counts["read_bytes"] + ev.counts["write_bytes"] == 512
    assert torch.equal(x, torch.ones(64))  # the kernel really ran


def test_partial_read_counts_only_what_is_read():
    kc = _kc()
    x, y = torch.randn(64), torch.zeros(64)
    rec, _ = kc.record(lambda: _copy_first_half[(1,)](x, y, N=64))
    ev = _only(rec, "triton")
    assert ev.args == {"x": [128.0, 0.0], "y": [0.0, 128.0]}  # 32 of 64 elements each


def test_repeated_reads_count_once_as_bytes_and_every_time_as_accesses():
    kc = _kc()
    x = torch.zeros(64)
    rec, _ = kc.record(lambda: _add_one_in_place[(3,)](x, N=64))  # 3 programs, same tile
    ev = _only(rec, "triton")
    assert ev.counts["read_bytes"] == 256 and ev.counts["write_bytes"] == 256
    assert ev.counts["access_read_bytes"] == 3 * 256
    assert ev.counts["access_write_bytes"] == 3 * 256


def test_memsets_and_casts_are_launches_views_and_allocations_are_not():
    kc = _kc()

    def host():
        buf = torch.zeros(64)  # a memset: one launch, 256 bytes written
        out = torch.empty(64)  # an allocation: nothing
        _copy_first_half[(1,)](buf.view(8, 8), out, N=64)  # a view: nothing
        same = out.to(torch.float32)  # no-op cast: nothing
        return same.to(torch.bfloat16)  # a cast: 256 bytes read, 128 written

    rec, _ = kc.record(host)
    names = [(e.kind, e.name) for e in rec.events]
    assert names == [
        ("torch", "aten.zeros"),
        ("triton", "_copy_first_half"),
        ("torch", "aten._to_copy"),
    ], names
    memset, _, cast = rec.events
    assert memset.counts["read_bytes"] == 0 and memset.counts["write_bytes"] == 256
    assert cast.counts["read_bytes"] == 256 and cast.counts["write_bytes"] == 128


def test_zero_fill_in_place_reads_nothing_and_item_is_a_sync():
    kc = _kc()
    x = torch.ones(32)

    def host():
        x.zero_()
        return x.sum().item()

    rec, value = kc.record(host)
    assert value == 0.0
    zero, total = rec.events
    assert zero.name == "aten.zero_" and zero.counts["read_bytes"] == 0
    assert zero.counts["write_bytes"] == 128
    assert total.name == "aten.sum" and total.counts["read_bytes"] == 128
    assert rec.syncs["forward"] == 1


def test_exponentials_logs_and_elementwise_ops_are_counted():
    kc = _kc()
    x, y = torch.rand(64) + 0.5, torch.empty(64)
    rec, _ = kc.record(lambda: _transcendentals[(1,)](x, y, N=64))
    ev = _only(rec, "triton")
    assert ev.counts["exp"] == 2 * 64  # tl.exp and tl.exp2
    assert ev.counts["log"] == 64
    assert ev.counts["elementwise"] == 3 * 64  # 2.0 * _, and two additions
    want = torch.exp(x) + 2 * torch.exp2(x) + torch.log(x)
    torch.testing.assert_close(y, want)


def test_dot_flops_by_operand_dtype():
    kc = _kc()
    a, b = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(32, 16, dtype=torch.bfloat16)
    c = torch.empty(16, 16)
    rec, _ = kc.record(lambda: _dot_kernel[(1,)](a, b, c, M=16, N=16, K=32))
    ev = _only(rec, "triton")
    assert ev.counts["flops_bf16"] == 2 * 16 * 16 * 32
    assert ev.counts["elementwise"] == 0
    assert ev.args == {"a": [1024.0, 0.0], "b": [1024.0, 0.0], "c": [0.0, 1024.0]}


def test_fit_is_exact_for_linear_costs():
    kc = _kc()

    def cost(B, H, T):  # constant + per sequence-head + per token-head
        return 7.0 + B * H * (3.0 * T + 11.0)

    c, a, b = kc._coef(cost(1, 1, 64), cost(1, 1, 128), cost(1, 2, 64), 64)
    assert (c, a, b) == pytest.approx((7.0, 3.0, 11.0))


def _run(*args, out_dir):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_cost", *args, "--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_small_run_counts_ours_and_fla(tmp_path):
    """The model at a small shape, ours (both gate paths) and fla: every phase launches,
    moves bytes, runs tensor FLOPs and exponentials; fla's forward memsets are launches."""
    proc = _run(
        "--shapes", "1x2x128", "--head-dim", "16", "--count-tokens", "64",
        "--providers", "ours", "ours_safe", "fla", out_dir=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernel_cost.json").read_text())
    assert (tmp_path / "kernel_cost.md").exists()
    rows = {(r["provider"], r["phase"]): r for r in result["totals"]}
    assert set(rows) == {
        (p, ph) for p in ("ours", "ours_safe", "fla") for ph in ("forward", "backward")
    }
    for row in rows.values():
        assert row["launches"] > 0 and row["bytes"] > 0, row
        assert row["tensor_gflop"] > 0 and row["gexp"] > 0 and row["gelementwise"] > 0, row
    assert rows[("ours", "forward")]["triton"] == 4  # cumsum, intra + solve, state, output
    fla_fwd = rows[("fla", "forward")]
    assert fla_fwd["torch"] >= 1 and fla_fwd["launches"] == fla_fwd["triton"] + fla_fwd["torch"]
    # the safe gate forms the diagonal blocks by tensor-core products: fewer exponentials
    assert rows[("ours_safe", "forward")]["gexp"] < rows[("ours", "forward")]["gexp"]
    ratios = {(r["ratio"], r["phase"]) for r in result["ratios"]}
    assert ("ours/fla", "forward+backward") in ratios and ("ours_safe/fla", "forward") in ratios


def test_refuses_to_overwrite_committed_results():
    kc = _kc()
    committed = BENCH / "results" / "cpu" / "kernel_cost.json"
    if not committed.exists():
        pytest.skip("no committed kernel_cost results")
    with pytest.raises(SystemExit) as e:
        kc.main(["--providers", "ours"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shapes", "4x32"], "shape must be BxHxT"),
        (["--shapes", "1x1x100"], "multiple of 64"),
        (["--head-dim", "512"], "--head-dim must be in"),
        (["--count-tokens", "10"], "--count-tokens must be"),
        (["--dtype", "int8"], "--dtype must be one of"),
        (["--providers", "nope"], "invalid choice"),
    ],
)
def test_rejects_bad_arguments(tmp_path, args, message, capsys):
    kc = _kc()
    with pytest.raises(SystemExit) as e:
        kc.main([*args, "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
