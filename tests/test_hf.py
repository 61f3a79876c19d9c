"""Hugging Face interop (kimi_linear.hf): parity with transformers' KimiLinear, the release
config and tensor inventory, config forms and their errors, weight-name layouts, loading."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_configs import tiny_settings

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM, hf
from kimi_linear.hf import config_from_hf, config_to_hf
from kimi_linear.layers.experts import release_expert_items
from kimi_linear.ops.gate import kda_gate

TESTS = Path(__file__).parent
RELEASE_CONFIG = TESTS / "fixtures" / "kimi-linear-48b-a3b" / "config.json"
RELEASE = json.loads(RELEASE_CONFIG.read_text())

# ------------------------------------------------------------------------------------------
# parity with transformers' KimiLinearForCausalLM (pure-PyTorch path, in a subprocess)
# ------------------------------------------------------------------------------------------
HAVE_TF_KIMI = importlib.util.find_spec("transformers") is not None and (
    importlib.util.find_spec("transformers.models.kimi_linear") is not None
)
needs_tf = pytest.mark.skipif(
    not HAVE_TF_KIMI, reason="transformers without a native KimiLinearForCausalLM"
)
FAST_CASES = ["base", "q_lora", "grouped_routing", "tied_embeddings", "dense_between_moe"]
FAST_CASES += ["no_shared_experts"]
SLOW_CASES = ["dense_first_two_shared_two", "pattern_mla_first", "moe_every_other_layer"]
# fp32 tolerance on the logits (|logit| is O(1) here).  Module by module (forward hooks on the
# same inputs) the kit's norms, MLA, dense MLP and MoE equal transformers' bit for bit; KDA
# differs by ~1e-6 relative: the two chunked algorithms round differently, and transformers'
# decay uses log(1 + exp(x)) where the kit uses the stable F.softplus (1 ulp here; on trained
# weights, with large negative gate inputs, up to ~1e-5).  The layers amplify that to ~1e-5 at
# 97 tokens.
ATOL = 2e-5


def _run_worker(tmp_path_factory, cases: list[str]) -> dict:
    out = tmp_path_factory.mktemp("parity") / "parity.json"
    proc = subprocess.run(
        [sys.executable, str(TESTS / "hf_parity_worker.py"), str(out), *cases],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fast_parity(tmp_path_factory):
    return _run_worker(tmp_path_factory, FAST_CASES)


@pytest.fixture(scope="module")
def slow_parity(tmp_path_factory):
    return _run_worker(tmp_path_factory, SLOW_CASES)


def _check_parity(result: dict) -> None:
    assert "error" not in result, result.get("error")
    kit = result["kit"]  # kit save -> transformers load
    assert kit["missing"] == [] and kit["unexpected"] == [] and kit["mismatched"] == []
    assert kit["resaved_equal"]  # transformers' re-save of it loads back to the same model
    # module by module on transformers' recorded inputs (relative max error per module kind)
    for kind, rel in kit["modules"].items():
        assert rel <= (1e-5 if kind == "kda" else 1e-6), (kind, rel)
    native = result["native"]  # transformers save -> kit load
    assert native["kit_config_equal"]
    assert native["internal_layout_equal"]  # save_original_format=False loads the same weights
    for direction in (kit, native):
        for T, diff in direction["max_abs_diff"].items():
            assert direction["logit_scale"][T] > 0.1  # the logits carry signal
            assert diff <= ATOL, (T, diff)
        assert direction["kit_generate"] == direction["tf_generate"]


@needs_tf
@pytest.mark.parametrize("case", FAST_CASES)
def test_parity_with_transformers(fast_parity, case):
    _check_parity(fast_parity[case])


@needs_tf
@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_parity_with_transformers_more_configs(slow_parity, case):
    _check_parity(slow_parity[case])


# ------------------------------------------------------------------------------------------
# the release config and tensor inventory
# ------------------------------------------------------------------------------------------
def test_release_config_equals_the_48b_preset():
    cfg = config_from_hf(RELEASE_CONFIG)
    preset = KimiLinearConfig.from_preset("kimi-linear-48b-a3b")
    assert config_to_hf(cfg) == config_to_hf(preset)
    assert cfg.layer_kinds == preset.layer_kinds
    assert cfg.kda_gate_lower_bound is None and cfg.num_expert_group == 1


def _release_inventory() -> dict[str, tuple[int, ...]]:
    """The release's tensors, written out from the published inventory of
    Kimi-Linear-48B-A3B-Instruct (tests/fixtures/kimi-linear-48b-a3b/README.md), not from the
    kit's modules."""
    D, V, P, E = 2304, 163840, 4096, 256
    mla = {3, 7, 11, 15, 19, 23, 26}
    inv = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(27):
        p = f"model.layers.{i}."
        inv[p + "input_layernorm.weight"] = (D,)
        inv[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if i in mla:
            inv[a + "q_proj.weight"] = (6144, D)
            inv[a + "kv_a_proj_with_mqa.weight"] = (576, D)
            inv[a + "kv_a_layernorm.weight"] = (512,)
            inv[a + "kv_b_proj.weight"] = (8192, 512)
            inv[a + "o_proj.weight"] = (D, P)
        else:
            for n in ("q", "k", "v"):
                inv[a + f"{n}_proj.weight"] = (P, D)
                inv[a + f"{n}_conv1d.weight"] = (P, 1, 4)
            inv[a + "A_log"] = (1, 1, 32, 1)
            inv[a + "dt_bias"] = (P,)
            inv[a + "b_proj.weight"] = (32, D)
            for n in ("f", "g"):
                inv[a + f"{n}_a_proj.weight"] = (128, D)
                inv[a + f"{n}_b_proj.weight"] = (P, 128)
            inv[a + "o_norm.weight"] = (128,)
            inv[a + "o_proj.weight"] = (D, P)
        if i == 0:
            inv[p + "mlp.gate_proj.weight"] = (9216, D)
            inv[p + "mlp.up_proj.weight"] = (9216, D)
            inv[p + "mlp.down_proj.weight"] = (D, 9216)
            continue
        m = p + "block_sparse_moe."
        inv[m + "gate.weight"] = (E, D)
        inv[m + "gate.e_score_correction_bias"] = (E,)
        for e in range(E):
            inv[m + f"experts.{e}.w1.weight"] = (1024, D)
            inv[m + f"experts.{e}.w2.weight"] = (D, 1024)
            inv[m + f"experts.{e}.w3.weight"] = (1024, D)
        for n, shape in (("gate", (1024, D)), ("up", (1024, D)), ("down", (D, 1024))):
            inv[m + f"shared_experts.{n}_proj.weight"] = shape
    return inv


def test_48b_on_meta_has_exactly_the_release_tensors():
    cfg = config_from_hf(RELEASE_CONFIG)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    names = {k: tuple(v.shape) for k, v in release_expert_items(model.state_dict())}
    expected = _release_inventory()
    assert names == expected
    # the published totals of the released checkpoint: 20,493 tensors, 49,122,681,728 values
    assert len(names) == 20_493
    assert sum(torch.Size(s).numel() for s in names.values()) == 49_122_681_728


# ------------------------------------------------------------------------------------------
# config forms
# ------------------------------------------------------------------------------------------
def _native(**changes) -> dict:
    """A config.json as transformers writes it for a natively configured model."""
    base = {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "dtype": "float32",
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "kv_lora_rank": 16,
        "layer_types": [
            "linear_attention",
            "full_attention",
            "linear_attention",
            "linear_attention",
        ],
        "linear_conv_kernel_dim": 4,
        "linear_head_dim": 16,
        "linear_num_heads": 2,
        "mlp_layer_types": ["dense", "dense", "sparse", "dense"],
        "model_max_length": 4096,
        "moe_intermediate_size": 32,
        "moe_renormalize": True,
        "num_attention_heads": 2,
        "num_expert_group": 2,
        "num_experts": 8,
        "num_experts_per_token": 2,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "num_shared_experts": 2,
        "output_router_logits": False,
        "pretraining_tp": 1,
        "q_lora_rank": 24,
        "qk_head_dim": 24,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "rms_norm_eps": 1e-05,
        "routed_scaling_factor": 2.0,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "transformers_version": "5.24.0",
        "use_cache": True,
        "v_head_dim": 16,
        "vocab_size": 128,
    }
    base.update(changes)
    return base


def test_reads_the_transformers_native_form():
    cfg = config_from_hf(_native())
    assert cfg.layer_kinds == ("kda", "mla", "kda", "kda")
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, False, True, False]
    assert (cfg.first_k_dense_replace, cfg.moe_layer_freq) == (2, 2)
    assert (cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_conv_size) == (2, 16, 4)
    assert (cfg.num_expert_group, cfg.topk_group, cfg.num_shared_experts) == (2, 1, 2)
    assert cfg.mla_use_nope is True and cfg.q_lora_rank == 24
    assert cfg.max_position_embeddings == 4096 and cfg.eos_token_id == 2
    # the kit's own output reads back to the same model, and transformers' aliases agree
    assert config_from_hf(config_to_hf(cfg)) == cfg
    aliased = _native(num_local_experts=8, n_group=2, num_experts_per_tok=2, n_shared_experts=2)
    assert config_from_hf(aliased) == cfg


