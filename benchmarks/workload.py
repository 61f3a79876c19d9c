"""The benchmarked workload: model preset arguments, weight and cache bytes per step, cache fill."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import fail, positive_int


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected number of distinct experts hit by ``num_tokens`` tokens routing top-``k`` of ``E``.

    Uniform routing: an expert is missed by one token with probability ``1 - k/E``, so
    ``E * (1 - (1 - k/E) ** n)`` experts are read at least once (``k`` for one token, all ``E``
    for large batches).
    """
    if num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def active_weight_bytes(
    model: torch.nn.Module, num_tokens: int, dtype_bytes: int | None = None
) -> dict[str, float]:
    """Weight bytes one forward step over ``num_tokens`` tokens must read (the decode floor).

    Every parameter counts once, except routed experts (3-D ``experts`` parameters
    ``[E, ...]``: only the expected number of distinct experts hit, see
    :func:`expected_distinct_experts`) and the input embedding (``num_tokens`` rows; the full
    matrix when tied to the LM head, which reads all of it). Works on a ``meta``-device model.
    ``dtype_bytes`` overrides each parameter's own element size (e.g. 2 for a bf16 deployment).

    Returns bytes: ``total``, ``dense`` (always read), ``experts`` (expected routed expert
    bytes), ``embedding``, and ``all_params`` (every weight, the storage footprint).
    """
    config = getattr(model, "config", None)
    n_exp = getattr(config, "num_experts", 0) or 0
    top_k = getattr(config, "num_experts_per_token", 0) or 0
    frac = expected_distinct_experts(n_exp, top_k, num_tokens) / n_exp if n_exp else 0.0
    lm_head = getattr(model, "lm_head", None)
    tied_ptr = None
    if lm_head is not None and getattr(config, "tie_word_embeddings", False):
        tied_ptr = id(lm_head.weight)
    out = {"dense": 0.0, "experts": 0.0, "embedding": 0.0, "all_params": 0.0}
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        size = p.numel() * (dtype_bytes or p.element_size())
        out["all_params"] += size
        if ".experts." in f".{name}" and p.dim() == 3 and n_exp and p.shape[0] == n_exp:
            out["experts"] += size * frac
        elif name.endswith("embed_tokens.weight") and id(p) != tied_ptr:
            out["embedding"] += (
                min(num_tokens, p.shape[0]) * p[0].numel() * (dtype_bytes or p.element_size())
            )
        else:
            out["dense"] += size
    out["total"] = out["dense"] + out["experts"] + out["embedding"]
    return out


def cache_read_bytes(config: Any, context: int, batch_size: int, cache_dtype_bytes: int) -> int:
    """Cache bytes one decode step at ``context`` tokens must read: every MLA latent and rope
    key cached so far, every KDA state (fp32) and conv tail (``config.kv_cache_bytes``)."""
    return config.kv_cache_bytes(
        context, batch_size=batch_size, cache_dtype_bytes=cache_dtype_bytes
    )["total"]


