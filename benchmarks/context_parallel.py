"""Context parallelism: activation memory and tokens/s per rank at CP 1, 2, 4.

For each CP degree the script starts that many processes (gloo on CPU, NCCL with ``--device
cuda``), builds the same model on each, and trains on one packed row of ``T`` tokens (documents
of random lengths crossing the shard borders), each rank holding ``T / CP`` of it
(:mod:`kimi_linear.context_parallel`). Per rank it records

* the activation bytes autograd saves for the backward (``saved_tensors_hooks``: distinct
  storages, parameters excluded; the part that falls as ``1 / CP``), and the peak CUDA memory
  on a GPU;
* the forward + backward time (median of ``--repeats`` after a warm-up) and the tokens per
  second per rank, ``(T / CP) / time``.

On a CPU shared by the ranks the times show the algorithm's overhead, not a speed-up (all ranks
share the same cores). Writes ``context_parallel.json`` / ``.md`` / ``.png`` under
``benchmarks/results/<device>/`` (refusing to replace committed results unless ``--overwrite``;
``--out-dir DIR`` writes elsewhere; ``--quick`` is a smoke run into the git-ignored ``quick/``).

    python -m benchmarks.context_parallel --quick
    python -m benchmarks.context_parallel --seq-lens 2048 4096 8192 --cp 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import fmt_bytes, positive_int
from benchmarks.hardware import resolve_device
from benchmarks.report import markdown_table, refuse_overwrite, save_results

NAME = "context_parallel"


def _documents(T: int, gen: torch.Generator) -> torch.Tensor:
    """Offsets of documents of random lengths (mean T / 4) packed in T tokens."""
    offsets, pos = [0], 0
    while pos < T:
        pos = min(T, pos + int(torch.randint(1, max(2, T // 2), (1,), generator=gen)))
        offsets.append(pos)
    return torch.tensor(offsets, dtype=torch.int32)


def _rank(rank: int, size: int, port: int, args: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
    from kimi_linear.context_parallel import context_parallel_loss, shard_batch

    torch.set_num_threads(args["threads"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    cfg = KimiLinearConfig.from_preset(
        args["preset"], max_position_embeddings=max(args["seq_lens"])
    )
    model = KimiLinearForCausalLM(cfg).to(device)
    model.reset_parameters(seed=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = []
    for T in args["seq_lens"]:
        gen = torch.Generator().manual_seed(T)
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=gen).to(device)
        batch = shard_batch(ids, ids, _documents(T, gen).to(device))
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        times = []
        for i in range(args["repeats"] + 1):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                torch.cuda.synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            if i == 0:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss, _ = context_parallel_loss(model, batch)
            else:
                loss, _ = context_parallel_loss(model, batch)
            loss.backward()
            if cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if i > 0:
                times.append(dt)
        step = statistics.median(times)
        rows.append(
            {
                "cp": size,
                "seq_len": T,
                "rank": rank,
                "tokens_per_rank": batch.input_ids.shape[1],
                "activation_bytes": sum(seen.values()),
                "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                "step_s": step,
                "tokens_per_s_per_rank": batch.input_ids.shape[1] / step,
            }
        )
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out).write_text(json.dumps([r for part in gathered for r in part]))
    dist.destroy_process_group()


def run_cp(size: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_rank_entry, args=(size, port, args, out), nprocs=size)
        return json.loads(Path(out).read_text())


def _rank_entry(rank: int, size: int, port: int, args: dict[str, Any], out: str) -> None:
    _rank(rank, size, port, args, out)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cp, T): the largest activation bytes and the slowest rank."""
    table = []
    for cp, T in sorted({(r["cp"], r["seq_len"]) for r in rows}, key=lambda x: (x[1], x[0])):
        rs = [r for r in rows if r["cp"] == cp and r["seq_len"] == T]
        base = [r for r in rows if r["cp"] == 1 and r["seq_len"] == T]
        act = max(r["activation_bytes"] for r in rs)
        row = {
            "T": T,
            "cp": cp,
            "tokens/rank": max(r["tokens_per_rank"] for r in rs),
            "activations/rank": fmt_bytes(act),
            "vs cp 1": f"{act / base[0]['activation_bytes']:.2f}" if base else "-",
            "step s": f"{max(r['step_s'] for r in rs):.3f}",
            "tokens/s/rank": f"{min(r['tokens_per_s_per_rank'] for r in rs):.0f}",
        }
        peaks = [r["peak_cuda_bytes"] for r in rs if r["peak_cuda_bytes"] is not None]
        if peaks:
            row["peak CUDA/rank"] = fmt_bytes(max(peaks))
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--cp", type=positive_int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="T 256, 512 at CP 1, 2")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--overwrite", action="store_true")
    ns = parser.parse_args(argv)
    device = resolve_device(ns.device)
    refuse_overwrite(NAME, device, ns.out_dir, ns.quick, ns.overwrite)
    if ns.quick:
        ns.seq_lens, ns.cp, ns.repeats = [256, 512], [1, 2], 1
    for T in ns.seq_lens:
        if T < max(ns.cp):
            parser.error(f"--seq-lens {T} is shorter than the CP degree {max(ns.cp)}")
    args = dict(
        preset=ns.preset,
        seq_lens=ns.seq_lens,
        repeats=ns.repeats,
        threads=ns.threads,
        device=ns.device,
    )
    rows: list[dict[str, Any]] = []
    for cp in ns.cp:
        print(f"CP {cp}: {cp} process(es), T = {ns.seq_lens}", flush=True)
        rows.extend(run_cp(cp, args))
    table = summarise(rows)
    md = (
        f"# Context parallelism: memory and speed per rank ({ns.preset}, {device.type})\n\n"
        "One packed row of T tokens (random documents crossing the shard borders), training "
        "forward + backward, each CP rank holding T / CP tokens. `activations/rank`: bytes "
        "autograd saves for the backward (largest rank); `vs cp 1`: that over CP 1 at the same "
        "T (ideal: 1 / CP); times: slowest rank, median of "
        f"{ns.repeats}. On a CPU all ranks share the cores ({os.cpu_count()} here, "
        f"{ns.threads} thread(s) per rank): the times show CP's overhead, not a speed-up.\n\n"
        f"Command: `python -m benchmarks.context_parallel {' '.join(argv or sys.argv[1:])}`\n\n"
        + markdown_table(table)
        + "\n"
    )

    def plot(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for cp in ns.cp:
            rs = [r for r in table if r["cp"] == cp]
            acts = [
                max(x["activation_bytes"] for x in rows if x["cp"] == cp and x["seq_len"] == r["T"])
                / 2**20
                for r in rs
            ]
            ax1.plot([r["T"] for r in rs], acts, marker="o", label=f"CP {cp}")
            ax2.plot(
                [r["T"] for r in rs],
                [float(r["tokens/s/rank"]) for r in rs],
                marker="o",
                label=f"CP {cp}",
            )
        ax1.set(xlabel="T (tokens per row)", ylabel="saved activations per rank (MiB)")
        ax2.set(xlabel="T (tokens per row)", ylabel="tokens/s per rank")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.legend()
        ax1.set_yscale("log", base=2)

    paths = save_results(
        NAME,
        device,
        {"args": args, "rows": rows, "table": table},
        md,
        plot=plot,
        out_dir=ns.out_dir,
        quick=ns.quick,
    )
    print(md)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
