"""Benchmark the Triton KDA kernels: prefill/training and decode.

Prefill / training: forward and forward+backward time of

* ``ours``  - :func:`kimi_linear.kernels.chunk_kda` (our Triton kernels),
* ``fla``   - ``fla.ops.kda.chunk_kda`` (CUDA only),
* ``torch`` - :func:`kimi_linear.ops.torch_chunk_kda` (our pure-PyTorch chunked op),
* ``sdpa``  - causal ``scaled_dot_product_attention`` (FlashAttention backend on GPU when the
  dtype allows), the softmax-attention baseline,

at a fixed token budget ``B * T`` (default 32K tokens, T from 1K to 64K), H = 16 heads of
K = V = 128, bf16. FLOPs per head and sequence (Kimi Linear paper): KDA ``6 T d^2 + 3 T C d +
T C^2`` (C = 64), causal softmax attention ``2 T^2 d``; forward+backward counts 3x the forward.

Decode: one-token step time of ``ours`` (:func:`kimi_linear.kernels.fused_recurrent_kda` with
``inplace_state=True``) and fla's ``fused_recurrent_kda`` for several batch sizes, against the
bytes-moved floor ``(state read + state write) / memory bandwidth``.

Outputs ``kernels.json``, ``kernels.md`` and ``kernels.png`` under
``benchmarks/results/<device>/`` (or ``--out-dir``). On CPU, our kernels run under the Triton
interpreter (set automatically): use ``--quick`` (tiny shapes, seconds) - CPU numbers say nothing
about GPU speed.

Examples::

    python -m benchmarks.kernel_speed                       # GPU defaults
    python -m benchmarks.kernel_speed --seqlens 4K,16K --tokens 64K --dtype fp32
    python -m benchmarks.kernel_speed --quick --device cpu  # CI smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Any

import torch

from benchmarks.common import (
    apply_quick,
    explicit_dests,
    fmt_tokens,
    parse_dtype,
    positive_int,
    size_list,
)
from benchmarks.hardware import resolve_device
from benchmarks.report import markdown_table, save_results
from benchmarks.timing import bandwidth, timeit

CHUNK = 64


def kda_flops(T: int, d: int) -> float:
    """Forward FLOPs of KDA per head and sequence (paper's count, chunk C = 64)."""
    return 6 * T * d * d + 3 * T * CHUNK * d + T * CHUNK * CHUNK


def attn_flops(T: int, d: int) -> float:
    """Forward FLOPs of causal softmax attention per head and sequence (paper's count)."""
    return 2 * T * T * d


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default: bf16)")
    p.add_argument(
        "--tokens", type=positive_int, default=32 * 1024, help="B * T per run (default 32K)"
    )
    p.add_argument(
        "--seqlens",
        type=size_list(1),
        default=None,
        help="sequence lengths T (default 1K,2K,4K,8K,16K,32K,64K)",
    )
    p.add_argument("--heads", type=positive_int, default=16)
    p.add_argument("--head-dim", type=positive_int, default=128, help="K = V")
    p.add_argument(
        "--decode-batches",
        type=size_list(1),
        default=None,
        help="batch sizes of the decode step (default 1,8,64,256)",
    )
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated subset of ours,fla,torch,sdpa (default: ours,fla,sdpa on "
        "CUDA, ours,torch,sdpa on CPU)",
    )
    p.add_argument(
        "--reps", type=positive_int, default=None, help="timed repetitions (default 10, quick 1)"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny shapes for a smoke run (CPU: seconds)"
    )
    p.add_argument(
        "--out-dir",
        "--out",
        dest="out_dir",
        default=None,
        help="output folder (default benchmarks/results/<device>, quick: .../<device>/quick)",
    )
    args = p.parse_args(argv)
    if args.providers is None:
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.providers = "ours,fla,sdpa" if cuda else "ours,torch,sdpa"
    args.providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    unknown = set(args.providers) - {"ours", "fla", "torch", "sdpa"}
    if unknown:
        p.error(f"unknown providers {sorted(unknown)}; choose from ours, fla, torch, sdpa")
    kernels = sorted({"ours", "fla"} & set(args.providers))
    if kernels and args.head_dim > 256:  # the KDA kernels' largest head dim (kernels/kda/utils.py)
        p.error(
            f"--head-dim {args.head_dim} exceeds 256, the largest head dim of the KDA kernels "
            f"({', '.join(kernels)}); use --providers torch,sdpa for larger heads"
        )
    if args.quick:  # tiny sizes, except those given explicitly
        apply_quick(
            args,
            explicit_dests(p, argv),
            tokens=64,
            seqlens=args.seqlens or [64],
            heads=1,
            head_dim=16,
            decode_batches=args.decode_batches or [1, 2],
            reps=args.reps or 1,
        )
    args.seqlens = args.seqlens or [1 << i for i in range(10, 17)]
    args.decode_batches = args.decode_batches or [1, 8, 64, 256]
    args.reps = args.reps or 10
    return args


