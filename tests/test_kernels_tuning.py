"""Autotuning and launch plumbing of the Triton KDA kernels (issue 21), on the CPU.

- every launch grid keeps what grows with the batch (chunks, sequences x heads) on axis 0, whose
  CUDA limit is 2**31 - 1 blocks (axes 1 and 2 stop at 65,535: a grid with the chunk count
  there fails to launch past ~4.19M packed tokens);
- no autotuned kernel updates a ``[TT, H, V]`` buffer in place (Triton would clone it before
  every benchmarked launch: gigabytes at long context), checked by launching each kernel twice;
- the autotune spaces (``full`` / ``suite`` / ``first``) and ``do_not_specialize``.
"""

from __future__ import annotations

import pytest
import torch
import triton
from kimi_linear.kernels import chunk_bwd, chunk_fwd, chunk_kda, fused_recurrent, utils

KERNEL_MODULES = (chunk_fwd, chunk_bwd, fused_recurrent)


def _kernels():
    for mod in KERNEL_MODULES:
        for name, obj in vars(mod).items():
            if name.endswith("_kernel"):
                yield mod, name, obj


class _Recorder:
    """Stands in for a kernel: records each launch grid (resolved with the config's
    meta-parameters) and launches 0, 1 or 2 times."""

    def __init__(self, name, kernel, log, times):
        self.name, self.kernel, self.log, self.times = name, kernel, log, times

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {**getattr(self.kernel, "kwargs", {}), **kwargs}
            g = grid(meta) if callable(grid) else grid
            self.log.append((self.name, tuple(g)))
            for _ in range(self.times):
                self.kernel[grid](*args, **kwargs)

        return launch


def _record(monkeypatch, times):
    log = []
    for mod, name, obj in _kernels():
        monkeypatch.setattr(mod, name, _Recorder(name, obj, log, times))
    return log


def _inputs(lengths, H=1, D=16, real=False):
    TT = sum(lengths)
    make = (lambda *s: torch.randn(*s)) if real else (lambda *s: torch.zeros(*s))
    q = torch.nn.functional.normalize(make(1, TT, H, D), dim=-1) if real else make(1, TT, H, D)
    k = torch.nn.functional.normalize(make(1, TT, H, D), dim=-1) if real else make(1, TT, H, D)
    v = make(1, TT, H, D)
    g = -torch.rand(1, TT, H, D) if real else make(1, TT, H, D)
    beta = torch.rand(1, TT, H) if real else make(1, TT, H)  # zeros: finite, nothing computed
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    h0 = make(len(lengths), H, D, D) * 0.1 if real else make(len(lengths), H, D, D)
    return [x.requires_grad_() for x in (q, k, v, g, beta, h0)], cu


def _grids(monkeypatch, lengths, H):
    log = _record(monkeypatch, times=0)  # grids only: nothing runs, so any size is cheap
    (q, k, v, g, beta, h0), cu = _inputs(lengths, H)
    o, ht = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    (o.sum() + ht.sum()).backward()
    from kimi_linear.kernels import fused_recurrent_kda

    with torch.no_grad():
        fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu)
    return log


def test_checked_grid_refuses_what_cuda_cannot_launch():
    assert utils.checked_grid(70_000 * 2, 32) == (140_000, 32)
    with pytest.raises(
        ValueError, match="launch grid axis 1 has 70000 blocks, more than CUDA's 65535"
    ):
        utils.checked_grid(2, 70_000, 32)
    with pytest.raises(ValueError, match="axis 0 has 2147483648 blocks"):
        utils.checked_grid(2**31)
    with pytest.raises(ValueError, match="1 to 3 axes"):
        utils.checked_grid(1, 1, 1, 1)


def test_only_axis_0_grows_with_chunks_and_sequences(monkeypatch):
    """Launch grids of the forward, backward and decode kernels at two batch sizes: only axis 0
    may change (so 70,000 chunks or sequences x heads never reach axes 1 and 2)."""
    small = _grids(monkeypatch, [64, 100], H=2)
    monkeypatch.undo()
    big = _grids(monkeypatch, [64, 100, 300, 64, 1000], H=2)
    assert [n for n, _ in small] == [n for n, _ in big] and len(small) >= 10
    grew = set()
    for (name, gs), (_, gb) in zip(small, big):
        assert gs[1:] == gb[1:], f"{name}: grid {gs} -> {gb} grows past axis 0"
        assert all(x <= 2 for x in gb[1:2]) or gb[1:] == gs[1:]
        if gb[0] > gs[0]:
            grew.add(name)
    # the kernels the issue named, and the sequence-parallel ones, now grow on axis 0
    assert {"_chunk_fwd_o_kernel", "_bwd_dqkg_kernel", "_chunk_fwd_state_kernel"} <= grew
    assert {"_chunk_bwd_state_kernel", "_fused_recurrent_kernel"} <= grew