def test_any_per_layer_mlp_pattern_reads_and_writes_both_forms():
    """transformers' mlp_layer_types with dense layers between MoE layers (no first-k / period
    rule spells it): read as KimiLinearConfig.mlp_layer_types, written back as mlp_layer_types
    alone (release form), and read again as the same config; a rule-shaped list keeps the rule."""
    native = _native(mlp_layer_types=["dense", "sparse", "dense", "sparse"])
    cfg = config_from_hf(native)
    assert cfg.mlp_layer_types == ("dense", "moe", "dense", "moe")
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    out = config_to_hf(cfg)
    assert out["mlp_layer_types"] == ["dense", "sparse", "dense", "sparse"]
    assert "first_k_dense_replace" not in out and "moe_layer_freq" not in out
    assert config_from_hf(out) == cfg
    # a rule-shaped pattern is read as the rule; an explicit list of that shape spells it
    rule = config_from_hf(_native(mlp_layer_types=["dense"] * 2 + ["sparse"] * 2))
    assert rule.mlp_layer_types is None and rule.first_k_dense_replace == 2
    spelled = config_to_hf(cfg.replace(mlp_layer_types=("dense", "dense", "moe", "moe")))
    assert (spelled["first_k_dense_replace"], spelled["moe_layer_freq"]) == (2, 1)
    assert config_from_hf(spelled).mlp_layer_kinds == (
        "dense",
        "dense",
        "moe",
        "moe",
    )
    # a release-form config that also carries first_k_dense_replace must agree with the list
    with pytest.raises(ValueError, match="mlp_layer_types contradicts first_k_dense_replace=1"):
        config_from_hf({**out, "first_k_dense_replace": 1})