def make_inputs(B, T, H, D, dtype, device, requires_grad=False, gen=None):
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, device=device, generator=gen)
    g = -torch.rand(B, T, H, D, device=device, generator=gen) * 0.5
    beta = torch.rand(B, T, H, device=device, generator=gen)
    xs = [q.to(dtype), k.to(dtype), v.to(dtype), g.float(), beta.to(dtype)]
    return [x.requires_grad_(requires_grad) for x in xs]


def kda_providers(names: list[str], device: torch.device) -> dict[str, Any]:
    """name -> callable(q, k, v, g, beta) -> o, for the KDA implementations that can run here."""
    out: dict[str, Any] = {}
    if "ours" in names:
        from kimi_linear.kernels import chunk_kda

        out["ours"] = lambda q, k, v, g, beta: chunk_kda(q, k, v, g, beta)[0]
    if "fla" in names and device.type == "cuda":
        try:
            from fla.ops.kda import chunk_kda as fla_chunk_kda

            out["fla"] = lambda q, k, v, g, beta: fla_chunk_kda(q, k, v, g, beta)[0]
        except ImportError as e:  # pragma: no cover - fla is a dependency
            print(f"note: fla unavailable ({e})", file=sys.stderr)
    if "torch" in names:
        from kimi_linear.ops import torch_chunk_kda

        out["torch"] = lambda q, k, v, g, beta: torch_chunk_kda(q, k, v, g, beta)[0]
    return out


