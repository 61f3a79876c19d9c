"""Tokens/s the prepared-data loader delivers, beside the tiny model's training tokens/s.

The question: can :class:`~kimi_linear.lightning.data.TokenDataModule` keep a training step fed?
On one dataset prepared by ``kimi-linear prepare`` (by default CPython's bundled help text,
byte tokenizer, or ``--train-bpe VOCAB`` for a byte-level BPE), in interleaved rounds
(:func:`timing.bench_interleaved`, so machine drift hits every entry alike), this times:

* ``loader/<pack>/w<N>``: pulling ``--batches`` batches of ``[B, T]`` windows from the training
  DataLoader (shuffled windows, ``pack="reset"`` with ``cu_seqlens`` or ``"window"``), with
  ``N`` DataLoader worker processes (the iterator is kept across rounds, so worker start-up is
  not counted);
* ``train_step``: one optimizer step of the model (forward + backward + MuonClip step) on a
  batch of the same shape, packed with ``cu_seqlens`` as training does.

and reports tokens/s (``B * T`` per batch) as min / median / max over the samples, and the ratio
of each loader's median to the training step's median.  Writes ``loader.json``, ``.md`` and
``.png`` under ``benchmarks/results/cpu/`` (or ``--out-dir``).

Examples::

    python -m benchmarks.loader                 # tiny preset, B=8, T=128 (about a minute)
    python -m benchmarks.loader --train-bpe 1024 --seq-len 512
    python -m benchmarks.loader --quick --out-dir /tmp/loader
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, hardware, report, timing
from kimi_linear.config import KimiLinearConfig
from kimi_linear.lightning.data import TokenDataModule, prepare
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.optim import build_optimizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__.split("\n\n")[0],
        formatter_class=common.HelpFormatter,
    )
    p.add_argument("--data", default=None, help="a prepared dataset (default: prepare one)")
    p.add_argument("--input", default="pydoc_data.topics", help="what to prepare without --data")
    p.add_argument("--train-bpe", type=common.positive_int, default=None, metavar="VOCAB",
                   help="prepare with a byte-level BPE of this size (default: byte tokenizer)")  # fmt: skip
    p.add_argument("--preset", default="tiny", help="model preset for the training step")
    p.add_argument("--seq-len", type=common.positive_int, default=128)
    p.add_argument("--batch-size", type=common.positive_int, default=8)
    p.add_argument("--batches", type=common.positive_int, default=20,
                   help="batches pulled per loader sample")  # fmt: skip
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts, comma-separated")
    p.add_argument("--rounds", type=common.positive_int, default=5)
    p.add_argument("--threads", type=common.positive_int, default=1,
                   help="intra-op CPU threads of the training step")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out-dir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        common.fail(f"--workers must be comma-separated ints, got {args.workers!r}")
    if not workers or min(workers) < 0:
        common.fail(f"--workers must be ints >= 0, got {args.workers!r}")
    if args.quick:  # tiny sizes, except those given explicitly
        explicit = common.explicit_dests(parser, argv)
        common.apply_quick(args, explicit, seq_len=64, batch_size=4, batches=5, rounds=2)
        workers = workers if "workers" in explicit else [0]
    threads = hardware.set_threads(args.threads)
    device = torch.device("cpu")
    tmp = tempfile.TemporaryDirectory()
    data = args.data
    summary_prep: dict[str, Any] = {}
    if data is None:
        data = str(Path(tmp.name) / "data")
        summary_prep = prepare([args.input], data, train_bpe_vocab=args.train_bpe,
                               val_fraction=0.05, num_workers=1, progress=False)  # fmt: skip
    T, B = args.seq_len, args.batch_size

    loaders: dict[str, Any] = {}
    for pack in ("reset", "window"):
        for w in workers:
            dm = TokenDataModule(data, seq_len=T, batch_size=B, pack=pack, seed=0, num_workers=w)
            dm.setup("fit")
            loaders[f"loader/{pack}/w{w}"] = dm.train_dataloader()
    vocab = dm.vocab_size
    iters: dict[str, Any] = {}

    def pull(name: str) -> Any:
        def run() -> None:
            for _ in range(args.batches):
                try:
                    next(iters[name])
                except (KeyError, StopIteration):
                    iters[name] = iter(loaders[name])
                    next(iters[name])

        return run

    torch.manual_seed(0)
    config = KimiLinearConfig.from_preset(args.preset, vocab_size=vocab, kda_backend="torch")
    model = KimiLinearForCausalLM(config)
    opt = build_optimizer(model, "muonclip", lr=1e-3)
    sample = next(iter(loaders[f"loader/reset/w{workers[0]}"]))
    ids, labels, cu = sample["input_ids"], sample["labels"], sample["cu_seqlens"]

    def train_step() -> None:
        out = model(ids.reshape(1, B * T), labels=labels.reshape(1, B * T), cu_seqlens=cu)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {name: pull(name) for name in loaders}
    fns["train_step"] = train_step
    times = timing.bench_interleaved(fns, device, rounds=args.rounds, cpu_reps=2)

    rows = []
    step = times["train_step"]
    step_tps = B * T / step["median"]
    for name, t in times.items():
        tokens = B * T * (1 if name == "train_step" else args.batches)
        tps = {k: tokens / t[k] for k in ("min", "median", "max")}
        rows.append(
            {
                "entry": name,
                "tokens/s (median)": round(tps["median"]),
                "tokens/s (min)": round(tokens / t["max"]),
                "tokens/s (max)": round(tokens / t["min"]),
                "x train step": round(tps["median"] / step_tps, 1),
                "samples": t["n"],
            }
        )
    title = (
        f"# Loader vs training tokens/s (CPU, {args.preset}, B={B}, T={T}, vocab {vocab}, "
        f"{threads} thread(s))\n\n"
    )
    md = (
        title
        + report.markdown_table(rows)
        + "\n`x train step`: the entry's median tokens/s over the training step's median "
        "(interleaved rounds; min/median/max over samples).  `loader/<pack>/w<N>`: batches "
        "pulled from TokenDataModule's training DataLoader with N worker processes.\n"
    )
    payload = {
        "args": vars(args),
        "config": {"preset": args.preset, "vocab_size": vocab, "seq_len": T, "batch_size": B},
        "prepare": summary_prep,
        "rows": rows,
        "times_s": times,
        "summary": {
            "train_tokens_per_s": round(step_tps),
            "slowest_loader_over_train": min(
                r["x train step"] for r in rows if r["entry"] != "train_step"
            ),
        },
    }

    def plot(fig: Any) -> None:
        ax = fig.add_subplot(111)
        names = [r["entry"] for r in rows]
        med = [r["tokens/s (median)"] for r in rows]
        lo = [r["tokens/s (median)"] - r["tokens/s (min)"] for r in rows]
        hi = [r["tokens/s (max)"] - r["tokens/s (median)"] for r in rows]
        ax.barh(
            names, med, xerr=[lo, hi], color=["C0" if n != "train_step" else "C3" for n in names]
        )
        ax.set_xscale("log")
        ax.set_xlabel("tokens/s (median; bars: min..max)")
        ax.set_title(f"loader vs training step ({args.preset}, B={B}, T={T})")

    paths = report.save_results("loader", device, payload, md, plot, args.out_dir, args.quick)
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    for name in loaders:  # shut worker processes down before the temporary folder goes
        iters.pop(name, None)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
