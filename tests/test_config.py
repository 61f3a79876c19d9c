"""KimiLinearConfig: presets build, validation names the field, release config.json interop."""

import json
from pathlib import Path

import pytest
import torch

from kimi_linear import PRESETS, KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.hf import config_from_hf, config_to_hf

# Kimi-Linear-48B-A3B-Instruct config.json as released (tests/fixtures/kimi-linear-48b-a3b/).
RELEASE_48B = json.loads(
    (Path(__file__).parent / "fixtures" / "kimi-linear-48b-a3b" / "config.json").read_text()
)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    cfg = KimiLinearConfig.from_preset(name)
    assert cfg.name == name and len(cfg.layer_kinds) == cfg.num_hidden_layers
    if name == "tiny":
        model = KimiLinearForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (1, 5))
        assert model(ids).shape == (1, 5, cfg.vocab_size)
        return
    with torch.device("meta"):  # big presets: shapes only, no memory
        model = KimiLinearForCausalLM(cfg)
    assert len(model.model.layers) == cfg.num_hidden_layers
    kinds = tuple(
        "kda" if type(layer.self_attn).__name__ == "KimiDeltaAttention" else "mla"
        for layer in model.model.layers
    )
    assert kinds == cfg.layer_kinds


def test_preset_layer_patterns():
    assert KimiLinearConfig.from_preset("kimi-linear-48b-a3b").mla_layers == [
        3,
        7,
        11,
        15,
        19,
        23,
        26,
    ]
    assert KimiLinearConfig.from_preset("kimi-k2").kda_layers == []
    assert KimiLinearConfig.from_preset("tiny").layer_kinds == ("kda", "kda", "kda", "mla")
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny"):
        KimiLinearConfig.from_preset("nope")
    with pytest.raises(ValueError, match="did you mean 'kimi-linear-48b-a3b'"):
        KimiLinearConfig.from_preset("kimi-linear-48b")
    with pytest.raises(
        ValueError, match="unknown KimiLinearConfig field 'hidden_sise'.*'hidden_size'"
    ):
        KimiLinearConfig.from_preset("tiny", hidden_sise=32)
    with pytest.raises(ValueError, match="replace: unknown KimiLinearConfig field 'hidden_sise'"):
        KimiLinearConfig.from_preset("tiny").replace(hidden_sise=32)


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 0),
        ("vocab_size", -3),
        ("num_hidden_layers", 2.5),
        ("kda_num_heads", 0),
        ("kda_head_dim", True),
        ("kda_conv_size", 0),
        ("kda_chunk_size", 0),
        ("kda_gate", "vector"),
        ("kda_backend", "cuda"),
        ("num_experts_per_token", 9),
        ("first_k_dense_replace", 99),
        ("qk_rope_head_dim", 7),
        ("rms_norm_eps", 0.0),
        ("routed_scaling_factor", float("inf")),
        ("moe_bias_update_rate", -1.0),
        ("q_lora_rank", 0),
        ("eos_token_id", 10**6),
        ("layer_types", ("kda", "gdn", "kda", "mla")),
        ("layer_types", ("kda",)),
        ("mla_every", -1),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"KimiLinearConfig\.{field}"):
        KimiLinearConfig.from_preset("tiny", **{field: value})


def test_kda_chunk_size_defaults_to_the_torch_ops_default_and_round_trips():
    """config.kda_chunk_size is the chunk of the pure-PyTorch op (the Triton kernels fix 64):
    its default is torch_chunk_kda's own, the fastest on CPU; other values survive the HF config."""
    from kimi_linear.ops import chunk as chunk_mod

    assert KimiLinearConfig().kda_chunk_size == chunk_mod.DEFAULT_CHUNK_SIZE == 32
    assert KimiLinearConfig.from_preset("tiny").kda_chunk_size == 32
    cfg = KimiLinearConfig.from_preset("tiny", kda_chunk_size=64)
    assert config_from_hf(config_to_hf(cfg)).kda_chunk_size == 64
    for bad in (None, -32, 16.0, True):
        with pytest.raises(ValueError, match=r"KimiLinearConfig\.kda_chunk_size"):
            KimiLinearConfig.from_preset("tiny", kda_chunk_size=bad)


def test_replace_validates_and_twins():
    cfg = KimiLinearConfig.from_preset("tiny")
    with pytest.raises(ValueError, match="hidden_size"):
        cfg.replace(hidden_size=-1)
    twin = cfg.all_mla_twin()
    assert twin.layer_kinds == ("mla",) * 4 and twin.name == "tiny-all-mla"
    assert cfg.with_layer_kinds("kda").mla_layers == []
    with pytest.raises(ValueError, match="kind"):
        cfg.with_layer_kinds("rnn")


