"""The hybrid model: cached decoding equals the full forward, generation, loss, input checks."""

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import tiny_settings

from kimi_linear import HybridCache, KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.model import CausalLMOutput, cast_model_, sample_next_token

SMALL = tiny_settings(vocab_size=128, intermediate_size=64, moe_intermediate_size=32)
KINDS = {
    "kda": ("kda", "kda"),
    "mla": ("mla", "mla"),
    "hybrid": ("kda", "mla", "kda"),
}


def make_model(kind: str = "hybrid", seed: int = 0, **overrides) -> KimiLinearForCausalLM:
    layers = KINDS[kind]
    kwargs = {**SMALL, "num_hidden_layers": len(layers), "layer_types": layers, **overrides}
    cfg = KimiLinearConfig.from_preset("tiny", **kwargs)
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("prompt_len", [64, 70])
def test_cached_decode_matches_full_forward(kind, prompt_len):
    """Prefill in two pieces (chunked prefill), then decode one token at a time."""
    model = make_model(kind, mla_use_nope=(kind != "mla"))  # the MLA-only model uses RoPE
    n_decode = 5
    ids = torch.randint(
        0,
        model.config.vocab_size,
        (2, prompt_len + n_decode),
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        split = prompt_len // 2 + 3
        pieces = [model(ids[:, :split], cache=cache), model(ids[:, split:prompt_len], cache=cache)]
        for t in range(prompt_len, prompt_len + n_decode):
            pieces.append(model(ids[:, t : t + 1], cache=cache))
    assert cache.seq_len == prompt_len + n_decode
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_greedy_generate_is_deterministic_and_equals_stepwise_argmax():
    model = make_model("hybrid")
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)
    )
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 17) and out.dtype == prompt.dtype
    assert torch.equal(out[:, :9], prompt)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0), out)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # no cache: the full forward every step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = make_model("hybrid")
    prompt = torch.randint(
        0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(3)
    )

    def run(seed, **kw):
        return model.generate(
            prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw
        )

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(run(0, top_k=5, top_p=0.9), run(0, top_k=5, top_p=0.9))
    greedy = model.generate(prompt, 12, temperature=0)
    assert torch.equal(run(4, top_k=1), greedy)
    assert torch.equal(run(5, top_p=1e-6), greedy)


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_next_token(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert drawn == {1, 2}
    probs = logits.softmax(-1)[0]
    # nucleus 0.5: token 1 alone has ~0.44 < 0.5, so token 2 joins; nothing else
    assert probs[1] < 0.5 < probs[1] + probs[2]
    drawn = {int(sample_next_token(logits, 1.0, top_p=0.5, generator=gen)) for _ in range(200)}
    assert drawn == {1, 2}
    assert int(sample_next_token(logits, 0.0)) == 1


def test_eos_pads_finished_sequences_and_stops_early():
    model = make_model("hybrid")
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4)
    )
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 6 + 2])  # the third token row 0 generates
    out = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    for row in range(2):
        gen = out[row, 6:]
        hits = (gen == eos).nonzero()
        if len(hits):
            first = int(hits[0])
            assert torch.equal(gen[: first + 1], greedy[row, 6 : 6 + first + 1])
            assert (gen[first:] == eos).all()
    # a single sequence stops as soon as it produced eos
    single = model.generate(prompt[:1], 10, temperature=0, eos_token_id=eos)
    assert single.shape[1] <= 6 + 3 and int(single[0, -1]) == eos


def test_generate_zero_tokens_and_bad_arguments():
    model = make_model("hybrid").train()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
    assert out.shape == (1, 5) and model.training  # mode restored
    assert model.model.layers[1].block_sparse_moe.expert_load.sum() == 0  # no balancing stats
    model = make_model("kda")
    prompt = torch.zeros(1, 3, dtype=torch.long)
    assert torch.equal(model.generate(prompt, 0), prompt)
    bad = [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-0.5), "temperature"),
        (dict(max_new_tokens=2, top_k=0), "top_k"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p"),
        (dict(max_new_tokens=2, eos_token_id=10_000), "eos_token_id"),
        (dict(max_new_tokens=2, generator=0), "generator"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            model.generate(prompt, **kwargs)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = make_model("hybrid")
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5)
    )
    labels = ids.clone()
    labels[0, 4:7] = -100
    out = model(ids, labels=labels)
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (2, 12, model.config.vocab_size)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert model.model.layers[0].self_attn.A_log.grad is not None


@pytest.mark.parametrize(
    "make_ids, match",
    [
        (lambda V: torch.rand(2, 4), "integer dtype"),
        (lambda V: torch.full((2, 4), V), "vocab_size"),
        (lambda V: torch.full((2, 4), -1), "vocab_size"),
        (lambda V: torch.zeros(4, dtype=torch.long), "2-D"),
        (lambda V: torch.zeros(1, 2, 4, dtype=torch.long), "2-D"),
        (lambda V: torch.zeros(2, 0, dtype=torch.long), "at least one token"),
        (lambda V: [[1, 2]], "torch.Tensor"),
    ],
)
def test_bad_input_ids(make_ids, match):
    model = make_model("kda")
    with pytest.raises(ValueError, match=f"input_ids.*{match}|{match}"):
        model(make_ids(model.config.vocab_size))


