"""Max-logit growth under Muon, with and without QK-Clip, on a small all-MLA model (CPU).

Trains the same small all-MLA language model twice from the same initialisation on the same
byte-level batches (text: CPython's bundled documentation, ``pydoc_data.topics``; no network):

* ``muon``: :class:`kimi_linear.optim.MuonClip` with ``qk_clip_tau=None`` (plain Muon + AdamW;
  the max logits are tracked but nothing is clipped);
* ``muonclip``: the same with ``qk_clip_tau=tau``.

The learning rate is deliberately high and tau deliberately low (the K2 recipe uses tau = 100 on
a model three orders of magnitude larger): at this scale that is what makes the attention logits
of plain Muon grow past tau within a few hundred steps.  Per step it logs the training loss and
every MLA layer's max pre-softmax logit (the max over heads of QK-Clip's statistic, measured in
the forward pass before the update), and at the end a held-out loss.

Outputs (``--out-dir``, default ``experiments/results``): ``qk_clip.json`` (config, per-step
series, summary), ``qk_clip.png`` (max logit per step with the tau line; loss) and
``qk_clip.md`` (a summary table).

Usage::

    python -m experiments.qk_clip            # default: a few minutes on 2 CPU cores
    python -m experiments.qk_clip --quick    # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kimi_linear import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.optim import MuonClip

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS = ("muon", "muonclip")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def load_corpus() -> torch.Tensor:
    """CPython's bundled documentation topics as one ``uint8`` byte tensor (sorted by topic)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def split_corpus(data: torch.Tensor, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 - held_out`` of the bytes for training, the rest for evaluation."""
    cut = int(len(data) * (1 - held_out))
    return data[:cut], data[cut:]


