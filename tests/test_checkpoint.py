"""Checkpoints: release state-dict names load strictly; save_pretrained / from_pretrained."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_configs import tiny_settings

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.hf import config_to_hf

CFG = tiny_settings(layer_types=("kda", "kda", "mla"), moe_intermediate_size=24)


def release_shapes(c: KimiLinearConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a release checkpoint, written out from facts section 4 (not from our model)."""
    D, V, HK, K, H = (
        c.hidden_size,
        c.vocab_size,
        c.kda_num_heads * c.kda_head_dim,
        c.kda_head_dim,
        c.kda_num_heads,
    )
    Hm, R, P = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    shapes = {
        "model.embed_tokens.weight": (V, D),
        "model.norm.weight": (D,),
        "lm_head.weight": (V, D),
    }
    for i, kind in enumerate(c.layer_kinds):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if kind == "kda":
            shapes.update(
                {
                    a + "q_proj.weight": (HK, D),
                    a + "k_proj.weight": (HK, D),
                    a + "v_proj.weight": (HK, D),
                    a + "q_conv1d.weight": (HK, 1, c.kda_conv_size),
                    a + "k_conv1d.weight": (HK, 1, c.kda_conv_size),
                    a + "v_conv1d.weight": (HK, 1, c.kda_conv_size),
                    a + "f_a_proj.weight": (K, D),
                    a + "f_b_proj.weight": (HK, K),
                    a + "b_proj.weight": (H, D),
                    a + "g_a_proj.weight": (K, D),
                    a + "g_b_proj.weight": (HK, K),
                    a + "A_log": (1, 1, H, 1),
                    a + "dt_bias": (HK,),
                    a + "o_norm.weight": (K,),
                    a + "o_proj.weight": (D, HK),
                }
            )
        else:
            shapes.update(
                {
                    a + "q_proj.weight": (Hm * (c.qk_nope_head_dim + P), D),
                    a + "kv_a_proj_with_mqa.weight": (R + P, D),
                    a + "kv_a_layernorm.weight": (R,),
                    a + "kv_b_proj.weight": (Hm * (c.qk_nope_head_dim + c.v_head_dim), R),
                    a + "o_proj.weight": (D, Hm * c.v_head_dim),
                }
            )
        if c.is_moe_layer(i):
            m, inter = p + "block_sparse_moe.", c.moe_intermediate_size
            shapes[m + "gate.weight"] = (c.num_experts, D)
            shapes[m + "gate.e_score_correction_bias"] = (c.num_experts,)
            for e in range(c.num_experts):
                shapes[m + f"experts.{e}.w1.weight"] = (inter, D)
                shapes[m + f"experts.{e}.w2.weight"] = (D, inter)
                shapes[m + f"experts.{e}.w3.weight"] = (inter, D)
            s = inter * c.num_shared_experts
            shapes.update(
                {
                    m + "shared_experts.gate_proj.weight": (s, D),
                    m + "shared_experts.up_proj.weight": (s, D),
                    m + "shared_experts.down_proj.weight": (D, s),
                }
            )
        else:
            shapes.update(
                {
                    p + "mlp.gate_proj.weight": (c.intermediate_size, D),
                    p + "mlp.up_proj.weight": (c.intermediate_size, D),
                    p + "mlp.down_proj.weight": (D, c.intermediate_size),
                }
            )
    return shapes


