"""``kimi-linear info``: parameter counts of the published shapes, cache bytes, the CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.hf import config_to_hf
from kimi_linear.info import count_parameters, info_main, info_report


def test_published_parameter_counts():
    k2 = count_parameters(KimiLinearConfig.from_preset("kimi-k2"))
    assert k2["total"] == pytest.approx(1.04e12, rel=0.03)
    assert k2["active"] == pytest.approx(32e9, rel=0.03)
    kl = count_parameters(KimiLinearConfig.from_preset("kimi-linear-48b-a3b"))
    assert kl["total"] == pytest.approx(48e9, rel=0.03)
    # 3.11B with the LM head counted and the input embedding not (the convention that puts
    # K2 at 32B); the model name "A3B" rounds down, so the tolerance here is 4%.
    assert kl["active"] == pytest.approx(3e9, rel=0.04)
    assert kl["embedding"] == kl["lm_head"] == 163840 * 2304


def test_counts_add_up_and_match_the_model():
    cfg = KimiLinearConfig.from_preset("tiny")
    c = count_parameters(cfg)
    assert c["total"] == KimiLinearForCausalLM(cfg).num_parameters()
    buckets = (
        "kda_attention",
        "mla_attention",
        "dense_mlp",
        "shared_experts",
        "routed_experts",
        "router",
        "norms",
    )
    assert sum(c[b] for b in buckets) + c["embedding"] + c["lm_head"] == c["total"]
    D, E, k, inter = (
        cfg.hidden_size,
        cfg.num_experts,
        cfg.num_experts_per_token,
        cfg.moe_intermediate_size,
    )
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert c["routed_experts"] == n_moe * E * 3 * D * inter
    assert c["routed_active"] == n_moe * k * 3 * D * inter
    assert c["active"] == c["total"] - c["routed_experts"] + c["routed_active"] - c["embedding"]
    tied = count_parameters(cfg.replace(tie_word_embeddings=True))
    assert tied["lm_head"] == 0 and tied["total"] == c["total"] - c["embedding"]
    with pytest.raises(ValueError, match="config"):
        count_parameters({"name": "tiny"})


def test_cache_bytes_equal_the_formula_by_hand():
    cfg = KimiLinearConfig.from_preset("kimi-linear-48b-a3b")
    rep = info_report(cfg, batch_size=2, cache_dtype="bf16")["cache"]
    # 7 MLA layers x (512 latent + 64 rope) x 2 bytes per token
    assert rep["mla_bytes_per_token"] == 7 * (512 + 64) * 2
    # 20 KDA layers x 32 heads x 128 x 128 fp32 state, x 2 sequences
    assert rep["kda_state_bytes"] == 2 * 20 * 32 * 128 * 128 * 4
    # 20 KDA layers x 3 convs x 3 tail tokens x 4096 channels x 2 bytes, x 2 sequences
    assert rep["kda_conv_bytes"] == 2 * 20 * 3 * 3 * 4096 * 2
    for label, n in (("4K", 4096), ("128K", 131072), ("1M", 1048576)):
        row = rep["by_context"][label]
        assert row["tokens"] == n
        assert row["bytes"] == 2 * n * 7 * 576 * 2 + rep["kda_state_bytes"] + rep["kda_conv_bytes"]
        assert row["all_mla_bytes"] == 2 * n * 27 * 576 * 2
        assert row["reduction"] == pytest.approx(1 - row["bytes"] / row["all_mla_bytes"])
    assert rep["by_context"]["1M"]["reduction"] == pytest.approx(0.74, abs=0.01)  # "up to 75%"
    fp32 = info_report(cfg, cache_dtype="fp32")["cache"]
    assert fp32["mla_bytes_per_token"] == 7 * 576 * 4


def test_report_layers_and_errors():
    rep = info_report(KimiLinearConfig.from_preset("tiny"))
    assert [layer["mixer"] for layer in rep["layers"]] == ["kda", "kda", "kda", "mla"]
    assert [layer["ffn"] for layer in rep["layers"]] == ["dense", "moe", "moe", "moe"]
    assert rep["layer_counts"] == {"kda": 3, "mla": 1, "moe": 3, "dense": 1}
    with pytest.raises(ValueError, match="batch_size"):
        info_report(KimiLinearConfig.from_preset("tiny"), batch_size=0)
    with pytest.raises(ValueError, match="cache_dtype"):
        info_report(KimiLinearConfig.from_preset("tiny"), cache_dtype="int8")


def _cli() -> list[str]:
    """The installed console script (next to this interpreter, bypassing any pyenv shim)."""
    local = Path(sys.executable).parent / "kimi-linear"
    exe = str(local) if local.is_file() else shutil.which("kimi-linear")
    if exe is None:
        pytest.skip("the kimi-linear console script is not installed")
    return [exe]


def test_console_script_json():
    proc = subprocess.run(
        [*_cli(), "info", "--preset", "tiny", "--json"], capture_output=True, text=True, check=True
    )
    data = json.loads(proc.stdout)
    assert data["name"] == "tiny" and data["parameters"]["total"] > 0
    assert set(data["cache"]["by_context"]) == {"4K", "128K", "1M"}


def test_console_script_unknown_preset_fails_with_the_list():
    proc = subprocess.run([*_cli(), "info", "--preset", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "kimi-linear-48b-a3b" in proc.stderr and "tiny" in proc.stderr


def test_info_main_text_hf_config_and_usage_errors(tmp_path, capsys):
    assert (
        info_main(["--preset", "kimi-linear-48b-a3b", "--batch-size", "4", "--cache-dtype", "fp16"])
        == 0
    )
    out = capsys.readouterr().out
    assert "KKKM" in out and "reduction" in out and "active per token" in out
    (tmp_path / "config.json").write_text(
        json.dumps(config_to_hf(KimiLinearConfig.from_preset("tiny")))
    )
    assert info_main(["--hf-config", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layer_counts"]["mla"] == 1
    assert info_main(["--hf-config", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert info_main(["--preset", "tiny", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert info_main(["--preset", "tiny", "--cache-dtype", "int4"]) == 2
    assert info_main([]) == 2  # one of --preset / --hf-config is required
    assert info_main(["--preset", "tiny", "--hf-config", str(tmp_path)]) == 2


def test_flops_per_token_come_from_flops_py_in_text_and_json(capsys):
    from kimi_linear.flops import flops_breakdown, flops_per_token
    from kimi_linear.info import CONTEXT_LENGTHS, flops_report

    cfg = KimiLinearConfig.from_preset("kimi-linear-48b-a3b")
    rep = info_report(cfg)["flops_per_token"]
    assert rep == flops_report(cfg) and list(rep) == list(CONTEXT_LENGTHS)
    for label, n in CONTEXT_LENGTHS.items():
        row = rep[label]
        parts = flops_breakdown(cfg, n)
        assert row["tokens"] == n
        assert row["forward"] == flops_per_token(cfg, n, training=False) == parts["total"]
        assert row["training"] == flops_per_token(cfg, n) == 3 * row["forward"]
        assert row["sequence_share"] == pytest.approx(
            (parts["kda_mixing"] + parts["mla_attention"]) / parts["total"]
        )
    # the weights dominate at 4K: ~2 FLOPs per active parameter (+ convs, KDA, attention)
    active = count_parameters(cfg)["active"]
    assert 2 * active < rep["4K"]["forward"] < 1.1 * 2 * active
    assert rep["4K"]["forward"] < rep["128K"]["forward"] < rep["1M"]["forward"]
    assert info_main(["--preset", "kimi-linear-48b-a3b"]) == 0
    out = capsys.readouterr().out
    assert "FLOPs per token" in out
    assert f"{rep['4K']['forward'] / 1e9:.2f} GFLOP" in out
    assert f"{rep['128K']['training'] / 1e9:.2f} GFLOP" in out
    assert info_main(["--preset", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    tiny = KimiLinearConfig.from_preset("tiny")
    assert data["flops_per_token"]["4K"]["training"] == flops_per_token(tiny, 4096)