def fill_cache_(cache: Any, length: int, seed: int = 0, pool_size: int = 1 << 20) -> Any:
    """Fill a :class:`~kimi_linear.cache.HybridCache` synthetically, as after ``length`` tokens.

    MLA layers: unit-variance random latents and rope keys in the first ``length`` slots and
    ``length`` set; their capacity must be ``>= length``. KDA layers: random fp32 states of the
    scale a normalised-key delta rule keeps (entries ~ N(0, 1/K)) and random conv tails.
    ``cache.seq_len = length``. Values are tiled from one pool of ``pool_size`` normal samples
    at random offsets, so a 1M-token cache fills at memory-copy speed. Returns the cache.
    """
    from kimi_linear.cache import KDALayerCache, LatentKVCache

    gen = torch.Generator(device="cpu").manual_seed(seed)
    pools: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    largest = max((t.numel() for layer in cache.layers for t in layer.tensors()), default=0)
    pool_size = max(min(pool_size, 2 * largest), 2)  # small caches need no 1M-sample pool

    def fill(t: torch.Tensor, std: float = 1.0) -> None:
        """Copy pool values (times ``std``) into the contiguous view ``t`` (any shape)."""
        key = (t.device, t.dtype)
        if key not in pools:
            pools[key] = torch.randn(pool_size, generator=gen).to(device=t.device, dtype=t.dtype)
        pool = pools[key]
        flat = t.view(-1)
        pos = 0
        while pos < flat.numel():
            off = int(torch.randint(0, pool_size // 2, (1,), generator=gen))
            n = min(pool_size - off, flat.numel() - pos)
            flat[pos : pos + n].copy_(pool[off : off + n])
            pos += n
        if std != 1.0:
            t.mul_(std)

    for layer in cache.layers:
        if isinstance(layer, LatentKVCache):
            if layer.capacity < length:
                raise ValueError(
                    f"cache capacity {layer.capacity} < length {length}: allocate it with capacity >= length"
                )
            for t in layer.tensors():
                if t.shape[1] == length:
                    fill(t)
                else:  # only the first ``length`` slots are valid; the rest stays as allocated
                    for b in range(t.shape[0]):
                        fill(t[b, :length])
            layer.length = length
        elif isinstance(layer, KDALayerCache):
            fill(layer.state, std=layer.state.shape[-2] ** -0.5)
            for t in (layer.conv_q, layer.conv_k, layer.conv_v):
                fill(t)
        else:
            raise TypeError(f"unknown cache layer type {type(layer).__name__}")
    cache.seq_len = length
    return cache


def rewind_cache_(cache: Any, length: int) -> None:
    """Set every MLA layer's length and ``cache.seq_len`` back to ``length`` (between timed
    repetitions; KDA states are left as they are: their size, not their values, sets the cost)."""
    from kimi_linear.cache import LatentKVCache

    for layer in cache.layers:
        if isinstance(layer, LatentKVCache):
            layer.length = length
    cache.seq_len = length


def add_model_args(parser: Any, default_preset: str | None) -> None:
    """``--preset`` plus the size overrides (``--layers``, ``--experts``, ``--hidden-size``,
    ``--vocab-size``) that shrink a published layout to what a device holds."""
    from kimi_linear.config import KimiLinearConfig

    names = KimiLinearConfig.preset_names()
    parser.add_argument(
        "--preset",
        default=default_preset,
        choices=names,
        metavar="NAME",
        help=f"model preset, one of {', '.join(names)}"
        + (
            " (default: %(default)s)"
            if default_preset
            else " (default: tiny with --quick, else small on CPU and kimi-linear-48b-a3b with --experts 16 on GPU)"
        ),
    )
    parser.add_argument(
        "--layers",
        type=positive_int,
        default=None,
        help="override num_hidden_layers (the preset's KDA/MLA period is kept)",
    )
    parser.add_argument(
        "--experts",
        type=int,
        default=None,
        help="override num_experts (0: dense MLP everywhere); top-k is capped at it",
    )
    parser.add_argument(
        "--hidden-size", type=positive_int, default=None, help="override hidden_size"
    )
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="override vocab_size")


def default_preset_(args: Any, gpu: bool) -> None:
    """Fill ``args.preset`` in place when :func:`add_model_args` left it unset: ``tiny`` with
    ``--quick``, else ``small`` on CPU and ``kimi-linear-48b-a3b`` with 16 routed experts (unless
    ``--experts`` says otherwise) on a GPU."""
    if args.preset is None:
        args.preset = "tiny" if args.quick else ("kimi-linear-48b-a3b" if gpu else "small")
        if args.preset == "kimi-linear-48b-a3b" and args.experts is None:
            args.experts = 16


def model_flags(args: Any) -> str:
    """The :func:`add_model_args` flags that rebuild the measured model, as Markdown code."""
    return (
        f"`--preset {args.preset}`"
        + (f" `--layers {args.layers}`" if args.layers else "")
        + (f" `--experts {args.experts}`" if args.experts is not None else "")
    )


def build_model(config: Any, dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    """A :class:`~kimi_linear.model.KimiLinearForCausalLM` of ``config`` initialised from
    ``seed`` on ``device``, cast to ``dtype`` and in eval mode."""
    from kimi_linear.model import KimiLinearForCausalLM, cast_model_

    torch.manual_seed(seed)
    with torch.device(device):
        model = KimiLinearForCausalLM(config)
    return cast_model_(model, dtype).eval()


def config_from_args(args: Any) -> Any:
    """The :class:`~kimi_linear.config.KimiLinearConfig` named by :func:`add_model_args`'s
    arguments; a bad combination exits with the config's own message."""
    from kimi_linear.config import KimiLinearConfig

    overrides: dict[str, Any] = {}
    if getattr(args, "layers", None) is not None:
        overrides["num_hidden_layers"] = args.layers
    if getattr(args, "experts", None) is not None:
        if args.experts < 0:
            fail(f"--experts must be >= 0, got {args.experts}")
        overrides["num_experts"] = args.experts
    if getattr(args, "hidden_size", None) is not None:
        overrides["hidden_size"] = args.hidden_size
    if getattr(args, "vocab_size", None) is not None:
        overrides["vocab_size"] = args.vocab_size
    try:
        base = KimiLinearConfig.from_preset(args.preset)
        if overrides.get("num_experts"):
            overrides["num_experts_per_token"] = min(
                base.num_experts_per_token, overrides["num_experts"]
            )
        if "vocab_size" in overrides:  # special token ids of the preset may fall outside
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                tok = getattr(base, key)
                if tok is not None and tok >= overrides["vocab_size"]:
                    overrides[key] = None
        if "num_hidden_layers" in overrides:
            overrides["first_k_dense_replace"] = min(
                base.first_k_dense_replace, overrides["num_hidden_layers"]
            )
        return base.replace(**overrides) if overrides else base
    except ValueError as e:
        fail(f"invalid model settings for --preset {args.preset}: {e}")