def test_per_layer_mlp_pattern_saves_and_loads(tmp_path):
    cfg = KimiLinearConfig(**{**SMALL, "mlp_layer_types": ("moe", "dense", "moe")})
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    names = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.gate_proj.weight" in names
    assert "model.layers.2.block_sparse_moe.experts.3.w1.weight" in names
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mlp_layer_kinds == ("moe", "dense", "moe")
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    assert torch.equal(model(ids), loaded(ids))


def test_safe_gate_keys():
    lin = {**RELEASE["linear_attn_config"], "gate_lower_bound": -5.0}
    cfg = config_from_hf({**RELEASE, "linear_attn_config": lin})
    assert cfg.kda_gate_lower_bound == -5.0
    assert config_to_hf(cfg)["linear_attn_config"]["gate_lower_bound"] == -5.0
    assert config_from_hf(config_to_hf(cfg)) == cfg
    fla_form = config_from_hf({**RELEASE, "safe_gate": True, "lower_bound": -3.0})
    assert fla_form.kda_gate_lower_bound == -3.0
    native = config_from_hf(_native(linear_lower_bound=-2.0))
    assert native.kda_gate_lower_bound == -2.0
    with pytest.raises(ValueError, match="gate_lower_bound.*contradicts lower_bound"):
        config_from_hf({**RELEASE, "linear_attn_config": lin, "lower_bound": -3.0})
    with pytest.raises(ValueError, match="safe_gate is true but no lower_bound"):
        config_from_hf({**RELEASE, "safe_gate": True})
    with pytest.raises(ValueError, match="kda_gate_lower_bound"):
        KimiLinearConfig.from_preset("tiny", kda_gate_lower_bound=-6.0)


