"""``kimi-linear info``: parameter counts, layer layout, FLOPs per token and decode-cache sizes.

Counts come from the real modules built on the meta device (no memory is allocated), so they
always agree with :class:`~kimi_linear.model.KimiLinearForCausalLM`.

Active parameters per token follow the convention of the published "A3B" / "32B activated"
figures: every parameter a token's forward pass multiplies by, i.e. attention, dense MLPs,
shared experts, the router, ``num_experts_per_token`` of the routed experts, norms and the
LM head, but **not** the input embedding table (a row lookup, not a matrix product).  With it,
Kimi K2 comes out at 31.7B active (published: 32B) and Kimi-Linear-48B-A3B at 3.11B (the name
rounds to 3B; counting neither embedding gives 2.73B, both 3.48B).

FLOPs per token are the analytic counts of :mod:`kimi_linear.flops` (matrix products only, a
multiply-add = 2 FLOPs): the forward pass per token of a sequence of ``T`` tokens (inference
prefill; the chunked KDA form, causal MLA over ``(T + 1) / 2`` keys on average) and a training
step (3x the forward), at each length of :data:`CONTEXT_LENGTHS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kimi_linear.config import PRESETS, KimiLinearConfig

if TYPE_CHECKING:  # torch is imported where needed, so usage errors print without loading it
    import torch

__all__ = [
    "CONTEXT_LENGTHS",
    "CACHE_DTYPE_BYTES",
    "count_parameters",
    "flops_report",
    "info_main",
    "info_report",
]

#: Context lengths at which :func:`info_report` tabulates FLOPs per token and cache sizes.
CONTEXT_LENGTHS = {"4K": 4096, "128K": 131072, "1M": 1048576}
#: Bytes per element of the cache dtypes accepted by ``--cache-dtype``.
CACHE_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _numel(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(config: KimiLinearConfig) -> dict[str, int]:
    """Parameter counts of the model ``config`` describes (built on the meta device).

    Returns a dict with:

    * ``total``: distinct parameters (a tied LM head counted once);
    * ``active``: parameters used per token (see the module docstring for the convention);
    * ``embedding``, ``lm_head`` (0 when tied), ``kda_attention``, ``mla_attention``,
      ``dense_mlp``, ``shared_experts``, ``routed_experts`` (all of them), ``routed_active``
      (the ``num_experts_per_token`` share), ``router`` and ``norms``;
    * ``total_non_embedding``: ``total`` without the embedding and LM head.
    """
    if not isinstance(config, KimiLinearConfig):
        raise ValueError(f"config must be a KimiLinearConfig, got {type(config).__name__}")
    import torch

    from kimi_linear.layers.kda import KimiDeltaAttention
    from kimi_linear.layers.moe import KimiMoE
    from kimi_linear.model import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    counts = dict.fromkeys(
        (
            "kda_attention",
            "mla_attention",
            "dense_mlp",
            "shared_experts",
            "routed_experts",
            "routed_active",
            "router",
            "norms",
        ),
        0,
    )
    for layer in model.model.layers:
        key = (
            "kda_attention" if isinstance(layer.self_attn, KimiDeltaAttention) else "mla_attention"
        )
        # norms inside the attention (o_norm, q_a/kv_a_layernorm) belong to the attention
        counts[key] += _numel(layer.self_attn)
        counts["norms"] += _numel(layer.input_layernorm) + _numel(layer.post_attention_layernorm)
        if isinstance(getattr(layer, "block_sparse_moe", None), KimiMoE):
            moe = layer.block_sparse_moe
            routed = _numel(moe.experts)
            counts["routed_experts"] += routed
            counts["routed_active"] += routed * config.num_experts_per_token // config.num_experts
            counts["shared_experts"] += _numel(getattr(moe, "shared_experts", None))
            counts["router"] += _numel(moe.gate)
        else:
            counts["dense_mlp"] += _numel(layer.mlp)
    counts["norms"] += _numel(model.model.norm)
    embedding = model.model.embed_tokens.weight.numel()
    lm_head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    total = model.num_parameters()
    body = sum(v for k, v in counts.items() if k != "routed_active")
    if body + embedding + lm_head != total:  # every parameter must be in exactly one bucket
        raise RuntimeError(
            f"parameter buckets sum to {body + embedding + lm_head}, model has {total}"
        )
    active = (
        counts["kda_attention"]
        + counts["mla_attention"]
        + counts["dense_mlp"]
        + counts["shared_experts"]
        + counts["routed_active"]
        + counts["router"]
        + counts["norms"]
        + model.lm_head.weight.numel()
    )
    return {
        "total": total,
        "active": active,
        "total_non_embedding": total - embedding - lm_head,
        "embedding": embedding,
        "lm_head": lm_head,
        **counts,
    }


def flops_report(config: KimiLinearConfig) -> dict[str, dict[str, float]]:
    """FLOPs per token at each length of :data:`CONTEXT_LENGTHS` (:mod:`kimi_linear.flops`):
    ``{label: {"tokens", "forward", "training", "sequence_share"}}``, where ``forward`` is the
    inference (prefill) forward pass, ``training`` forward + backward (3x), and
    ``sequence_share`` the part of the forward that grows with the length (KDA chunk mixing and
    MLA attention; the rest is the weights)."""
    from kimi_linear.flops import flops_breakdown, flops_per_token

    out = {}
    for label, n in CONTEXT_LENGTHS.items():
        parts = flops_breakdown(config, n)
        out[label] = {
            "tokens": n,
            "forward": flops_per_token(config, n, training=False),
            "training": flops_per_token(config, n, training=True),
            "sequence_share": (parts["kda_mixing"] + parts["mla_attention"]) / parts["total"],
        }
    return out


def info_report(
    config: KimiLinearConfig, batch_size: int = 1, cache_dtype: str = "bf16"
) -> dict[str, Any]:
    """Everything ``kimi-linear info`` prints, as a JSON-ready dict.

    Keys: ``name``; ``parameters`` (:func:`count_parameters`); ``layers`` (one
    ``{"index", "mixer", "ffn"}`` per layer) and ``layer_counts``; ``flops_per_token``
    (:func:`flops_report`); ``cache`` with the bytes of
    one MLA token over all MLA layers (latent + rope key, ``mla_bytes_per_token``), the
    constant KDA bytes (fp32 recurrent state + conv tails in ``cache_dtype``) for
    ``batch_size`` sequences, and per context length of :data:`CONTEXT_LENGTHS` the total
    bytes of this model, of its all-MLA twin (:meth:`KimiLinearConfig.all_mla_twin`) and the
    reduction ``1 - model / twin``.
    """
    if not isinstance(config, KimiLinearConfig):
        raise ValueError(f"config must be a KimiLinearConfig, got {type(config).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if cache_dtype not in CACHE_DTYPE_BYTES:
        raise ValueError(
            f"cache_dtype must be one of {sorted(CACHE_DTYPE_BYTES)}, got {cache_dtype!r}"
        )
    nbytes = CACHE_DTYPE_BYTES[cache_dtype]
    layers = [
        {"index": i, "mixer": kind, "ffn": "moe" if config.is_moe_layer(i) else "dense"}
        for i, kind in enumerate(config.layer_kinds)
    ]
    twin = config.all_mla_twin()
    zero = config.kv_cache_bytes(0, batch_size, cache_dtype_bytes=nbytes)
    by_context = {}
    for label, n in CONTEXT_LENGTHS.items():
        ours = config.kv_cache_bytes(n, batch_size, cache_dtype_bytes=nbytes)["total"]
        full = twin.kv_cache_bytes(n, batch_size, cache_dtype_bytes=nbytes)["total"]
        by_context[label] = {
            "tokens": n,
            "bytes": ours,
            "all_mla_bytes": full,
            "reduction": 1.0 - ours / full if full else 0.0,
        }
    return {
        "name": config.name,
        "parameters": count_parameters(config),
        "layers": layers,
        "layer_counts": {
            "kda": len(config.kda_layers),
            "mla": len(config.mla_layers),
            "moe": sum(layer["ffn"] == "moe" for layer in layers),
            "dense": sum(layer["ffn"] == "dense" for layer in layers),
        },
        "flops_per_token": flops_report(config),
        "cache": {
            "batch_size": batch_size,
            "cache_dtype": cache_dtype,
            "mla_bytes_per_token": zero["per_token_mla"],
            "kda_state_bytes": zero["kda_state"],
            "kda_conv_bytes": zero["kda_conv"],
            "kda_bytes": zero["kda_state"] + zero["kda_conv"],
            "by_context": by_context,
        },
    }


# ---------------------------------------------------------------------------------------------
# text rendering and CLI
# ---------------------------------------------------------------------------------------------
def _fmt_count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_flops(n: float) -> str:
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def _fmt_bytes(n: float) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _layer_pattern(layers: list[dict[str, Any]]) -> str:
    return "".join(("K" if layer["mixer"] == "kda" else "M") for layer in layers)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable text of an :func:`info_report` dict."""
    p, c, lc = report["parameters"], report["cache"], report["layer_counts"]
    lines = [
        f"model: {report['name']}",
        "",
        "parameters",
        f"  total                {_fmt_count(p['total']):>10}   ({p['total']:,})",
        f"  active per token     {_fmt_count(p['active']):>10}   ({p['active']:,}; LM head included, input embedding not)",
        f"  non-embedding        {_fmt_count(p['total_non_embedding']):>10}",
        f"  embedding / lm_head  {_fmt_count(p['embedding']):>10} / {_fmt_count(p['lm_head'])}",
        f"  KDA / MLA attention  {_fmt_count(p['kda_attention']):>10} / {_fmt_count(p['mla_attention'])}",
        f"  routed experts       {_fmt_count(p['routed_experts']):>10}   (active {_fmt_count(p['routed_active'])})",
        f"  shared experts       {_fmt_count(p['shared_experts']):>10}",
        f"  dense MLPs / router  {_fmt_count(p['dense_mlp']):>10} / {_fmt_count(p['router'])}",
        "",
        f"layers: {len(report['layers'])} ({lc['kda']} KDA, {lc['mla']} MLA; {lc['moe']} MoE, {lc['dense']} dense)",
        f"  pattern (K = KDA, M = MLA): {_layer_pattern(report['layers'])}",
        "",
        "FLOPs per token (analytic, matrix products; kimi_linear/flops.py)",
        f"  {'length':>8}  {'inference':>14}  {'training':>14}  {'length-dependent':>16}",
    ]
    for label, row in report["flops_per_token"].items():
        lines.append(
            f"  {label:>8}  {_fmt_flops(row['forward']):>14}  {_fmt_flops(row['training']):>14}"
            f"  {100 * row['sequence_share']:>15.1f}%"
        )
    lines += [
        "  (inference: the forward pass (prefill) over a sequence of that length; training:"
        " forward + backward = 3x)",
        "",
        f"decode cache (batch {c['batch_size']}, {c['cache_dtype']} latents/conv tails, fp32 KDA state)",
        f"  MLA per token (all MLA layers)  {_fmt_bytes(c['mla_bytes_per_token'])}",
        f"  KDA constant (state + conv)     {_fmt_bytes(c['kda_bytes'])}"
        f"  ({_fmt_bytes(c['kda_state_bytes'])} + {_fmt_bytes(c['kda_conv_bytes'])})",
        f"  {'context':>8}  {'this model':>12}  {'all-MLA twin':>12}  {'reduction':>9}",
    ]
    for label, row in c["by_context"].items():
        lines.append(
            f"  {label:>8}  {_fmt_bytes(row['bytes']):>12}  {_fmt_bytes(row['all_mla_bytes']):>12}"
            f"  {100 * row['reduction']:>8.1f}%"
        )
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimi-linear info",
        description="Parameter counts, layer layout and decode-cache sizes of a Kimi Linear model.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--preset",
        choices=list(PRESETS),
        metavar="NAME",
        help=f"a named preset: {', '.join(PRESETS)}",
    )
    src.add_argument(
        "--hf-config", metavar="PATH", help="a release-style config.json (or the folder holding it)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1,
        metavar="N",
        help="sequences held in the cache (default 1)",
    )
    parser.add_argument(
        "--cache-dtype",
        choices=list(CACHE_DTYPE_BYTES),
        default="bf16",
        help="dtype of MLA latents and conv tails (KDA state is fp32; default bf16)",
    )
    return parser


def info_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kimi-linear info``; returns the process exit code (2 on usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse printed the usage error (or --help)
        return int(e.code or 0)
    try:
        if args.preset is not None:
            config = KimiLinearConfig.from_preset(args.preset)
        else:
            from kimi_linear.hf import config_from_hf  # torch and safetensors: only when needed

            config = config_from_hf(args.hf_config)
        report = info_report(config, batch_size=args.batch_size, cache_dtype=args.cache_dtype)
    except ValueError as e:
        parser.print_usage(sys.stderr)
        print(f"kimi-linear info: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(info_main())