def test_grids_at_70000_chunks_fit_cuda(monkeypatch):
    """The grids the launchers build for 70,000 chunks (4.48M tokens), without allocating."""
    log = _grids(monkeypatch, [64], H=32)
    for name, grid in log:
        # every axis but 0 is independent of the chunk count (test above): scale axis 0 only
        scaled = (grid[0] * 70_000,) + grid[1:]
        assert all(n <= lim for n, lim in zip(scaled[1:], utils.GRID_LIMITS[1:])), name
        utils.checked_grid(*scaled)


def test_no_autotuned_kernel_restores_a_large_buffer():
    """``restore_value`` makes Triton clone the buffer before every benchmarked launch: only
    the ``[TT, H]`` dbeta may be restored, never a ``[TT, H, V]`` buffer such as ddelta."""
    entries = utils.autotuned_kernels()
    assert {e.name for e in entries} >= {"_chunk_bwd_state_kernel", "_bwd_dv_kernel"}
    for e in entries:
        assert set(e.restore_value) <= {"dbeta"}, (e.name, e.restore_value)


@pytest.mark.slow
def test_every_kernel_without_restore_is_idempotent(monkeypatch):
    """Launch every kernel twice in a row (as the autotuner's benchmark does, without any
    restore for kernels that declare none): gradients are bit-identical to single launches."""
    (q, k, v, g, beta, h0), cu = _inputs([70, 20], H=1, real=True)

    def grads():
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
        o, ht = chunk_kda(*xs[:5], initial_state=xs[5], output_final_state=True, cu_seqlens=cu)
        ((o * 0.3).sum() + (ht * 0.7).sum()).backward()
        return [o.detach()] + [x.grad for x in xs]

    once = grads()
    log = []
    for mod, name, obj in _kernels():
        restores = any(e.kernel is obj and e.restore_value for e in utils.autotuned_kernels())
        monkeypatch.setattr(mod, name, _Recorder(name, obj, log, 1 if restores else 2))
    twice = grads()
    for a, b in zip(once, twice):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autotune_spaces_and_switch(monkeypatch):
    entries = utils.autotuned_kernels()
    for e in entries:
        suite = utils.space_configs(e, "suite")
        assert utils.config_id(suite[0]) == utils.config_id(e.full[0])
        assert {utils.config_id(c) for c in suite} <= {utils.config_id(c) for c in e.full}
        assert len(suite) <= 2 and utils.space_configs(e, "first") == e.full[:1]
    total_full = sum(len(e.full) for e in entries)
    total_suite = sum(len(utils.space_configs(e, "suite")) for e in entries)
    assert total_suite <= len(entries) + 5 < total_full
    with pytest.raises(ValueError, match="space must be one of full, suite, first, got 'fast'"):
        utils.set_autotune_space("fast")
    monkeypatch.setenv(utils.AUTOTUNE_ENV, "quick")
    with pytest.raises(ValueError, match="KIMI_LINEAR_AUTOTUNE must be one of"):
        utils.autotune_space()
    monkeypatch.setenv(utils.AUTOTUNE_ENV, "suite")
    assert utils.autotune_space() == "suite"
    utils.set_autotune_space("first")
    try:
        assert utils.autotune_space() == "first"
    finally:
        utils.set_autotune_space(None)
    with pytest.raises(ValueError, match="suite must list distinct config indices starting with 0"):
        utils.autotune([triton.Config({}, num_warps=4)], key=["K"], suite=(1,))


@pytest.mark.slow
def test_integer_arguments_are_not_specialised():
    """H and the size buckets never get their own binaries (values 1, 16, 64, ... would).

    Checked on the JIT functions a GPU run uses (the interpreter keeps no such flags): in a
    process without ``TRITON_INTERPRET``."""
    import os
    import subprocess
    import sys

    code = (
        "from kimi_linear.kernels import chunk_fwd, chunk_bwd, fused_recurrent, utils\n"
        "bad = []\n"
        "for mod in (chunk_fwd, chunk_bwd, fused_recurrent):\n"
        "    for name, obj in vars(mod).items():\n"
        "        if not name.endswith('_kernel'):\n"
        "            continue\n"
        "        fn = obj\n"
        "        while not hasattr(fn, 'params'):\n"
        "            fn = fn.fn\n"
        "        ints = [p for p in fn.params if p.name in ('H', *utils.TUNE_KEYS)]\n"
        "        if not ints or not all(p.do_not_specialize for p in ints):\n"
        "            bad.append(name)\n"
        "print('BAD', bad)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert "BAD []" in out.stdout, out.stdout + out.stderr[-2000:]
