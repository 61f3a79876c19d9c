"""Saved-activation bytes of one training forward, with and without activation checkpointing.

Autograd keeps tensors for the backward pass; this script counts them with
``torch.autograd.graph.saved_tensors_hooks``: every tensor packed during the forward of the
model and its loss, counted once per distinct storage (views of one buffer share it), parameters
excluded (they live anyway).  With activation checkpointing
(:meth:`KimiLinearModel.set_activation_checkpointing`), a decoder layer keeps only its input
during the forward; the layer's own saved tensors exist again, one layer at a time, while the
backward recomputes it, so the figure here is the forward's resident set, not the backward's peak.

The counts are a property of the graph, not a timing, so they are the same on any machine for a
given preset, batch, length and dtype.

Example::

    python -m benchmarks.activation_memory --preset small --batch-size 1 --seq-lens 512 2048
    python -m benchmarks.activation_memory --quick     # tiny preset, 64 / 128 tokens, seconds

The committed results (``benchmarks/results/cpu/activation_memory.*``) are never replaced
unless ``--overwrite`` is given; ``--out-dir`` writes elsewhere and ``--quick`` writes to the
git-ignored ``quick/`` subfolder.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.common import HelpFormatter, apply_quick, explicit_dests, fmt_bytes, positive_int
from benchmarks.hardware import set_threads
from benchmarks.report import markdown_table, refuse_overwrite, save_results
from benchmarks.workload import add_model_args, config_from_args


def saved_activation_bytes(model: Any, ids: torch.Tensor) -> tuple[int, int]:
    """``(bytes, tensors)`` autograd saves for the backward of ``model(ids, labels=ids).loss``:
    distinct storages of the packed tensors, the model's parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()), len(seen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=HelpFormatter
    )
    add_model_args(parser, default_preset="small")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument(
        "--seq-lens", type=positive_int, nargs="+", default=[256, 1024], help="sequence lengths"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/cpu/")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: the tiny preset at 64 and 128 tokens, written to results/cpu/quick/",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the committed results in results/cpu/"
    )
    args = parser.parse_args(argv)
    refuse_overwrite(
        "activation_memory", torch.device("cpu"), args.out_dir, args.quick, args.overwrite
    )
    if args.quick:  # a tiny model and lengths, except those given explicitly
        apply_quick(args, explicit_dests(parser, argv), preset="tiny", seq_lens=[64, 128])
    set_threads(args.threads)
    from kimi_linear.model import KimiLinearForCausalLM

    config = config_from_args(args).replace(kda_backend="torch")
    print(f"building {config.name} ({config.num_hidden_layers} layers)...", flush=True)
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(config).train()
    rows = []
    for i, T in enumerate(args.seq_lens):
        print(f"[{i + 1}/{len(args.seq_lens)}] T={T}: measuring...", flush=True)
        ids = torch.randint(0, config.vocab_size, (args.batch_size, T))
        row: dict[str, Any] = {"seq_len": T, "batch_size": args.batch_size}
        for name, enabled in (("plain", False), ("checkpointed", True)):
            model.model.set_activation_checkpointing(enabled)
            nbytes, count = saved_activation_bytes(model, ids)
            row[f"{name}_bytes"] = nbytes
            row[f"{name}_tensors"] = count
        row["ratio"] = row["plain_bytes"] / max(row["checkpointed_bytes"], 1)
        rows.append(row)
        print(
            f"T={T}: plain {fmt_bytes(row['plain_bytes'])} ({row['plain_tensors']} tensors), "
            f"checkpointed {fmt_bytes(row['checkpointed_bytes'])} "
            f"({row['checkpointed_tensors']} tensors): {row['ratio']:.1f}x less"
        )
    title = (
        f"# Saved activations of one training forward ({config.name}, "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, fp32, "
        f"batch {args.batch_size})\n\n"
        "Bytes autograd keeps for the backward (distinct storages, parameters excluded), counted "
        "with `saved_tensors_hooks` by `benchmarks/activation_memory.py`.\n\n"
    )
    table = [
        {
            "seq_len": r["seq_len"],
            "plain": fmt_bytes(r["plain_bytes"]),
            "checkpointed": fmt_bytes(r["checkpointed_bytes"]),
            "ratio": f"{r['ratio']:.1f}x",
        }
        for r in rows
    ]
    paths = save_results(
        "activation_memory",
        torch.device("cpu"),
        {"config": config.name, "overrides": vars(args), "rows": rows},
        title + markdown_table(table),
        out_dir=args.out_dir,
        quick=args.quick,
    )
    print(f"wrote {paths['md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