def sample_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``[batch_size, seq_len]`` long: random windows of ``data``."""
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()]).long()


# ----------------------------------------------------------------------------------------------
# model and training
# ----------------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace) -> KimiLinearConfig:
    """All-MLA, dense FFN, byte vocabulary; MLA as released (NoPE, no q LoRA)."""
    return KimiLinearConfig(
        name="qk-clip-study",
        vocab_size=256,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        layer_types=("mla",) * args.layers,
        num_attention_heads=args.heads,
        kv_lora_rank=args.hidden // 2,
        qk_nope_head_dim=args.head_dim,
        qk_rope_head_dim=args.head_dim // 2,
        v_head_dim=args.head_dim,
        intermediate_size=4 * args.hidden,
        num_experts=0,
        max_position_embeddings=max(args.seq_len, 256),
    )


@torch.no_grad()
def evaluate(model: KimiLinearForCausalLM, batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [float(model(ids, labels=ids).loss) for ids in batches]
    model.train()
    return sum(losses) / len(losses)


def train_run(
    name: str,
    args: argparse.Namespace,
    cfg: KimiLinearConfig,
    train: torch.Tensor,
    eval_batches: list[torch.Tensor],
) -> dict[str, Any]:
    """One training run; returns its per-step series and end-of-run numbers."""
    torch.manual_seed(args.seed)
    model = KimiLinearForCausalLM(cfg)
    tau = args.tau if name == "muonclip" else None
    opt = MuonClip(
        model, lr=args.lr, weight_decay=args.weight_decay, qk_clip_tau=tau, track_max_logits=True
    )
    layer_names = list(opt.mla_modules)
    short = {n: f"layer{n.split('.')[2]}" for n in layer_names}
    data_gen = torch.Generator().manual_seed(args.seed + 1)

    loss_hist: list[float] = []
    max_hist: dict[str, list[float]] = {short[n]: [] for n in layer_names}
    clipped_heads: list[int] = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids = sample_batch(train, args.batch_size, args.seq_len, data_gen)
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_hist.append(loss.item())
        for n in layer_names:
            max_hist[short[n]].append(float(opt.last_max_logits[n].max()))
        clipped_heads.append(int(sum(int((g < 1).sum()) for g in opt.last_clip_gamma.values())))
        if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            peak = max(v[-1] for v in max_hist.values())
            print(
                f"[{name:8s}] step {step:4d}  loss {loss_hist[-1]:.3f}  max logit {peak:8.2f}  "
                f"clipped heads {clipped_heads[-1]}",
                flush=True,
            )
        if not math.isfinite(loss_hist[-1]):
            print(f"[{name}] loss is not finite at step {step}; stopping this run")
            break
    seconds = time.perf_counter() - t0
    peak_series = [max(v[i] for v in max_hist.values()) for i in range(len(loss_hist))]
    first_over = next((i for i, s in enumerate(peak_series) if s > args.tau), None)
    last = max(1, len(loss_hist) // 10)
    return {
        "loss": loss_hist,
        "max_logit": max_hist,
        "clipped_heads": clipped_heads,
        "summary": {
            "peak_max_logit": max(peak_series),
            "final_max_logit": peak_series[-1],
            "first_step_over_tau": first_over,
            "steps_with_clipping": sum(1 for c in clipped_heads if c > 0),
            "train_loss_last_10pct": sum(loss_hist[-last:]) / last,
            "eval_loss": evaluate(model, eval_batches),
            "seconds": seconds,
        },
    }


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def save_figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = result["config"]["tau"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {"muon": "tab:red", "muonclip": "tab:blue"}
    for run, data in result["runs"].items():
        for i, (layer, series) in enumerate(data["max_logit"].items()):
            ax1.plot(
                series,
                color=colors[run],
                alpha=0.35 + 0.65 * (i + 1) / len(data["max_logit"]),
                lw=1,
                label=f"{run} {layer}",
            )
        ax2.plot(data["loss"], color=colors[run], lw=1, label=run)
    ax1.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("max pre-softmax logit (over heads)")
    ax1.set_title("Per-layer max attention logit")
    ax1.legend(fontsize=7, ncol=2)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (nats / byte)")
    ax2.set_title("Training loss")
    ax2.legend()
    fig.suptitle(f"Muon vs MuonClip, all-MLA byte LM, lr {result['config']['lr']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(result: dict[str, Any], path: Path) -> None:
    c = result["config"]
    lines = [
        "# QK-Clip study: max attention logits under Muon, with and without QK-Clip",
        "",
        f"All-MLA byte-level LM ({c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads x "
        f"{c['head_dim']} nope + {c['head_dim'] // 2} rope, NoPE, {c['parameters']:,} parameters), "
        f"trained on CPython's `pydoc_data.topics` text, batch {c['batch_size']} x {c['seq_len']} "
        f"bytes, {c['steps']} steps, lr {c['lr']:g} (constant), weight decay {c['weight_decay']:g}, "
        f"seed {c['seed']}. Both runs share the initialisation and the batches. "
        f"tau = {c['tau']:g} (chosen low for this scale; K2 uses 100).",
        "",
        "| run | peak max logit | final max logit | first step over tau | steps with clipping | "
        "train loss (last 10%) | held-out loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run, data in result["runs"].items():
        s = data["summary"]
        first = "-" if s["first_step_over_tau"] is None else str(s["first_step_over_tau"])
        lines.append(
            f"| {run} | {s['peak_max_logit']:.1f} | {s['final_max_logit']:.1f} | {first} | "
            f"{s['steps_with_clipping']} | {s['train_loss_last_10pct']:.3f} | {s['eval_loss']:.3f} |"
        )
    muon, clip = (result["runs"][r]["summary"] for r in RUNS)
    lines += [
        "",
        f"Observed: without QK-Clip the largest logit reached {muon['peak_max_logit']:.1f} "
        f"({muon['peak_max_logit'] / c['tau']:.1f}x tau); with QK-Clip it never exceeded "
        f"{clip['peak_max_logit']:.1f} ({clip['steps_with_clipping']} of {c['steps']} steps clipped "
        f"at least one head). Held-out loss {muon['eval_loss']:.3f} (Muon) vs "
        f"{clip['eval_loss']:.3f} (MuonClip); one seed, so differences of this size are not "
        "significant.",
        "",
        "The max logit of a step is measured in that step's forward pass, before the update; with "
        "QK-Clip, a head over tau is rescaled right after the update, so the next step's value is "
        "back near tau (plus what one update adds).",
        "",
        f"Machine: {c['machine']}, torch {c['torch']}. Figure: `qk_clip.png`; data: `qk_clip.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--tau", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="output folder (default experiments/results, quick: experiments/results/quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a seconds-long smoke run (tiny model, 12 steps)"
    )
    args = p.parse_args(argv)
    if args.out_dir is None:  # a smoke run never overwrites the published results
        args.out_dir = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    if args.quick:
        args.steps, args.layers, args.hidden, args.heads, args.head_dim = 12, 2, 32, 2, 8
        args.batch_size, args.seq_len, args.eval_batches, args.log_every = 4, 32, 2, 0
        args.tau = 0.1
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "layers",
        "hidden",
        "heads",
        "head_dim",
        "eval_batches",
    ):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.head_dim % 4:
        p.error(
            "--head-dim must be a multiple of 4 (the rope part is head_dim / 2, which must be even)"
        )
    if not args.tau > 0 or not args.lr > 0:
        p.error("--tau and --lr must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = build_config(args)
    train, held_out = split_corpus(load_corpus())
    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    eval_batches = [
        sample_batch(held_out, args.batch_size, args.seq_len, eval_gen)
        for _ in range(args.eval_batches)
    ]
    n_params = KimiLinearForCausalLM(cfg).num_parameters()
    result: dict[str, Any] = {
        "config": {
            "steps": args.steps,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "tau": args.tau,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "layers": args.layers,
            "hidden": args.hidden,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "seed": args.seed,
            "parameters": n_params,
            "quick": args.quick,
            "model": cfg.to_dict(),
            "machine": f"{platform.machine()} CPU x{torch.get_num_threads()} threads",
            "torch": torch.__version__,
        },
        "runs": {},
    }
    for name in RUNS:
        result["runs"][name] = train_run(name, args, cfg, train, eval_batches)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "qk_clip.json").write_text(json.dumps(result, indent=1))
    save_figure(result, args.out_dir / "qk_clip.png")
    write_markdown(result, args.out_dir / "qk_clip.md")
    print((args.out_dir / "qk_clip.md").read_text())
    return result


if __name__ == "__main__":
    main()