def _release_with(**lin_changes) -> dict:
    lin = {**RELEASE["linear_attn_config"], **lin_changes}
    return {**RELEASE, "linear_attn_config": {k: v for k, v in lin.items() if v is not None}}


@pytest.mark.parametrize(
    "bad, match",
    [
        (_release_with(kda_layers=list(range(1, 28))), r"both KDA.*MLA.*\[4, 8"),
        (_release_with(kda_layers=[1, 2, 3]), r"in neither.*\[5, 6"),
        (_release_with(kda_layers=None), "linear_attn_config.kda_layers must be a list"),
        (_release_with(kda_layers=[0, 1]), "1-based"),
        (_release_with(use_full_rank_gate=True), "use_full_rank_gate"),
        (_release_with(gate_type="x"), "unknown key linear_attn_config.gate_type"),
        ({**RELEASE, "mlp_layer_types": ["sparse"] * 27}, "mlp_layer_types contradicts"),
        (
            {**RELEASE, "num_nextn_predict_layers": 1},
            "num_nextn_predict_layers=1 changes the model",
        ),
        ({**RELEASE, "quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ({**RELEASE, "attention_bias": True}, "attention_bias=True"),
        ({**RELEASE, "hidden_act": "gelu"}, "hidden_act"),
        ({**RELEASE, "moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
        ({**RELEASE, "use_grouped_topk": False, "num_expert_group": 8}, "use_grouped_topk"),
        ({**RELEASE, "num_local_experts": 128}, "num_experts=256 contradicts num_local_experts"),
        ({**RELEASE, "num_key_value_heads": 8}, "num_key_value_heads"),
        ({**RELEASE, "qk_head_dim": 100}, "qk_head_dim"),
        ({**RELEASE, "mla_use_nope": False, "rope_scaling": {"type": "yarn"}}, "rope_scaling"),
        ({**RELEASE, "model_type": "deepseek_v3"}, "model_type"),
        ({**RELEASE, "kda_backend": "torch"}, "unknown key 'kda_backend'"),
        ({**RELEASE, "num_expert_groups": 2}, "did you mean 'num_expert_group'"),
        ({k: v for k, v in RELEASE.items() if k != "linear_attn_config"}, "no layer pattern"),
        (_native(layer_types=["linear_attention"] * 3 + ["mamba"]), "layer_types entries"),
        (_native(mlp_layer_types=["dense", "sparse", "dense", "mlp"]), "each 'dense' or 'sparse'"),
        (_native(kimi_linear={"kda_mode": "x"}), "unknown key kimi_linear.kda_mode"),
        ({**RELEASE, "num_expert_group": 3}, "num_expert_group must divide"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(bad)


def test_noop_keys_are_accepted_at_their_noop_values():
    cfg = config_from_hf(
        {**RELEASE, "attention_dropout": 0.0, "pretraining_tp": 1, "topk_method": "noaux_tc"}
    )
    assert config_to_hf(cfg) == config_to_hf(config_from_hf(RELEASE))
    # NoPE: a rope_scaling never applies
    assert config_from_hf({**RELEASE, "rope_scaling": {"type": "yarn"}})


def test_corrupt_files_name_the_file(tmp_path):
    cfg = KimiLinearConfig.from_preset("tiny", kda_backend="torch")
    KimiLinearForCausalLM(cfg).save_pretrained(tmp_path / "ok", max_shard_size=200_000)
    text = (tmp_path / "ok" / "config.json").read_text()
    (tmp_path / "ok" / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(text)
    shard = sorted((tmp_path / "ok").glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors file"):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "ok")
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard.name}: listed in .* but missing"):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "ok")


# ------------------------------------------------------------------------------------------
# weight layouts and loading
# ------------------------------------------------------------------------------------------
SMALL = tiny_settings(kda_head_dim=8)


def _transformers_internal_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kit's state dict rewritten in transformers' internal layout
    (``save_pretrained(..., save_original_format=False)``), by hand."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".experts.w1" in k:
            out[k.replace("block_sparse_moe.experts.w1", "mlp.experts.gate_up_proj")] = torch.cat(
                [v, sd[k.replace("w1", "w3")]], dim=1
            )
        elif ".experts.w3" in k:
            continue
        elif ".experts.w2" in k:
            out[k.replace("block_sparse_moe.experts.w2", "mlp.experts.down_proj")] = v
        elif "q_conv1d" in k:
            parts = [sd[k.replace("q_conv1d", f"{x}_conv1d")] for x in "qkv"]
            out[k.replace("q_conv1d", "conv1d")] = torch.cat(parts, dim=0)
        elif "k_conv1d" in k or "v_conv1d" in k:
            continue
        elif any(f"self_attn.{n}" in k for n in ("f_a_proj", "f_b_proj", "A_log", "dt_bias")):
            out[k.replace("self_attn.", "self_attn.forget_gate.")] = v
        else:
            out[k.replace("block_sparse_moe.", "mlp.")] = v
    return out


@pytest.mark.parametrize("layout", ["transformers_default", "transformers_internal"])
def test_loads_transformers_layouts(tmp_path, layout):
    cfg = KimiLinearConfig(**SMALL)
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    if layout == "transformers_default":  # dense MLPs under block_sparse_moe
        sd = {k.replace("layers.0.mlp.", "layers.0.block_sparse_moe."): v for k, v in sd.items()}
        assert "model.layers.0.block_sparse_moe.gate_proj.weight" in sd
    else:
        sd = _transformers_internal_layout(model.state_dict())
        assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_errors(tmp_path):
    cfg = KimiLinearConfig(**SMALL)
    model = KimiLinearForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    save_file(
        {**sd, "model.layers.9.mlp.gate_proj.weight": torch.zeros(2)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"layers\.9.*has no place in this model"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(5)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape \[5\].*expects \[32\]"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    bad = dict(sd)
    bad.pop("model.layers.2.block_sparse_moe.experts.3.w2.weight")
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing.*layers\.2\.block_sparse_moe\.experts\.3\.w2"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="device"):
        KimiLinearForCausalLM.from_pretrained(tmp_path, device="nodevice")


@pytest.mark.parametrize("layout", ["block_sparse_moe", "mlp"])
def test_zero_width_shared_experts_load(tmp_path, layout):
    """A folder saved with ``n_shared_experts=0`` by transformers / the release code holds
    zero-size ``shared_experts.*`` tensors (``[0, D]``, ``[D, 0]``) in every MoE layer: they
    load (nothing to copy) into a model with no shared expert. A non-empty one is refused,
    naming the count in config.json."""
    cfg = KimiLinearConfig(**{**SMALL, "num_shared_experts": 0})
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    D = cfg.hidden_size
    empty = {"gate_proj": (0, D), "up_proj": (0, D), "down_proj": (D, 0)}
    for i in (1, 2):  # the MoE layers of SMALL
        for proj, shape in empty.items():
            sd[f"model.layers.{i}.{layout}.shared_experts.{proj}.weight"] = torch.zeros(shape)
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.layers[1].block_sparse_moe.shared_experts is None
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    sd["model.layers.1.block_sparse_moe.shared_experts.up_proj.weight"] = torch.zeros(3, D)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shared_experts\.up_proj.*num_shared_experts=0"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


def _sharded_small(folder: Path) -> dict:
    """A SMALL model saved in shards; returns its index."""
    KimiLinearForCausalLM(KimiLinearConfig(**SMALL)).save_pretrained(folder, max_shard_size=20_000)
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    import os

    ckpt = tmp_path / "ckpt"
    index = _sharded_small(ckpt)
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((ckpt / first).read_bytes())  # a readable file: only the path is wrong
    for target in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        wm = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        with pytest.raises(ValueError, match=r"index\.json: weight file .* outside the checkpoint"):
            KimiLinearForCausalLM.from_pretrained(ckpt)
    # a symlink inside the folder that leads out of it
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / first).unlink()
    os.symlink(outside, ckpt / first)
    with pytest.raises(ValueError, match=rf"{first}.*resolves to .*outside.*symlink"):
        KimiLinearForCausalLM.from_pretrained(ckpt)
    # ... but the Hugging Face cache layout (snapshots/<rev>/file -> ../../blobs/<hash>) loads
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        os.symlink(Path("..", "..", "blobs", blob.name), snap / f.name)
    assert KimiLinearForCausalLM.from_pretrained(snap).config.num_experts == 4


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.float8_e4m3fn])
def test_integer_or_quantized_weights_are_refused(tmp_path, dtype):
    KimiLinearForCausalLM(KimiLinearConfig(**SMALL)).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = sd[name].clamp(-1, 1).to(dtype)  # a quantized export under the release name
    save_file(sd, str(tmp_path / "model.safetensors"))
    st = {torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.float8_e4m3fn: "F8_E4M3"}
    with pytest.raises(ValueError, match=rf"{name}' is stored as {st[dtype]}, not a float dtype"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


def test_nonfinite_weights_load_with_a_warning_naming_them(tmp_path):
    KimiLinearForCausalLM(KimiLinearConfig(**SMALL)).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    bad = [k for k in sd if k.endswith("experts.0.w1.weight")] + ["model.norm.weight"]
    bad += [f"model.layers.{i}.input_layernorm.weight" for i in range(3)]  # 6 tensors in all
    for i, k in enumerate(bad):
        sd[k] = sd[k].clone()
        sd[k].view(-1)[: i + 1] = float("nan") if i % 2 else float("inf")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.warns(hf.NonFiniteWeightsWarning) as record:
        model = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "in 6 loaded weight tensor(s)" in msg and msg.endswith("outputs may be NaN")
    assert "and 1 more" in msg and len(re.findall(r"\(\d+ of \d+\)", msg)) == 5  # bounded
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight (1 of" in msg
    assert (~torch.isfinite(model.model.norm.weight)).sum() == bad.index("model.norm.weight") + 1
    # values that overflow the requested dtype are reported too
    big = load_file(str(tmp_path / "model.safetensors"))
    big = {k: torch.nan_to_num(v) for k, v in big.items()}
    big["model.norm.weight"] = torch.full_like(big["model.norm.weight"], 1e6)
    save_file(big, str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KimiLinearForCausalLM.from_pretrained(tmp_path)  # fp32: finite, no warning
    with pytest.warns(hf.NonFiniteWeightsWarning, match=r"model\.norm\.weight \(32 of 32\)"):
        KimiLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)


def test_fewer_num_experts_than_the_weights_hold_names_both(tmp_path):
    KimiLinearForCausalLM(KimiLinearConfig(**SMALL)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_experts": 3}))
    with pytest.raises(
        ValueError, match=r"experts\.3\.w1\.weight' is expert 3, but config\.json has num_experts=3"
    ):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    # transformers' internal layout (stacked experts): the shape error names the setting
    model = KimiLinearForCausalLM(KimiLinearConfig(**SMALL))
    sd = _transformers_internal_layout(model.state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"experts\.(gate_up|down)_proj' has shape \[4, .*num_experts=3"
    ):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


def test_tied_head_that_differs_is_an_error(tmp_path):
    cfg = KimiLinearConfig(**SMALL, tie_word_embeddings=True)
    KimiLinearForCausalLM(cfg).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs.*tie_word_embeddings=False"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    untied = KimiLinearForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=False)
    assert torch.equal(untied.lm_head.weight, sd["lm_head.weight"])
    del sd["lm_head.weight"]  # the release convention for a tied model: no head stored
    save_file(sd, str(tmp_path / "model.safetensors"))
    tied = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_to_empty_keeps_tied_embeddings_tied():
    with torch.device("meta"):
        model = KimiLinearForCausalLM(KimiLinearConfig(**SMALL, tie_word_embeddings=True))
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_from_pretrained_into_target_dtype_and_device(tmp_path):
    cfg = KimiLinearConfig(**SMALL)
    model = KimiLinearForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size=10_000)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path, device="cpu")
    assert loaded.dtype == torch.bfloat16  # the stored dtype by default
    assert loaded.model.layers[0].self_attn.A_log.dtype == torch.float32
    up = KimiLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert up.dtype == torch.float32
    assert torch.equal(up.model.embed_tokens.weight, model.model.embed_tokens.weight.float())
    # the load statistics (non-persistent buffers) start at zero
    assert up.model.layers[1].block_sparse_moe.expert_load.abs().sum() == 0


# ------------------------------------------------------------------------------------------
# the decay gate
# ------------------------------------------------------------------------------------------
def test_gate_forms_match_fla_references():
    import fla.ops.kda.gate as gate_ops  # a dependency: a broken install fails here

    gen = torch.Generator().manual_seed(0)
    f = 3 * torch.randn(2, 5, 4, 8, generator=gen)
    A_log = torch.randn(4, generator=gen)
    dt_bias = torch.randn(32, generator=gen)
    ours = kda_gate(f, A_log, dt_bias)
    ref = gate_ops.naive_kda_gate(f, A_log, dt_bias)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    safe = kda_gate(f, A_log, dt_bias, lower_bound=-5.0)
    ref = gate_ops.naive_kda_lowerbound_gate(f, A_log, dt_bias, lower_bound=-5.0)
    torch.testing.assert_close(safe, ref, rtol=0, atol=1e-6)
    assert (safe >= -5).all() and (safe <= 0).all()  # fp32 sigmoid saturates at the ends
    with pytest.raises(ValueError, match="lower_bound"):
        kda_gate(f, A_log, dt_bias, lower_bound=0.5)
    with pytest.raises(ValueError, match="dt_bias"):
        kda_gate(f, A_log, dt_bias[:5])


def test_layer_uses_the_configured_gate():
    cfg = KimiLinearConfig(**SMALL, kda_gate_lower_bound=-2.0)
    model = KimiLinearForCausalLM(cfg)
    layer = model.model.layers[0].self_attn
    x = torch.randn(2, 6, cfg.hidden_size)
    g = layer.decay(x)
    assert (g > -2.0).all() and (g < 0).all()
    f = layer.f_b_proj(layer.f_a_proj(x)).reshape(2, 6, 2, 8)
    torch.testing.assert_close(g, kda_gate(f, layer.A_log, layer.dt_bias, -2.0))
    assert torch.isfinite(model(torch.randint(0, 96, (1, 9)))).all()


# ------------------------------------------------------------------------------------------
# fine-tuning from pretrained folders; the command line
# ------------------------------------------------------------------------------------------
def test_lightning_module_init_from(tmp_path):
    from kimi_linear.errors import UsageError
    from kimi_linear.lightning.module import KimiLinearLitModule

    cfg = KimiLinearConfig(**SMALL)
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    lit = KimiLinearLitModule(
        init_from=str(tmp_path), vocab_size=96, overrides={"kda_backend": "torch"}
    )
    assert lit.config.layer_kinds == cfg.layer_kinds and lit.config.kda_backend == "torch"
    for (k, a), (_, b) in zip(model.state_dict().items(), lit.model.state_dict().items()):
        assert torch.equal(a, b), k
    # its checkpoints keep the resolved config, not the folder's path
    ckpt = {"hyper_parameters": dict(lit.hparams)}
    lit.on_save_checkpoint(ckpt)
    hp = ckpt["hyper_parameters"]
    assert hp["init_from"] is None and hp["preset"] is None
    assert KimiLinearLitModule(**hp).config == lit.config
    with pytest.raises(UsageError, match="vocab_size=96 differs"):
        KimiLinearLitModule(init_from=str(tmp_path), vocab_size=512)
    with pytest.raises(UsageError, match="drop model.preset"):
        KimiLinearLitModule(init_from=str(tmp_path), preset="tiny")
    with pytest.raises(UsageError, match="model.init_from: no config.json"):
        KimiLinearLitModule(init_from=str(tmp_path / "nowhere"))


def test_export_from_a_folder_and_overwrite(tmp_path, capsys):
    from kimi_linear.cli import main

    cfg = KimiLinearConfig(**SMALL)
    KimiLinearForCausalLM(cfg).save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", "--ckpt_path", str(tmp_path / "src"), "--output_dir", str(out)]
    assert main(args) == 2
    assert "not empty (notes.txt); pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--dtype", "bfloat16"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    loaded = KimiLinearForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    gen = ["generate", "--ckpt_path", str(out), "--max_new_tokens", "2"]
    (out / "config.json").write_text('{"vocab_size": 96, "hidd')
    assert main([*gen, "--prompt", "ab"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json: not valid JSON" in err[0]
