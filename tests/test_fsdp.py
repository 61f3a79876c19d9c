"""FSDP2 sharding, rank-count-independent init, sharded MuonClip and sharded checkpoints.

The two-process checks (gloo on CPU) run tests/fsdp_worker.py in a subprocess; they are marked
slow (each launches two Python processes and trains a tiny model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsdp_worker
import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.errors import UsageError
from kimi_linear.lightning.checkpoints import (
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    load_sharded_state_dict,
)
from kimi_linear.lightning.module import KimiLinearLitModule
from kimi_linear.lightning.parallel import FSDP2Strategy
from kimi_linear.sharding import SEED_BLOCK, param_seed, seeded_normal_, seeded_uniform_
from kimi_linear.testing import rel_error

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _cfg() -> KimiLinearConfig:
    return KimiLinearConfig.from_preset("tiny", num_hidden_layers=2, mla_every=2, vocab_size=64)


# ------------------------------------------------------------------ seeded init (one process)
def test_seeded_init_is_deterministic_and_ignores_the_global_rng() -> None:
    torch.manual_seed(0)
    a = KimiLinearForCausalLM(_cfg())
    a.reset_parameters(seed=5)
    torch.manual_seed(123)
    with torch.device("meta"):
        b = KimiLinearForCausalLM(_cfg())
    b.to_empty(device="cpu")
    b.reset_parameters(seed=5)  # from the meta device, buffers included
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = KimiLinearForCausalLM(_cfg())
    c.reset_parameters(seed=6)
    assert not torch.equal(
        sa["model.embed_tokens.weight"], c.state_dict()["model.embed_tokens.weight"]
    )
    std = _cfg().initializer_range
    w = sa["model.layers.0.self_attn.q_proj.weight"]
    assert abs(float(w.std()) - std) < 0.1 * std
    assert torch.equal(sa["model.norm.weight"], torch.ones_like(sa["model.norm.weight"]))
    # the KDA gate recipe: A in [1, 16], softplus(dt_bias) in [1e-3, 1e-1]
    a_log = sa["model.layers.0.self_attn.A_log"]
    assert bool(((a_log.exp() >= 1) & (a_log.exp() <= 16)).all())
    dt = torch.nn.functional.softplus(sa["model.layers.0.self_attn.dt_bias"])
    assert bool(((dt > 0.9e-3) & (dt < 1.1e-1)).all())


def test_seeded_stream_is_blockwise() -> None:
    """Values depend on (seed, name, position) only: a tensor spanning two blocks equals the
    blocks drawn on their own (what a rank holding part of the rows computes)."""
    t = torch.empty(SEED_BLOCK + 10)
    seeded_normal_(t, 3, "w")
    gen = torch.Generator().manual_seed(param_seed(3, "w", 1))
    assert torch.equal(t[SEED_BLOCK:], torch.randn(10, generator=gen))
    u = seeded_uniform_(torch.empty(4, 5), 3, "u", -2.0, 2.0)
    assert float(u.min()) >= -2.0 and float(u.max()) < 2.0


def test_seeded_init_errors() -> None:
    with torch.device("meta"):
        m = KimiLinearForCausalLM(_cfg())
    with pytest.raises(ValueError, match="meta device"):
        m.reset_parameters(seed=1)
    m = KimiLinearForCausalLM(_cfg())
    with pytest.raises(TypeError, match="seed must be an int"):
        m.reset_parameters(seed="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        seeded_normal_(torch.empty(3), 0, "")
    with pytest.raises(ValueError, match="std must be"):
        seeded_normal_(torch.empty(3), 0, "w", std=-1.0)
    with pytest.raises(ValueError, match="low <= high"):
        seeded_uniform_(torch.empty(3), 0, "w", 1.0, 0.0)


# ------------------------------------------------------------------ module / strategy
def test_module_builds_the_model_in_configure_model() -> None:
    m = KimiLinearLitModule(overrides=fsdp_worker.PRESET_OVERRIDES, init_seed=3)
    assert "model" not in m._modules  # nothing built in __init__
    m.configure_model()
    first = m.model
    m.configure_model()  # idempotent
    assert m.model is first and len(m._mla) == 1 and len(m._moe) == 1
    ref = KimiLinearForCausalLM(m.config)
    ref.reset_parameters(seed=3)
    assert all(
        torch.equal(a, b) for a, b in zip(ref.state_dict().values(), first.state_dict().values())
    )
    with pytest.raises(UsageError, match="model.init_seed"):
        KimiLinearLitModule(init_seed=-1)


def test_fsdp2_strategy_argument_errors() -> None:
    with pytest.raises(UsageError, match="strategy.replicate_size must be an int >= 1"):
        FSDP2Strategy(replicate_size=0)
    with pytest.raises(UsageError, match="strategy.param_dtype must be None or one of"):
        FSDP2Strategy(param_dtype="fp8")
    with pytest.raises(UsageError, match="strategy.reshard_after_forward must be a bool"):
        FSDP2Strategy(reshard_after_forward="yes")  # type: ignore[arg-type]
    s = FSDP2Strategy(replicate_size=2, param_dtype="bfloat16", reduce_dtype="float32")
    mp = s.mixed_precision_policy()
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32


def test_shard_model_and_local_shard_on_plain_inputs() -> None:
    from kimi_linear.lightning.parallel import shard_model
    from kimi_linear.sharding import is_dtensor, local_shard

    with pytest.raises(TypeError, match="shard_model needs a KimiLinearForCausalLM"):
        shard_model(torch.nn.Linear(2, 2), mesh=None)  # type: ignore[arg-type]
    t = torch.zeros(3, 4)
    local, offset = local_shard(t)
    assert local is t and offset == (0, 0) and not is_dtensor(t)


def test_sharded_checkpoint_readers_reject_other_paths(tmp_path: Path) -> None:
    f = tmp_path / "x.ckpt"
    f.write_bytes(b"")
    assert not is_sharded_checkpoint(f) and not is_sharded_checkpoint(tmp_path)
    for fn in (load_sharded_state_dict, load_sharded_checkpoint):
        with pytest.raises(UsageError, match="is not a sharded checkpoint folder"):
            fn(tmp_path)


def _fake_sharded_checkpoint(path: Path, model: KimiLinearForCausalLM, hparams: dict) -> None:
    """A checkpoint folder laid out as ModelParallelStrategy writes it (DCP + meta.pt), from one
    process (the layout does not depend on how many ranks wrote it)."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    dcp.save(state, checkpoint_id=path, no_dist=True)
    torch.save({"hyper_parameters": hparams, "global_step": 1}, path / "meta.pt")


