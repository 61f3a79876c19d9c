"""Peak host memory of ``KimiLinearForCausalLM.from_pretrained`` on a bf16 checkpoint.

Writes a sharded bf16 checkpoint of a few hundred MB (random weights, ``--preset``-like shape
below), then loads it in a fresh Python process (so the figure is not polluted by the writer)
and reports, from that process: resident memory after the imports (baseline), the peak resident
memory during ``from_pretrained`` (``VmHWM``), the checkpoint bytes, the model bytes, and
``(peak - baseline) / checkpoint bytes``.  A loader that reads the whole checkpoint and then
builds an fp32 model (measured too, ``eager_baseline``) holds the bf16 copy and the fp32 model at
once; the meta-device, shard-by-shard loader holds the model plus a few shard pages.

    python -m benchmarks.load_memory --overwrite  # replaces benchmarks/results/cpu/load_memory.{json,md}
    python -m benchmarks.load_memory --quick      # a ~20 MB checkpoint, results/cpu/quick/

The committed results are never replaced unless ``--overwrite`` is given; ``--out-dir`` writes
elsewhere and ``--quick`` to the git-ignored ``quick/`` subfolder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cpu"
SHAPE = dict(
    vocab_size=32768,
    hidden_size=1024,
    num_hidden_layers=8,
    layer_types=("kda", "kda", "kda", "mla") * 2,
    kda_num_heads=8,
    kda_head_dim=128,
    num_attention_heads=8,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    intermediate_size=4096,
    num_experts=16,
    num_experts_per_token=2,
    moe_intermediate_size=1024,
    first_k_dense_replace=1,
    kda_backend="torch",
)
#: ``--quick``: the same layout, small enough to write and load in seconds.
QUICK_SHAPE = {
    **SHAPE,
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "layer_types": ("kda", "kda", "kda", "mla"),
    "kda_num_heads": 4,
    "kda_head_dim": 64,
    "num_attention_heads": 4,
    "kv_lora_rank": 64,
    "intermediate_size": 1024,
    "num_experts": 8,
    "moe_intermediate_size": 256,
}


def status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process from /proc.
    (``ru_maxrss`` would not do: Linux carries it across ``execve`` from the parent.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def eager_load(path: str):
    """The naive loader, for comparison: read every shard into memory, build the model (fp32,
    randomly initialised) and ``load_state_dict`` (what ``from_pretrained`` did before)."""
    from safetensors.torch import load_file

    from kimi_linear import KimiLinearForCausalLM
    from kimi_linear.hf import config_from_hf

    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    model = KimiLinearForCausalLM(config_from_hf(path))
    model.load_state_dict(sd, strict=True)
    return model


def child(path: str, mode: str) -> None:
    """Load in this (fresh) process and print the measurements as JSON."""
    import torch

    from kimi_linear import KimiLinearForCausalLM

    torch.set_num_threads(1)
    base = status_bytes("VmRSS")
    t0 = time.perf_counter()
    if mode == "from_pretrained":
        model = KimiLinearForCausalLM.from_pretrained(path)
    else:
        model = eager_load(path)
    seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ckpt = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    shard = max(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    print(
        json.dumps(
            {
                "baseline_rss": base,
                "peak_rss": peak,
                "checkpoint_bytes": ckpt,
                "largest_shard_bytes": shard,
                "model_bytes": model_bytes,
                "dtype": str(model.dtype),
                "load_seconds": seconds,
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--shard_mb", type=int, default=50, help="max shard size (MB)")
    ap.add_argument(
        "--quick", action="store_true", help="a small checkpoint (seconds), written to quick/"
    )
    ap.add_argument("--out-dir", default=None, help="default: benchmarks/results/cpu/")
    ap.add_argument(
        "--overwrite", action="store_true", help="replace the committed results in results/cpu/"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="from_pretrained", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.mode)
        return 0
    if args.shard_mb < 1:
        ap.error(f"--shard_mb must be >= 1, got {args.shard_mb}")
    out = Path(args.out_dir) if args.out_dir else RESULTS / "quick" if args.quick else RESULTS
    existing = [out / n for n in ("load_memory.json", "load_memory.md") if (out / n).exists()]
    if existing and not (args.overwrite or args.out_dir or args.quick):
        print(
            f"error: {existing[0]} exists (committed results); pass --overwrite to replace them, "
            "--out-dir DIR to write elsewhere, or --quick for a smoke run",
            file=sys.stderr,
        )
        return 2
    import torch

    from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM

    shape = QUICK_SHAPE if args.quick else SHAPE
    # --quick caps the shard size at 4 MB unless --shard_mb was given explicitly
    explicit = any(a == "--shard_mb" or a.startswith("--shard_mb=") for a in sys.argv[1:])
    shard_mb = min(args.shard_mb, 4) if args.quick and not explicit else args.shard_mb
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = KimiLinearForCausalLM(KimiLinearConfig(**shape)).to(torch.bfloat16)
        n_params = model.num_parameters()
        print(f"writing a {n_params / 1e6:.1f}M-parameter bf16 checkpoint...", flush=True)
        model.save_pretrained(d, max_shard_size=shard_mb * 2**20)
        del model
        runs = {}
        for i, mode in enumerate(("from_pretrained", "eager")):
            print(f"[{i + 1}/2] loading with {mode} in a fresh process...", flush=True)
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.load_memory", "--child", d, "--mode", mode],
                cwd=Path(__file__).resolve().parents[1],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    r, e = runs["from_pretrained"], runs["eager"]
    e["peak_over_checkpoint"] = (e["peak_rss"] - e["baseline_rss"]) / e["checkpoint_bytes"]
    r["eager_baseline"] = e
    r["parameters"] = n_params
    r["shard_mb"] = shard_mb
    r["quick"] = args.quick
    r["peak_over_checkpoint"] = (r["peak_rss"] - r["baseline_rss"]) / r["checkpoint_bytes"]
    r["peak_minus_model_over_shard"] = (r["peak_rss"] - r["baseline_rss"] - r["model_bytes"]) / r[
        "largest_shard_bytes"
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_memory.json").write_text(json.dumps(r, indent=2) + "\n")
    mb = 2**20
    md = [
        "# from_pretrained peak host memory (bf16 checkpoint, CPU)",
        "",
        "`python -m benchmarks.load_memory` (load in a fresh process; VmRSS / VmHWM from /proc/self/status).",
        "",
        "| parameters | checkpoint | largest shard | model in memory | baseline RSS | peak RSS | "
        "(peak - baseline) / checkpoint | load time |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['parameters'] / 1e6:.1f}M | {r['checkpoint_bytes'] / mb:.0f} MiB | "
        f"{r['largest_shard_bytes'] / mb:.0f} MiB | {r['model_bytes'] / mb:.0f} MiB ({r['dtype']}) | "
        f"{r['baseline_rss'] / mb:.0f} MiB | {r['peak_rss'] / mb:.0f} MiB | "
        f"{r['peak_over_checkpoint']:.2f} | {r['load_seconds']:.1f} s |",
        "",
        "Naive loader for comparison (every shard read into memory, model built in fp32 with a "
        "random init, then `load_state_dict`), same checkpoint, fresh process: peak RSS "
        f"{e['peak_rss'] / mb:.0f} MiB, (peak - baseline) / checkpoint = "
        f"{e['peak_over_checkpoint']:.2f}, {e['load_seconds']:.1f} s.",
        "",
        f"Peak above baseline minus the model = {r['peak_minus_model_over_shard']:.2f} x the "
        "largest shard (the loader copies one stored tensor at a time out of a memory-mapped "
        "shard).",
        "",
    ]
    (out / "load_memory.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {out / 'load_memory.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
