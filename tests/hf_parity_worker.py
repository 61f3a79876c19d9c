"""Parity of the kit with transformers' ``KimiLinearForCausalLM``; run by ``tests/test_hf.py``.

Runs in its own process (``python tests/hf_parity_worker.py OUT.json``): ``fla`` is made
unimportable before transformers is imported, so transformers binds its pure-PyTorch KDA
fallbacks (fla's Triton kernels need a GPU) without touching the fla that other tests of the
same pytest process use.  For every case of :data:`CASES` it checks both directions, fp32:

* ``kit``: a kit model -> kit ``save_pretrained`` -> transformers ``from_pretrained``;
* ``native``: a transformers model configured natively -> transformers ``save_pretrained`` ->
  kit ``from_pretrained``;

and writes, per case and direction, the missing / unexpected keys reported by transformers,
the max |logit difference| at each length of :data:`LENGTHS` (full-sequence forward) and both
greedy continuations (cached decoding).  Exit status 0 unless something crashed; the test
asserts on the JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback

sys.modules["fla"] = None  # type: ignore[assignment]  # transformers: use the torch fallbacks

import torch  # noqa: E402

LENGTHS = (1, 13, 97)  # one token, a prime, more than one KDA chunk (64)
NEW_TOKENS = 8

# kit config fields for each case (small shapes; every case has KDA, MLA, dense and MoE layers)
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=4,
    layer_types=("kda", "kda", "kda", "mla"),
    kda_num_heads=2,
    kda_head_dim=16,
    num_attention_heads=2,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    intermediate_size=96,
    num_experts=8,
    num_experts_per_token=2,
    num_shared_experts=1,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    routed_scaling_factor=2.446,
    initializer_range=0.06,
    kda_backend="torch",
    max_position_embeddings=4096,
)
CASES: dict[str, dict] = {
    "base": {},
    "q_lora": dict(q_lora_rank=24),
    "dense_first_two_shared_two": dict(first_k_dense_replace=2, num_shared_experts=2),
    "pattern_mla_first": dict(layer_types=("mla", "kda", "mla", "kda")),
    "grouped_routing": dict(num_experts=8, num_expert_group=4, topk_group=2),
    "moe_every_other_layer": dict(moe_layer_freq=2),
    "tied_embeddings": dict(tie_word_embeddings=True),
    # a per-layer pattern first_k_dense_replace / moe_layer_freq cannot express (transformers'
    # mlp_layer_types): dense layers between MoE layers
    "dense_between_moe": dict(mlp_layer_types=("dense", "moe", "dense", "moe")),
    # n_shared_experts=0: transformers keeps zero-size shared_experts tensors, the kit none
    "no_shared_experts": dict(num_shared_experts=0),
}


def perturb_(named_params, named_buffers, seed: int) -> None:
    """Give norms, decay parameters and routing biases non-default values (a trained-like
    model), so that every one of them influences the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 1)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
        for name, b in named_buffers:
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def compare_modules(kit, tf, seed: int) -> dict:
    """Module by module on the same inputs: run transformers' model with forward hooks that
    record each block's input and output, feed the recorded input to the kit's matching module,
    and return, per module kind, the largest ``max|kit - tf| / max|tf|`` over the layers."""
    records: dict = {}

    def hook(tag):
        def f(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            records[tag] = (x.detach(), (out[0] if isinstance(out, tuple) else out).detach())

        return f

    handles = []
    for i, layer in enumerate(tf.model.layers):
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            mod = getattr(layer, name)
            handles.append(mod.register_forward_hook(hook((i, name)), with_kwargs=True))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, kit.config.vocab_size, (2, 97), generator=gen)
    with torch.no_grad():
        tf(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        worst: dict = {}
        for (i, name), (x, y) in records.items():
            layer = kit.model.layers[i]
            if name == "mlp":
                mod, kind = (layer.block_sparse_moe, "moe") if layer.is_moe else (layer.mlp, "mlp")
            elif name == "self_attn":
                mod, kind = layer.self_attn, layer.kind
            else:
                mod, kind = getattr(layer, name), "norm"
            rel = ((mod(x) - y).abs().max() / y.abs().max()).item()
            worst[kind] = max(worst.get(kind, 0.0), rel)
    return worst


def compare(kit, tf, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = kit.config.vocab_size
    out: dict = {"max_abs_diff": {}, "logit_scale": {}}
    with torch.no_grad():
        for T in LENGTHS:
            ids = torch.randint(0, vocab, (2, T), generator=gen)
            a = kit(ids)
            b = tf(input_ids=ids, use_cache=False).logits
            out["max_abs_diff"][str(T)] = (a - b).abs().max().item()
            out["logit_scale"][str(T)] = b.abs().max().item()
        prompt = torch.randint(0, vocab, (1, 11), generator=gen)
        kit_tokens = kit.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0)
        tf_tokens = tf.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    out["kit_generate"] = kit_tokens[0, 11:].tolist()
    out["tf_generate"] = tf_tokens[0, 11:].tolist()
    return out


def run_case(name: str, fields: dict) -> dict:
    from transformers import KimiLinearConfig as TFConfig
    from transformers import KimiLinearForCausalLM as TFModel

    from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
    from kimi_linear.hf import config_to_hf

    result: dict = {}
    cfg = KimiLinearConfig(**{**BASE, **fields})
    # (a) kit -> kit save -> transformers load
    torch.manual_seed(0)
    kit = KimiLinearForCausalLM(cfg).eval()
    perturb_(kit.named_parameters(), kit.named_buffers(), seed=1)
    with tempfile.TemporaryDirectory() as d:
        kit.save_pretrained(d)
        tf, info = TFModel.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
    tf.eval()
    with tempfile.TemporaryDirectory() as d:  # transformers re-saves it (mixed config form)
        tf.save_pretrained(d)
        back = KimiLinearForCausalLM.from_pretrained(d, kda_backend="torch")
    resaved_equal = config_to_hf(back.config) == config_to_hf(cfg) and all(
        torch.equal(a, b) for a, b in zip(kit.state_dict().values(), back.state_dict().values())
    )
    empty = {k for k, v in tf.state_dict().items() if v.numel() == 0}  # nothing to load
    result["kit"] = {
        "missing": sorted(set(info["missing_keys"]) - empty),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(x) for x in info.get("mismatched_keys", [])],
        "resaved_equal": resaved_equal,
        **compare(kit, tf, seed=2),
        "modules": compare_modules(kit, tf, seed=6),
    }
    # (b) transformers configured natively -> transformers save -> kit load
    kinds = cfg.layer_kinds
    n = cfg.num_hidden_layers
    tf_cfg = TFConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.num_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim,
        n_group=cfg.num_expert_group,
        topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_token,
        num_local_experts=cfg.num_experts,
        initializer_range=cfg.initializer_range,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        layer_types=["full_attention" if k == "mla" else "linear_attention" for k in kinds],
        mlp_layer_types=["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(n)],
        linear_head_dim=cfg.kda_head_dim,
        linear_num_heads=cfg.kda_num_heads,
        linear_conv_kernel_dim=cfg.kda_conv_size,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(3)
    tf = TFModel(tf_cfg).eval()
    if cfg.tie_word_embeddings:  # transformers does not tie; make the head equal the embedding
        with torch.no_grad():
            tf.lm_head.weight.copy_(tf.model.embed_tokens.weight)
    perturb_(tf.named_parameters(), tf.named_buffers(), seed=4)
    with tempfile.TemporaryDirectory() as d:
        tf.save_pretrained(d)
        kit = KimiLinearForCausalLM.from_pretrained(d, kda_backend="torch").eval()
    with tempfile.TemporaryDirectory() as d:  # transformers' internal layout loads the same
        tf.save_pretrained(d, save_original_format=False)
        internal = KimiLinearForCausalLM.from_pretrained(d, kda_backend="torch")
    same = all(
        torch.equal(a, b) for a, b in zip(kit.state_dict().values(), internal.state_dict().values())
    )
    # the same model (first_k_dense_replace / moe_layer_freq may be spelled differently for
    # the same mlp_layer_types)
    spelling = {"first_k_dense_replace", "moe_layer_freq"}
    a, b = config_to_hf(kit.config), config_to_hf(cfg)
    result["native"] = {
        "kit_config_equal": {k: v for k, v in a.items() if k not in spelling}
        == {k: v for k, v in b.items() if k not in spelling}
    }
    result["native"]["internal_layout_equal"] = same
    result["native"].update(compare(kit, tf, seed=5))
    return result


def main(path: str, names: list[str]) -> int:
    torch.set_num_threads(1)
    results: dict = {}
    for name in names or list(CASES):
        try:
            results[name] = run_case(name, CASES[name])
        except Exception:  # reported per case, so one failure does not hide the others
            results[name] = {"error": traceback.format_exc()}
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))
