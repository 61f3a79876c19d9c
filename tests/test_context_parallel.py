"""Context parallelism (kimi_linear/context_parallel.py).

Single-process checks of the algebra (shards simulated in one process, float64): the fold of
the shards' affine transitions ``(M, H)`` gives every shard's true start state, and the outputs
``o_0 + o_q @ S_0`` equal the full recurrence, with documents crossing shard borders. The
multi-process checks (gloo on CPU: CP 2 / CP 4 / dp 2 x cp 2 against one process) run
tests/cp_worker.py in subprocesses and are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi_linear.context_parallel import (
    ContextParallel,
    fold_transitions,
    kda_shard_transition,
    shard_batch,
    shard_bounds,
)
from kimi_linear.ops import naive_recurrent_kda, torch_chunk_kda
from kimi_linear.testing import assert_rel_close

WORKER = Path(__file__).with_name("cp_worker.py")


def _inputs(T: int, B: int = 1, H: int = 2, K: int = 8, V: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, dtype=d), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, dtype=d), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=d)
    g = -torch.rand(B, T, H, K, generator=gen, dtype=d) * 0.3
    beta = torch.rand(B, T, H, generator=gen, dtype=d)
    return q, k, v, g, beta


def _simulate(inputs, cp_size: int, cu_seqlens: torch.Tensor | None = None):
    """Every shard's transition, the fold, and the shards' outputs, in one process."""
    q, k, v, g, beta = inputs
    T = q.shape[1]
    layouts = [ContextParallel.build(T, cu_seqlens, rank=r, size=cp_size) for r in range(cp_size)]
    parts = []
    for cp in layouts:
        s, e = cp.start, cp.end
        parts.append(
            kda_shard_transition(
                *(t[:, s:e] for t in (q, k, v, g, beta)),
                carry=cp.carry,
                cu_seqlens=cp.local_cu_seqlens,
                backend="torch",
                chunk_size=4,
            )
        )
    M = torch.stack([p[2] for p in parts])
    H = torch.stack([p[3] for p in parts])
    starts = fold_transitions(M, H)
    outs = []
    for r, (o0, oq, _, _) in enumerate(parts):
        outs.append(o0 if oq is None else o0 + torch.einsum("bthk,bhkv->bthv", oq, starts[r]))
    final = M[-1] @ starts[-1] + H[-1]
    return torch.cat(outs, dim=1), final, layouts


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_fold_of_shard_transitions_is_the_full_recurrence(cp_size: int) -> None:
    """B = 2 rows, T = 23 (no multiple of CP x chunk): outputs and final state in float64."""
    inputs = _inputs(23, B=2)
    o_ref, s_ref = naive_recurrent_kda(*inputs, output_final_state=True)
    o, s, _ = _simulate(inputs, cp_size)
    assert_rel_close(o, o_ref, 1e-10, "o")
    assert_rel_close(s, s_ref, 1e-10, "final state")


@pytest.mark.parametrize("cp_size", [2, 4])
def test_fold_with_documents_crossing_shard_borders(cp_size: int) -> None:
    """Packed documents: one crossing every border, one of length 1 at a border (T = 19,
    CP 4: shards [0, 5), [5, 10), [10, 15), [15, 19); the document [10, 11) is one token)."""
    T = 19
    cu = torch.tensor([0, 3, 10, 11, 17, T], dtype=torch.int32)
    inputs = _inputs(T, B=1, seed=1)
    o_ref, s_ref = torch_chunk_kda(*inputs, cu_seqlens=cu, output_final_state=True)
    o, s, layouts = _simulate(inputs, cp_size, cu)
    assert_rel_close(o, o_ref, 1e-10, "o")
    assert_rel_close(s[0], s_ref[-1], 1e-10, "final state of the last document")
    if cp_size == 4:
        assert [c.carry for c in layouts] == [False, True, False, True]


def test_fold_keeps_float32_and_cuts_at_a_reset() -> None:
    M = torch.zeros(3, 1, 1, 2, 2)
    H = torch.randn(3, 1, 1, 2, 3)
    M[0] = torch.eye(2)
    starts = fold_transitions(M, H)
    assert starts.dtype == torch.float32 and torch.equal(starts[0], torch.zeros_like(H[0]))
    assert torch.equal(starts[1], H[0]) and torch.equal(starts[2], H[1])  # M[1] = 0: a reset


def test_shard_bounds_and_errors() -> None:
    assert shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert shard_bounds(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    with pytest.raises(ValueError, match="sequence length 3 is shorter than the context-parallel"):
        shard_bounds(3, 4)
    with pytest.raises(ValueError, match="context-parallel degree must be an int >= 1"):
        shard_bounds(3, 0)
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        ContextParallel.build(8)


def test_shard_batch_keeps_the_label_of_the_last_token() -> None:
    ids = torch.arange(10)[None]
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    shards = [shard_batch(ids, ids, cu, rank=r, size=3) for r in range(3)]
    assert [s.input_ids.tolist()[0] for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    # the label of position 2 is token 3 (same rank); position 3 ends a document: not scored;
    # position 6 (last of rank 1) is scored on token 7 (rank 2); the row's last token on none
    assert shards[0].targets.tolist() == [[1, 2, 3, -100]]
    assert shards[1].targets.tolist() == [[5, 6, 7]]
    assert shards[2].targets.tolist() == [[8, 9, -100]]
    assert shards[1].cp.local_cu_seqlens.tolist() == [0, 3] and shards[1].cp.carry is False
    assert shards[1].cp.positions.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        shard_batch(ids, ids[:, :5], rank=0, size=2)


# ------------------------------------------------------------------ several processes (gloo)
def _run_worker(mode: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER), mode, str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / f"{mode}.json").read_text())


@pytest.mark.slow
def test_cp_matches_one_process(tmp_path: Path) -> None:
    """4 ranks (gloo): CP 4 and dp 2 x cp 2 (two CP groups of 2) against one process on the same
    global batches, for the hybrid, KDA-only and K2-style (RoPE, low-rank q) models: a packed
    row of 37 tokens whose documents cross shard borders with a one-token document at a border,
    and (hybrid) 2 plain rows. Logits, loss and every parameter gradient (summed over cp,
    averaged over dp) within 1e-5 relative per tensor; QK-Clip max logits and MoE loads
    reduced over the group equal the single-process ones."""
    results = _run_worker("parity", tmp_path)
    assert len(results) == 8
    for case, r in results.items():
        for key in ("logits", "loss", "grads", "loads", "max_logits"):
            assert r[key] <= 1e-5, f"{case}: {key} relative error {r[key]:.2e}"
        assert r["zero_grads"] == 0, case  # every gradient carries signal
        assert r["n_max_logits"] == (0 if case.startswith("kda/") else 1), case


@pytest.mark.slow
def test_cp_optimizer_steps_match_one_process(tmp_path: Path) -> None:
    """6 AdamW / MuonClip (QK-Clip at every step) steps under CP 4 and dp 2 x cp 2 equal 6
    single-process steps (every parameter and buffer within 1e-5). Muon's stock Newton-Schulz
    runs in bfloat16: from gradients that agree to 1e-7 it still agrees to ~1e-2 only."""
    results = _run_worker("steps", tmp_path)
    for case, err in results.items():
        limit = 2e-2 if case.startswith("muonclip_bf16") else 1e-5
        assert err <= limit, f"{case}: relative error {err:.2e} > {limit:.0e}"


@pytest.mark.slow
def test_lightning_cp_fit_resume_and_cp1_resume(tmp_path: Path) -> None:
    """Lightning, ContextParallelStrategy(cp_size=2) on 2 ranks, packed rows crossing the shard
    border: 6 AdamW / MuonClip steps equal 6 single-process steps (1e-5; Muon's Newton-Schulz in
    float32); resumed from the step-3 sharded checkpoint the run is bit-identical; the CP = 2
    checkpoint resumed at CP = 1 (one process) ends within 1e-5 of it."""
    proc = subprocess.run(
        [sys.executable, str(WORKER), "fit", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "ckpt" / "step3.ckpt"
    assert ckpt.is_dir()  # a sharded folder
    proc = subprocess.run(
        [sys.executable, str(WORKER), "one", str(tmp_path), str(ckpt)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fit = torch.load(tmp_path / "fit.pt", weights_only=False)
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    assert fit["muonclip_resumed_step"] == one["muonclip_resumed_cp1_step"] == 6
    for name in ("adamw", "muonclip"):
        for key, ref in one[name].items():
            assert_rel_close(
                fit[name][key].float(), ref.float(), 1e-5, f"{name}: {key}", min_norm=-1
            )
    for key, ref in fit["muonclip"].items():
        assert torch.equal(fit["muonclip_resumed"][key], ref), key
        got = one["muonclip_resumed_cp1"][key].float()
        assert_rel_close(got, ref.float(), 1e-5, f"cp1 resume: {key}", min_norm=-1)


# ------------------------------------------------------------------ named errors
def test_cp_strategy_errors() -> None:
    from kimi_linear.errors import UsageError
    from kimi_linear.lightning.context_parallel import ContextParallelStrategy

    with pytest.raises(UsageError, match="strategy.cp_size must be an int >= 1"):
        ContextParallelStrategy(cp_size=0)
    with pytest.raises(UsageError, match="replicate_size > 1 \\(HSDP\\) is not supported yet"):
        ContextParallelStrategy(cp_size=2, replicate_size=2)
    s = ContextParallelStrategy(cp_size=3)
    s.parallel_devices = [torch.device("cpu")] * 4
    with pytest.raises(UsageError, match="strategy.cp_size=3 must divide the world size \\(4"):
        s.setup_environment()


def test_cp_layer_and_model_errors() -> None:
    from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM

    cfg = KimiLinearConfig.from_preset("tiny", num_hidden_layers=2, mla_every=2, vocab_size=64)
    model = KimiLinearForCausalLM(cfg)
    cp = ContextParallel.build(8, rank=0, size=2)
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="cp\\) cannot be combined with labels"):
        model(ids, labels=ids, cp=cp)
    with pytest.raises(ValueError, match="cp\\) cannot be combined with cu_seqlens"):
        model(ids, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), cp=cp)
    x = torch.randn(1, 4, cfg.hidden_size)
    kda, mla = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    with pytest.raises(ValueError, match="cp\\) cannot be combined with a cache"):
        kda(x, cache=model.new_cache(1).layers[0], cp=cp)
    with pytest.raises(ValueError, match="cp\\) cannot be combined with a cache"):
        mla(x, position_offset=3, cp=cp)