def sdpa(q, k, v):
    """Causal softmax attention on ``[B, T, H, D]`` tensors (FlashAttention backend on GPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if q.device.type != "cuda" or q.dtype == torch.float32:
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(
            1, 2
        )


def time_fwd_bwd(fn, xs, do, device, warmup: int, reps: int) -> tuple[float, float]:
    """Median seconds of ``fn(*xs)`` without grad, and of forward + ``backward(do)``."""
    with torch.no_grad():
        fwd = timeit(lambda: fn(*xs), device, warmup=warmup, reps=reps)["median"]
    leaves = [x.detach().requires_grad_() for x in xs]
    fwdbwd = timeit(lambda: fn(*leaves).backward(do), device, warmup=warmup, reps=reps)["median"]
    return fwd, fwdbwd


def bench_prefill(args, device, dtype) -> list[dict[str, Any]]:
    H, D = args.heads, args.head_dim
    providers = kda_providers(args.providers, device)
    rows = []
    warmup = 0 if args.quick else 3
    for T in args.seqlens:
        B = max(1, args.tokens // T)
        gen = torch.Generator(device=device).manual_seed(T)
        for name in list(providers) + (["sdpa"] if "sdpa" in args.providers else []):
            fn = sdpa if name == "sdpa" else providers[name]
            flops = B * H * (attn_flops(T, D) if name == "sdpa" else kda_flops(T, D))
            row: dict[str, Any] = {"provider": name, "B": B, "T": T, "H": H, "D": D}
            try:
                xs = make_inputs(B, T, H, D, dtype, device, gen=gen)
                do = torch.randn(B, T, H, D, device=device, generator=gen).to(dtype)
                fwd, fwdbwd = time_fwd_bwd(
                    fn, xs[:3] if name == "sdpa" else xs, do, device, warmup, args.reps
                )
                row.update(
                    fwd_ms=fwd * 1e3,
                    fwdbwd_ms=fwdbwd * 1e3,
                    fwd_tflops=flops / fwd / 1e12,
                    fwdbwd_tflops=3 * flops / fwdbwd / 1e12,
                )
            except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(_fmt_row(row), flush=True)
    # ratios against ours
    base = {r["T"]: r for r in rows if r["provider"] == "ours" and "fwd_ms" in r}
    for r in rows:
        b = base.get(r["T"])
        if b is not None and "fwd_ms" in r:
            r["fwd_vs_ours"] = r["fwd_ms"] / b["fwd_ms"]
            r["fwdbwd_vs_ours"] = r["fwdbwd_ms"] / b["fwdbwd_ms"]
    return rows


def decode_step_bytes(q, k, v, g, beta) -> tuple[int, int]:
    """Bytes one recurrent decode step must move: ``(state_bytes, io_bytes)``.

    ``state_bytes``: the fp32 ``[B, H, K, V]`` state (read once and written once per step);
    ``io_bytes``: the step's inputs q, k, v, g, beta plus its output (v's shape and dtype).
    The bytes floor of a step is ``(2 * state_bytes + io_bytes) / bandwidth``.
    """
    B, _, H, K = k.shape
    state_bytes = B * H * K * v.shape[-1] * 4
    io_bytes = (
        sum(x.numel() * x.element_size() for x in (q, k, v, g, beta)) + v.numel() * v.element_size()
    )
    return state_bytes, io_bytes


def bench_decode(args, device, dtype) -> tuple[list[dict[str, Any]], float, str]:
    from kimi_linear.kernels import fused_recurrent_kda

    fla_step = None
    if "fla" in args.providers and device.type == "cuda":
        try:
            from fla.ops.kda import fused_recurrent_kda as fla_step
        except ImportError:  # pragma: no cover
            fla_step = None
    bw, bw_source = bandwidth(device, nbytes=1 << 22 if args.quick else 1 << 28)
    H, D = args.heads, args.head_dim
    rows = []
    warmup = 0 if args.quick else 5
    for Bd in args.decode_batches:
        gen = torch.Generator(device=device).manual_seed(Bd)
        q, k, v, g, beta = make_inputs(Bd, 1, H, D, dtype, device, gen=gen)
        state = torch.randn(Bd, H, D, D, device=device, generator=gen)
        state_bytes, io_bytes = decode_step_bytes(q, k, v, g, beta)
        floor = (2 * state_bytes + io_bytes) / bw
        steps = {
            "ours": partial(
                fused_recurrent_kda, q, k, v, g, beta, initial_state=state, inplace_state=True
            )
        }
        if fla_step is not None:
            steps["fla"] = partial(
                fla_step, q, k, v, g, beta, initial_state=state.clone(), output_final_state=True
            )
        for name, step in steps.items():
            with torch.no_grad():
                t = timeit(
                    step, device, warmup=warmup, reps=max(args.reps, 3 if args.quick else 50)
                )["median"]
            row = {
                "provider": name,
                "batch": Bd,
                "H": H,
                "D": D,
                "step_us": t * 1e6,
                "floor_us": floor * 1e6,
                "floor_fraction": floor / t,
                "achieved_GBps": (2 * state_bytes + io_bytes) / t / 1e9,
            }
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows, bw, bw_source


def _fmt_row(row: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def plot_factory(prefill: list[dict[str, Any]]):
    def plot(fig):
        axes = fig.subplots(1, 2)
        for ax, key, title in (
            (axes[0], "fwd_ms", "forward"),
            (axes[1], "fwdbwd_ms", "forward + backward"),
        ):
            for name in dict.fromkeys(r["provider"] for r in prefill):
                pts = [(r["T"], r[key]) for r in prefill if r["provider"] == name and key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T (B*T fixed)")
            ax.set_ylabel("time (ms)")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()

    return plot


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Our kernels only run on the CPU through the Triton interpreter, which must be chosen
        # before triton is imported (kimi_linear.kernels is imported lazily below).
        if "triton" in sys.modules:
            print("error: on CPU run with TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    if device.type == "cpu" and not args.quick:
        print(
            "note: CPU timings run our kernels under the Triton interpreter; they say nothing about GPU speed",
            file=sys.stderr,
        )
    print(
        f"# prefill / training: tokens={fmt_tokens(args.tokens)} H={args.heads} D={args.head_dim} {args.dtype}"
    )
    prefill = bench_prefill(args, device, dtype)
    print("# decode step")
    decode, bw, bw_source = bench_decode(args, device, dtype)

    cols = [
        "provider",
        "B",
        "T",
        "fwd_ms",
        "fwdbwd_ms",
        "fwd_tflops",
        "fwdbwd_tflops",
        "fwd_vs_ours",
        "fwdbwd_vs_ours",
        "error",
    ]
    md = [
        "# KDA kernels benchmark\n",
        f"Device: {device.type}; dtype {args.dtype}; H={args.heads}, K=V={args.head_dim}; "
        f"B*T = {fmt_tokens(args.tokens)} tokens; median of {args.reps} runs"
        + (" (quick mode: tiny shapes, interpreter on CPU)" if args.quick else "")
        + ".\n",
        "FLOPs per head: KDA 6Td^2 + 3TCd + TC^2 (C=64), causal attention 2T^2d; fwd+bwd = 3x fwd. "
        "Ratios are time / time of ours (> 1: ours faster).\n",
        "## Prefill / training\n",
        markdown_table(prefill, [c for c in cols if any(c in r for r in prefill)]),
        f"## Decode step (bandwidth {bw / 1e9:.3g} GB/s, {bw_source})\n",
        "Floor = (fp32 state read + write + token inputs/outputs) / bandwidth.\n",
        markdown_table(decode),
    ]
    paths = save_results(
        "kernels",
        device,
        {
            "args": {k: v for k, v in vars(args).items()},
            "prefill": prefill,
            "decode": decode,
            "bandwidth_Bps": bw,
            "bandwidth_source": bw_source,
        },
        "\n".join(md),
        plot=plot_factory(prefill),
        out_dir=args.out_dir,
        quick=args.quick,
    )
    print("saved " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
