"""``python -m kimi_linear.kernels.compile_check``: tensor-core kinds from PTX, CTAs per SM from
the architecture's limits, a non-zero exit for kernels that cannot be resident, argument errors.

The fast tests exercise the parsing and the occupancy rules on known values; the slow ones run
Triton's ahead-of-time compiler (no GPU needed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kimi_linear.kernels import compile_check as cc

KB = 1024


def test_mma_kinds_from_ptx():
    ptx = """
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
        wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {%f1}, %rd3, %rd4, p, 1, 1;
        mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f3};
        mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f3};
        wgmma.fence.sync.aligned;
        wgmma.commit_group.sync.aligned;
        fma.rn.f32 %f1, %f2, %f3, %f4;
    """
    assert cc.mma_kinds(ptx) == ["mma.f16", "mma.tf32", "wgmma.bf16", "wgmma.tf32"]
    assert cc.mma_kinds("fma.rn.f32 %f1, %f2, %f3, %f4;") == []
    # f16 accumulators: the A operand type is the second one after the shape
    assert cc.mma_kinds("mma.sync.aligned.m16n8k16.row.col.f16.bf16.bf16.f16 {") == ["mma.bf16"]


@pytest.mark.parametrize(
    "arch,warps,regs,shared,expected",
    [
        # 255 registers round to 256 x 32 = 8192 per warp: 2 warps per sub-partition, 8 per SM
        (90, 8, 255, 32 * KB, (1, "registers")),
        (90, 4, 255, 32 * KB, (2, "registers")),
        (90, 4, 128, 16 * KB, (4, "registers")),  # 16 warps by registers
        # 100 KiB + 1 KiB reserved per CTA: two fit in 228 KiB, one in sm_80's 164 KiB
        (90, 4, 32, 100 * KB, (2, "shared")),
        (80, 4, 32, 100 * KB, (1, "shared")),
        (90, 1, 16, 0, (32, "ctas")),  # resident-CTA cap
        (86, 16, 32, 0, (3, "warps")),  # 48 warps per SM
        # cannot be resident: more shared memory than a block may have, more registers than an SM
        (90, 4, 32, 227 * KB + 1, (0, "shared")),
        (80, 4, 32, 163 * KB + 1, (0, "shared")),
        (90, 16, 255, 0, (0, "registers")),
        (90, 4, None, 0, (None, None)),  # no register count (no cuobjdump)
    ],
)
def test_ctas_per_sm(arch, warps, regs, shared, expected):
    assert cc.ctas_per_sm(arch, warps, regs, shared) == expected


def test_arch_limits_cover_the_choices():
    assert {80, 90} <= set(cc.ARCH_LIMITS)
    assert cc.ARCH_LIMITS[90].max_shared_per_block == 232448  # 227 KiB
    assert cc.ARCH_LIMITS[80].max_shared_per_block == 166912  # 163 KiB
    for lim in cc.ARCH_LIMITS.values():
        assert lim.max_shared_per_block < lim.shared_per_sm


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--arch", "75"], "invalid choice"),
        (["--head-dim", "512"], "--head-dim must be in"),
        (["--head-dim", "0"], "--head-dim must be in"),
        (["--value-dim", "300"], "--value-dim must be in"),
        (["--num-warps", "3"], "power of two"),
        (["--num-stages", "0"], "--num-stages must be >= 1"),
        (["--dtype", "fp64"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cc.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(arch=75), "arch must be one of"),
        (dict(dtype="fp64"), "dtype must be one of"),
        (dict(head_dim_k=257), "head_dim_k must be in"),
        (dict(head_dim_k=64, head_dim_v=512), "head_dim_v must be in"),
    ],
)
def test_check_validates_before_compiling(kwargs, message, monkeypatch):
    def no_compile(*args, **kw):
        raise AssertionError("compiled")

    monkeypatch.setattr(cc.triton, "compile", no_compile)
    with pytest.raises(ValueError, match=message):
        cc.check(**kwargs)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "kimi_linear.kernels.compile_check", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_report_fields_for_sm90_bf16(tmp_path):
    prefix = tmp_path / "compile"
    proc = _run("--arch", "90", "--dtype", "bf16", "--head-dim", "64", "--save", str(prefix))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert report["args"]["arch"] == 90
    for r in report["results"]:
        assert r["ok"] and r["fits"], r
        assert r["num_warps"] in (1, 2, 4, 8, 16)
        assert r["ctas_per_sm"] >= 1 and r["limited_by"] in ("registers", "shared", "warps", "ctas")
        assert all(k.split(".")[0] in ("wgmma", "mma") for k in r["mma"])
    # every chunk kernel but the gate cumsum multiplies matrices on tensor cores
    with_mma = {r["kernel"] for r in report["results"] if r["mma"]}
    assert "_chunk_fwd_o_kernel" in with_mma and "_bwd_dv_kernel" in with_mma
    assert "| mma |" in prefix.with_suffix(".md").read_text()


def test_exit_code_and_message_when_a_kernel_cannot_be_resident(monkeypatch, capsys):
    """Compiles but needs more shared memory than a block may have: exit 1, the kernel named."""
    too_big = cc.Result("big_kernel", True, 240000, 128, 0, num_warps=8, num_stages=2)
    too_big.ctas_per_sm, too_big.limited_by, too_big.fits = 0, "shared", False
    fine = cc.Result("small_kernel", True, 1024, 64, 0, num_warps=4, num_stages=2)
    fine.ctas_per_sm, fine.limited_by, fine.fits, fine.mma = 8, "registers", True, ["wgmma.bf16"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cc, "check", lambda *a, **k: [fine])
    assert cc.main(["--arch", "90"]) == 0
    out = capsys.readouterr().out
    assert "| small_kernel | yes | 4 | 1024 | 64 | 0 | wgmma.bf16 | 8 (registers) |" in out
    monkeypatch.setattr(cc, "check", lambda *a, **k: [fine, too_big])
    assert cc.main(["--arch", "90"]) == 1
    out = capsys.readouterr().out
    assert "240000 (> 232448: too much)" in out
    assert "big_kernel: needs 240000 bytes of shared memory per block, more than sm_90" in out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_exit_code_agrees_with_the_report_at_head_dim_256(arch, tmp_path):
    """K = V = 256 is where the kernels come closest to the per-block shared-memory limit."""
    prefix = tmp_path / "compile"
    proc = _run("--arch", arch, "--dtype", "bf16", "--head-dim", "256", "--save", str(prefix))
    report = json.loads(prefix.with_suffix(".json").read_text())
    misfits = [r["kernel"] for r in report["results"] if r["fits"] is False]
    assert all(r["ok"] for r in report["results"]), proc.stdout[-3000:]
    assert proc.returncode == (1 if misfits else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in misfits:
        assert f"{name}: needs" in proc.stdout


def _result(name, mma=(), spills=0, ctas=2):
    r = cc.Result(name, True, 1024, 128, spills, num_warps=4, num_stages=2, mma=list(mma))
    r.ctas_per_sm, r.limited_by, r.fits = ctas, "registers", True
    return r


def test_target_misses():
    good = [
        _result("_chunk_a", mma=["wgmma.bf16"]),
        _result("_fused_recurrent_kernel", ctas=1),  # the decode kernel: no CTA target
    ]
    assert cc.target_misses(good, "bf16") == []
    bad = [
        _result("_chunk_tf32", mma=["wgmma.tf32"]),
        _result("_chunk_spill", spills=8),
        _result("_chunk_one_cta", ctas=1),
        cc.Result("_chunk_broken", False, error="CompilationError"),
    ]
    misses = cc.target_misses(bad, "bf16")
    assert [m.split(":")[0] for m in misses] == [
        "_chunk_tf32",
        "_chunk_spill",
        "_chunk_one_cta",
        "_chunk_broken",
    ]
    assert "TF32 tensor-core products (wgmma.tf32) on bf16 inputs" in misses[0]
    assert cc.target_misses([_result("_chunk_tf32", mma=["wgmma.tf32"])], "fp32") == []


def test_targets_flag_sets_the_exit_code(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cc, "check", lambda *a, **k: [_result("_chunk_a", mma=["wgmma.bf16"])])
    assert cc.main(["--targets"]) == 0
    assert "targets: all met" in capsys.readouterr().out
    monkeypatch.setattr(cc, "check", lambda *a, **k: [_result("_chunk_a", spills=16)])
    assert cc.main([]) == 0  # targets are only checked on request
    assert cc.main(["--targets"]) == 1
    assert "- _chunk_a: 16 spill bytes/thread" in capsys.readouterr().out


def test_spaces_compile_each_config_of_the_space(monkeypatch):
    """--space suite / full list one spec per autotune config (first: one per kernel); the
    first config of every kernel is also the first of its suite set."""
    first = cc.kernel_specs(128, 128, "bf16", "first")
    suite = cc.kernel_specs(128, 128, "bf16", "suite")
    full = cc.kernel_specs(128, 128, "bf16", "full")
    assert len(first) < len(suite) < len(full)

    def names(specs):
        out = []
        for k, *_ in specs:
            while hasattr(k, "fn"):
                k = k.fn
            out.append(k.__name__)
        return out

    assert set(names(first)) == set(names(suite)) == set(names(full))
    with pytest.raises(ValueError, match="space must be one of full, suite, first"):
        cc.check(space="all")