def test_export_of_a_sharded_checkpoint_consolidates_on_disk(tmp_path: Path) -> None:
    from kimi_linear.lightning.export import export_main

    hp = {"overrides": fsdp_worker.PRESET_OVERRIDES}
    model = KimiLinearForCausalLM(KimiLinearLitModule(**hp).config)
    model.reset_parameters(seed=4)
    ckpt = tmp_path / "step=1.ckpt"
    _fake_sharded_checkpoint(ckpt, model, hp)
    assert is_sharded_checkpoint(ckpt)
    ref = model.state_dict()
    sd = load_sharded_state_dict(ckpt)
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    offload = tmp_path / "offload"
    loaded = load_sharded_checkpoint(ckpt, torch.bfloat16, offload_dir=offload)
    assert list(offload.iterdir()) == []  # the mapped files are unlinked
    got = loaded.state_dict()
    assert got["model.layers.0.self_attn.A_log"].dtype == torch.float32  # kept fp32
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert all(torch.equal(got[k], ref[k].to(got[k].dtype)) for k in ref)
    with pytest.raises(ValueError, match="dtype must be None or a floating torch.dtype"):
        load_sharded_checkpoint(ckpt, torch.int32)
    out = tmp_path / "hf"
    assert (
        export_main(["--ckpt_path", str(ckpt), "--output_dir", str(out), "--dtype", "bfloat16"])
        == 0
    )
    exported = KimiLinearForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(exported[k], got[k]) for k in ref)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".kimi-linear-offload")]