def random_release_checkpoint(c: KimiLinearConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {k: 0.05 * torch.randn(shape, generator=gen) for k, shape in release_shapes(c).items()}
    for k in sd:
        if k.endswith("A_log"):
            sd[k] = torch.rand(sd[k].shape, generator=gen) * 2
        elif k.endswith("norm.weight") or k.endswith("layernorm.weight"):
            sd[k] = 1 + sd[k]
    return sd


def test_release_state_dict_loads_strictly_without_renaming():
    cfg = KimiLinearConfig(**CFG)
    sd = random_release_checkpoint(cfg)
    model = KimiLinearForCausalLM(cfg)
    result = model.load_state_dict(dict(sd), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    experts = model.model.layers[1].block_sparse_moe.experts
    torch.testing.assert_close(
        experts.w2[3], sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    )
    # and the model exports exactly the release names and shapes
    exported = {k: tuple(v.shape) for k, v in model.release_state_dict().items()}
    assert exported == release_shapes(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    assert torch.isfinite(model(ids)).all()


def test_release_checkpoint_folder_loads_with_from_pretrained(tmp_path):
    """A folder laid out like the release: config.json + sharded safetensors + index."""
    cfg = KimiLinearConfig(**CFG)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    sd = random_release_checkpoint(cfg, seed=1)
    keys = list(sd)
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / names[0]))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / names[1]))
    index = {"metadata": {}, "weight_map": {k: names[i >= half] for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = KimiLinearForCausalLM.from_pretrained(tmp_path, kda_backend="torch")
    assert model.config.layer_kinds == cfg.layer_kinds
    torch.testing.assert_close(
        model.model.layers[0].self_attn.A_log, sd["model.layers.0.self_attn.A_log"]
    )
    torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"])


@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_and_load_give_identical_logits(tmp_path, shard):
    cfg = KimiLinearConfig(**{**CFG, "kda_gate": "head"})
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path, max_shard_size=shard)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["linear_attn_config"]["full_attn_layers"] == [3] and hf["num_experts"] == 4
    if shard is None:
        keys = set(load_file(str(tmp_path / "model.safetensors")))
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        keys = set(index["weight_map"])
    assert keys == set(release_shapes(cfg))  # the "head" gate changes shapes, not names
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight" in keys
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.kda_gate == "head"
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_tied_embeddings_and_dtype_on_load(tmp_path):
    cfg = KimiLinearConfig(**{**CFG, "tie_word_embeddings": True})
    model = KimiLinearForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    # the head is written too (an equal copy): transformers' KimiLinear does not tie
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.A_log.dtype == torch.float32
    assert (
        loaded.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.dtype == torch.float32
    )
    torch.testing.assert_close(
        loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16()
    )


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    cfg = KimiLinearConfig(**CFG)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    with pytest.raises(ValueError, match="model.safetensors"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    sd = random_release_checkpoint(cfg)
    sd.pop("model.layers.0.self_attn.dt_bias")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*dt_bias"):  # strict: a missing weight
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    model = KimiLinearForCausalLM(cfg)
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "out", max_shard_size=0)
    with pytest.raises(ValueError, match="dtype"):
        KimiLinearForCausalLM.from_pretrained(tmp_path, dtype="bf16")
    with pytest.raises(ValueError, match="config_overrides.*kda_mode"):
        KimiLinearForCausalLM.from_pretrained(tmp_path, kda_mode="chunk")


def test_sharded_save_splits_in_key_order_and_loads(tmp_path):
    """``max_shard_size``: huggingface_hub's split (transformers' file names and index), in
    release-key order, a new file when the next tensor would pass the size; the per-expert
    slices of a stacked expert tensor are sized one by one (not kept together as views of one
    storage).  The folder loads back identically; weights that fit in one file give a plain
    ``model.safetensors`` without an index."""
    from kimi_linear import hf

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig(**CFG))
    shard = 20_000
    model.save_pretrained(tmp_path, max_shard_size=shard)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    # the split written out here: greedy over the release keys in order
    expected, files, size = {}, 1, 0
    for k, v in hf.release_state_dict(model).items():
        nbytes = v.numel() * v.element_size()
        assert nbytes <= shard  # (no tensor above the size in this config)
        if size and size + nbytes > shard:
            files, size = files + 1, 0
        expected[k] = files
        size += nbytes
    assert files > 2
    names = {i: f"model-{i:05d}-of-{files:05d}.safetensors" for i in range(1, files + 1)}
    assert index["weight_map"] == {k: names[i] for k, i in expected.items()}
    stored = {}
    for name in names.values():
        tensors = load_file(str(tmp_path / name))
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= shard
        stored.update(tensors)
    assert index["metadata"] == {
        "total_size": sum(t.numel() * t.element_size() for t in stored.values())
    }
    experts = [k for k in index["weight_map"] if ".experts." in k and k.endswith(".w1.weight")]
    assert len({index["weight_map"][k] for k in experts}) > 1  # slices of one stacked tensor
    assert not (tmp_path / "model.safetensors").exists()
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    # all in one file: no index (as transformers writes it); the stale shards are removed
    model.save_pretrained(tmp_path, max_shard_size=10**9)
    weights = sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name)
    assert weights == ["model.safetensors"]
    assert torch.equal(
        KimiLinearForCausalLM.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight
    )


_TRANSFORMERS_LOAD = """
import json, sys

sys.modules["fla"] = None  # transformers' pure-PyTorch KDA (fla's kernels need a GPU)
import torch
from transformers import AutoModelForCausalLM

model, info = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], output_loading_info=True, dtype=torch.float32
)
ids = torch.arange(1, 20).remainder(model.config.vocab_size)[None]
with torch.no_grad():
    logits = model(ids).logits[0]
json.dump(
    {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": len(info["mismatched_keys"]),
        "logits": logits.tolist(),
    },
    open(sys.argv[2], "w"),
)
"""


@pytest.mark.slow
def test_sharded_save_loads_in_transformers(tmp_path):
    """A sharded save (index + shards) loads in transformers' KimiLinearForCausalLM with no
    missing or unexpected keys and the kit's logits (fp32, within the parity tolerance 2e-5 of
    tests/test_hf.py)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("transformers.models.kimi_linear") is None:
        pytest.skip("transformers without a native KimiLinearForCausalLM")
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig(**CFG)).eval()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    (tmp_path / "load.py").write_text(_TRANSFORMERS_LOAD)
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(tmp_path / "ckpt"), str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["missing"] == [] and result["unexpected"] == [] and result["mismatched"] == 0
    ids = torch.arange(1, 20).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        kit = model(ids)[0]
    torch.testing.assert_close(torch.tensor(result["logits"]), kit, rtol=0, atol=2e-5)