def test_bad_labels_and_cache():
    model = make_model("hybrid")
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids, labels=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels values"):
        model(ids, labels=torch.full((2, 4), 10_000))
    with pytest.raises(ValueError, match="labels need T >= 2"):
        model(ids[:, :1], labels=ids[:, :1])
    with pytest.raises(ValueError, match="labels must have an integer dtype"):
        model(ids, labels=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="cache batch size 3"):
        model(ids, cache=model.new_cache(3))
    with pytest.raises(ValueError, match="cache must be a HybridCache"):
        model(ids, cache={"seq_len": 0})
    other = KimiLinearConfig.from_preset(
        "tiny", **{**SMALL, "num_hidden_layers": 3, "layer_types": ("mla", "kda", "kda")}
    )
    with pytest.raises(ValueError, match=r"cache.layers\[0\] must be a KDALayerCache"):
        model(ids, cache=HybridCache.from_config(other, 2))


def test_new_cache_defaults_follow_the_model():
    model = make_model("hybrid")
    cache = model.new_cache(2, capacity=7)
    assert isinstance(cache, HybridCache) and cache.batch_size == 2 and cache.seq_len == 0
    assert cache.layers[1].capacity == 7 and cache.layers[1].latent.dtype == torch.float32
    cast_model_(model, torch.bfloat16)
    cache = model.new_cache(1)
    assert (
        cache.layers[0].conv_q.dtype == torch.bfloat16
        and cache.layers[0].state.dtype == torch.float32
    )


def test_cast_keeps_fp32_parameters_and_bf16_forward_runs():
    model = cast_model_(make_model("hybrid"), torch.bfloat16)
    attn = model.model.layers[0].self_attn
    assert attn.A_log.dtype == torch.float32 and attn.dt_bias.dtype == torch.float32
    assert attn.q_proj.weight.dtype == torch.bfloat16
    moe = model.model.layers[1].block_sparse_moe
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        steps = torch.cat(
            [model(ids[:, :6], cache=cache)]
            + [model(ids[:, t : t + 1], cache=cache) for t in range(6, 10)],
            1,
        )
    assert full.dtype == torch.bfloat16 and torch.isfinite(full).all()
    torch.testing.assert_close(steps.float(), full.float(), atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="dtype"):
        cast_model_(model, torch.int8)


def test_every_cast_keeps_exactly_the_layers_fp32_tensors(tmp_path):
    """One rule (kimi_linear.layers.fp32): the tensors named by the layers' ``fp32_tensors``,
    and only those, stay float32 through cast_model_, module.to(dtype) and from_pretrained."""
    from kimi_linear.layers.fp32 import fp32_tensor_names

    model = make_model("hybrid")
    keep = fp32_tensor_names(model)
    expected = {"model.layers.0.self_attn.A_log", "model.layers.0.self_attn.dt_bias"}
    expected |= {
        f"model.layers.1.block_sparse_moe.{n}"
        for n in ("gate.e_score_correction_bias", "expert_load", "last_expert_load")
    }
    assert expected <= keep and all(
        n.rsplit(".", 1)[-1]
        in {"A_log", "dt_bias", "e_score_correction_bias", "expert_load", "last_expert_load"}
        for n in keep
    )

    def fp32_names(m):
        tensors = {**dict(m.named_parameters()), **dict(m.named_buffers())}
        return {n for n, t in tensors.items() if t.dtype == torch.float32}

    model.save_pretrained(tmp_path)
    assert fp32_names(cast_model_(make_model("hybrid"), torch.bfloat16)) == keep
    assert fp32_names(make_model("hybrid").to(torch.bfloat16)) == keep
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert fp32_names(loaded) == keep
    a_log = model.model.layers[0].self_attn.A_log
    torch.testing.assert_close(loaded.model.layers[0].self_attn.A_log, a_log, rtol=0, atol=0)


def test_structure_init_and_meta_build():
    model = make_model("hybrid")
    layers = model.model.layers
    assert [type(layer.self_attn).__name__ for layer in layers] == [
        "KimiDeltaAttention",
        "MLAttention",
        "KimiDeltaAttention",
    ]
    assert hasattr(layers[0], "mlp") and not hasattr(layers[0], "block_sparse_moe")
    assert hasattr(layers[1], "block_sparse_moe") and not hasattr(layers[1], "mlp")
    std = model.config.initializer_range
    w = model.model.embed_tokens.weight
    assert abs(w.std().item() - std) < 0.2 * std
    assert abs(layers[1].block_sparse_moe.experts.w1.std().item() - std) < 0.2 * std
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        meta = KimiLinearForCausalLM(model.config)
    assert meta.device.type == "meta" and meta.num_parameters() == model.num_parameters()
    with pytest.raises(ValueError, match="config must be a KimiLinearConfig"):
        KimiLinearForCausalLM({"hidden_size": 8})


def test_tied_embeddings():
    model = make_model("kda", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = make_model("kda")
    assert untied.num_parameters() - model.num_parameters() == model.lm_head.weight.numel()
    assert (
        model.num_parameters(exclude_embeddings=True)
        == model.num_parameters() - model.lm_head.weight.numel()
    )


def test_logits_to_keep_equals_slice_of_full_logits():
    model = make_model()
    ids = torch.randint(0, 128, (2, 9))
    full = model(ids)
    torch.testing.assert_close(model(ids, logits_to_keep=3), full[:, -3:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_gva_model_cached_decode_matches_full_forward(tmp_path):
    """A tiny GVA model (kda_num_v_heads = 2 * kda_num_heads): prefill + decode through the
    HybridCache equals the full forward; its Hugging Face export is refused (no release field)."""
    model = make_model("hybrid", kda_num_v_heads=4)
    assert model.config.kda_value_heads == 4
    ids = torch.randint(
        0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        pieces = [model(ids[:, :30], cache=cache)]
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kda_num_v_heads=4 .* has no field in the release"):
        model.save_pretrained(tmp_path / "hf")