# ------------------------------------------------------------------ two processes (gloo)
def _run_worker(mode: str, out: Path, *extra: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), mode, str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_sharded_init_and_muonclip_step_equal_single_process(tmp_path: Path) -> None:
    """2 ranks, FSDP and HSDP meshes: the FSDP2 model initialised per shard equals the unsharded
    one bit for bit, and two sharded MuonClip steps (Newton-Schulz spread over the ranks, QK-Clip on the local q/k
    rows) equal the single-process steps from the same gradients and max logits."""
    _run_worker("optim", tmp_path)
    results = json.loads((tmp_path / "optim.json").read_text())
    assert set(results) == {"fsdp", "hsdp_1x2", "hsdp_2x1"}
    for mesh, res in results.items():
        assert res["init_equal"], mesh
        assert res["gamma"][0] < 1.0, mesh  # QK-Clip did clip
        assert res["max_rel"] <= 1e-6, (mesh, res)


@pytest.mark.slow
def test_fsdp2_fit_matches_single_process_and_resumes_exactly(tmp_path: Path) -> None:
    """Lightning FSDP2Strategy, 2 ranks: 6 steps (AdamW with FSDP and with HSDP of 2 replicas,
    MuonClip with FSDP) equal 6 single-process steps of the same global batches (fp32, 1e-6
    relative per tensor); ``model.init_from`` loads pretrained weights into the shards; the
    sharded checkpoint resumes on 1 rank too; a MuonClip run resumed from its sharded
    step-3 checkpoint ends bit-identical to the uninterrupted run, and the sharded checkpoint
    consolidates into the model's full weights."""
    pretrained = KimiLinearForCausalLM(_cfg())
    pretrained.reset_parameters(seed=99)
    pretrained.save_pretrained(tmp_path / "pretrained")
    _run_worker("fit", tmp_path, str(tmp_path / "pretrained"))
    out = torch.load(tmp_path / "fit.pt", weights_only=False)
    # model.init_from under FSDP2: rank 0 reads, every rank keeps its shards
    expected = pretrained.state_dict()
    assert all(torch.equal(out["init_from"][k], expected[k]) for k in expected)
    assert out["sharded"] and out["adamw_step"] == out["muonclip_resumed_step"] == 6
    assert torch.get_num_threads() == 1  # as in the workers (see the README: same threads)
    refs = {
        opt: fsdp_worker.reference_fit(str(tmp_path / opt), opt) for opt in ("adamw", "muonclip")
    }
    ref = refs["adamw"]
    assert set(ref) == set(out["adamw"])
    for run, opt in (("adamw", "adamw"), ("adamw_hsdp", "adamw"), ("muonclip", "muonclip")):
        worst = max((rel_error(out[run][k], refs[opt][k]), k) for k in ref)
        assert worst[0] <= 1e-6, (run, worst)
    for k, v in out["muonclip"].items():
        assert torch.equal(v, out["muonclip_resumed"][k]), k
    # consolidation of the step-3 sharded checkpoint: complete, right shapes
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    sd = load_sharded_state_dict(ckpt)
    assert set(sd) == set(ref) and all(sd[k].shape == ref[k].shape for k in ref)
    model = load_sharded_checkpoint(ckpt)
    ids = torch.randint(0, 64, (1, 8))
    assert torch.isfinite(model(ids)).all()
    # the 2-rank checkpoint resumed on 1 rank (resharded weights and MuonClip state), one step
    _run_worker("resume1", tmp_path, str(ckpt))
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    assert one["step"] == 4
    assert all(torch.equal(one["restored"][k], sd[k]) for k in sd)
    # `kimi-linear export` of the sharded folder: the release layout, the same weights
    from kimi_linear.lightning.export import export_main

    assert export_main(["--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "hf")]) == 0
    exported = KimiLinearForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(exported[k], sd[k]) for k in sd)