def test_config_from_hf_reads_the_release_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASE_48B))
    for source in (tmp_path, tmp_path / "config.json", RELEASE_48B):
        cfg = config_from_hf(source)
        assert cfg.num_hidden_layers == 27 and cfg.hidden_size == 2304
        assert cfg.mla_layers == [3, 7, 11, 15, 19, 23, 26]  # 1-based ids in the file
        assert len(cfg.kda_layers) == 20
        assert cfg.kda_num_heads == 32 and cfg.kda_head_dim == 128 and cfg.kda_conv_size == 4
        assert cfg.mla_use_nope is True and cfg.q_lora_rank is None
        assert (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (
            512,
            128,
            64,
            128,
        )
        assert (cfg.num_experts, cfg.num_experts_per_token, cfg.num_shared_experts) == (256, 8, 1)
        assert cfg.moe_intermediate_size == 1024 and cfg.intermediate_size == 9216
        assert cfg.first_k_dense_replace == 1 and cfg.routed_scaling_factor == 2.446
        assert cfg.max_position_embeddings == 1048576 and cfg.eos_token_id == 163586
    preset = KimiLinearConfig.from_preset("kimi-linear-48b-a3b")
    skip = {"name", "layer_types", "mla_every", "last_layer_mla"}
    for field in preset.to_dict():
        if field not in skip:
            assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.layer_kinds == preset.layer_kinds


def test_config_to_hf_round_trips():
    cfg = config_from_hf(RELEASE_48B)
    hf = config_to_hf(cfg)
    bookkeeping = {"auto_map", "head_dim", "transformers_version"}  # no effect on the model
    for key, value in RELEASE_48B.items():
        if key not in bookkeeping:
            assert hf[key] == value, key
    again = config_from_hf(json.loads(json.dumps(hf)))
    assert again == cfg
    for name in PRESETS:
        p = KimiLinearConfig.from_preset(name)
        back = config_from_hf(config_to_hf(p))
        assert back.layer_kinds == p.layer_kinds and config_to_hf(back) == config_to_hf(p)


def test_config_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        config_from_hf(tmp_path)
    with pytest.raises(ValueError, match="lacks required keys.*hidden_size"):
        config_from_hf({k: v for k, v in RELEASE_48B.items() if k != "hidden_size"})
    bad = json.loads(json.dumps(RELEASE_48B))
    bad["linear_attn_config"]["full_attn_layers"] = [0, 4]
    with pytest.raises(ValueError, match="1-based"):
        config_from_hf(bad)
    with pytest.raises(ValueError, match="moe_router_activation_func"):
        config_from_hf({**RELEASE_48B, "moe_router_activation_func": "softmax"})
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**RELEASE_48B, "hidden_act": "gelu"})


# ------------------------------------------------------------- per-layer feed-forward pattern
def test_mlp_layer_types_builds_each_layer_as_listed():
    types = ("dense", "moe", "dense", "moe", "moe")
    cfg = KimiLinearConfig.from_preset("tiny", num_hidden_layers=5, mlp_layer_types=list(types))
    assert cfg.mlp_layer_types == types and cfg.mlp_layer_kinds == types
    assert [cfg.is_moe_layer(i) for i in range(5)] == [t == "moe" for t in types]
    model = KimiLinearForCausalLM(cfg)
    built = tuple(
        "moe" if hasattr(layer, "block_sparse_moe") else "dense" for layer in model.model.layers
    )
    assert built == types
    assert model(torch.randint(0, cfg.vocab_size, (1, 7))).shape == (1, 7, cfg.vocab_size)
    assert cfg.to_dict()["mlp_layer_types"] == list(types)
    assert KimiLinearConfig(**cfg.to_dict()) == cfg
    # without the list, the rule (first_k_dense_replace / moe_layer_freq) decides, as before
    rule = KimiLinearConfig.from_preset("tiny", first_k_dense_replace=1, moe_layer_freq=2)
    assert rule.mlp_layer_types is None and rule.mlp_layer_kinds == (
        "dense",
        "dense",
        "moe",
        "dense",
    )
    # a list that agrees with non-default rule fields is accepted
    assert rule.replace(mlp_layer_types=("dense", "dense", "moe", "dense")).is_moe_layer(2)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(mlp_layer_types=["moe"] * 3), r"mlp_layer_types must be None or a list of num_hidden_layers=4 entries, got 3"),
        (dict(mlp_layer_types=["dense", "sparse", "moe", "moe"]), r"entries must be one of \('dense', 'moe'\), got 'sparse' \(transformers' 'sparse' is 'moe' here\)"),
        (dict(mlp_layer_types=["dense", "mo", "moe", "moe"]), r"got 'mo'.*did you mean 'moe'"),
        (dict(mlp_layer_types=["dense", "moe", "dense", "dense"], num_experts=0), r"has 'moe' layers \[1\] but num_experts is 0"),
        (
            dict(mlp_layer_types=["dense", "moe", "dense", "moe"], first_k_dense_replace=2),
            r"mlp_layer_types \['dense', 'moe', 'dense', 'moe'\] contradicts first_k_dense_replace=2 / moe_layer_freq=1",
        ),
    ],
)  # fmt: skip
def test_mlp_layer_types_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        KimiLinearConfig.from_preset("tiny", **changes)
