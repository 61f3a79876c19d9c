"""Where a training step of the tiny and the synthetic-task models spends its time (CPU by default).

For each model this runs training steps exactly as the Lightning module does them (forward with
the next-token loss, backward, optimizer step, learning-rate schedule, MoE router-bias update),
without Lightning's loop, on random token batches of the model's vocabulary (the cost does not
depend on the tokens), and reports two things:

1. **A torch.profiler breakdown** of ``--steps`` steps, after ``--warmup`` steps: time in the
   KDA chunked op (``kimi_linear.backends.dispatch_chunk_kda``), in the rest of the KDA layers
   (projections, short convolutions, gates, norms), in the MLA layers, in the MoE blocks
   (router, dispatch, experts, combine), in the dense MLPs, in the optimizer (step and
   zero_grad) and the rest (embedding, norms, LM head and loss, autograd bookkeeping), each for
   the forward and the backward. The forward spans are ``record_function`` ranges opened and
   closed by module hooks; the backward spans are opened by an identity autograd function on a
   block's outputs and closed by one on its inputs, so they cover exactly the autograd work
   between the two (CPU autograd runs one node at a time). The table also lists the operators
   with the most self time.
2. **Training steps/s, interleaved**: the same model (same initial weights) with
   ``torch_chunk_kda`` as it is now and, with ``--baseline REV``, as committed at git revision REV,
   at each ``--chunk-sizes`` value of ``config.kda_chunk_size``; every round runs
   ``--round-steps`` steps of each variant in turn, and the table gives the median (min-max)
   over ``--rounds`` rounds and the ratio of medians to the first variant.

Models: ``tiny`` (the ``tiny`` preset: 3 KDA + 1 MLA layer, hidden 64, 4 experts top-2 + a shared
one; batch 8 x 128 tokens, MuonClip, as configs/tiny.yaml) and the four models of
``experiments/synthetic_tasks.py`` (``syn-kda``, ``syn-gdn``, ``syn-mla``, ``syn-hybrid``:
as the study builds them, hidden 64, parameter-matched dense MLPs; MQAR vocabulary, batch 32 x
``--seq-len``, AdamW, the study's defaults).

Writes ``train_profile.json`` and ``.md`` under ``benchmarks/results/<device>/`` (or
``--out-dir``).

Examples::

    python -m benchmarks.train_profile --threads 1
    python -m benchmarks.train_profile --models syn-kda,syn-hybrid --baseline HEAD --rounds 7
    python -m benchmarks.train_profile --quick --out-dir /tmp/tp     # seconds, for CI
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import common, hardware, report

NAME = "train_profile"
ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny", "syn-kda", "syn-gdn", "syn-mla", "syn-hybrid")
#: Profiled spans: label -> what it covers (for the table).
SPANS = {
    "kda_op": "KDA chunked op (dispatch_chunk_kda)",
    "kda_layer": "KDA layers (whole)",
    "mla": "MLA layers",
    "moe": "MoE blocks (router, dispatch, experts)",
    "mlp": "dense MLPs",
    "optimizer": "optimizer step + zero_grad",
}


# ------------------------------------------------------------------------------------ models
def model_setup(name: str, seq_len: int, quick: bool) -> dict[str, Any]:
    """Module arguments and batch shape of one model (see the module docstring)."""
    if name == "tiny":
        return {
            "preset": "tiny", "overrides": {"kda_backend": "torch"}, "vocab_size": None,
            "optimizer": "muonclip", "lr": 3e-3, "weight_decay": 0.1,
            "batch": (2, 64) if quick else (8, 128),
        }  # fmt: skip
    from experiments import synthetic_setup as study  # the study's own model definitions
    from kimi_linear.lightning.data import SyntheticDataModule

    vocab = SyntheticDataModule(
        task="mqar", seq_len=seq_len, task_kwargs=study.TASKS["mqar"]
    ).vocab_size
    overrides, _ = study.matched_overrides(vocab, "torch")[name.removeprefix("syn-")]
    return {
        "preset": "tiny", "overrides": overrides, "vocab_size": vocab, "optimizer": "adamw",
        "lr": 3e-3, "weight_decay": 0.0, "batch": (4, seq_len) if quick else (32, seq_len),
    }  # fmt: skip


class Trainee:
    """A model, its optimizer and schedule as the Lightning module builds them, and one batch."""

    def __init__(self, setup: dict[str, Any], device: torch.device, seed: int) -> None:
        from kimi_linear.lightning.module import KimiLinearLitModule

        torch.manual_seed(seed)
        self.module = KimiLinearLitModule(
            preset=setup["preset"], overrides=setup["overrides"], vocab_size=setup["vocab_size"],
            optimizer=setup["optimizer"], lr=setup["lr"], weight_decay=setup["weight_decay"],
            warmup_steps=10, max_steps=10_000, init_seed=seed,
        )  # fmt: skip
        self.model = self.module.model.to(device)
        opt = self.module.configure_optimizers()
        self.optimizer = opt["optimizer"]
        self.scheduler = opt["lr_scheduler"]["scheduler"]
        self.moe = [m for m in self.model.modules() if hasattr(m, "update_bias")]
        B, T = setup["batch"]
        gen = torch.Generator().manual_seed(seed + 1)
        vocab = self.model.config.vocab_size
        self.input_ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)
        self.tokens = B * T

    def clone(self) -> Trainee:
        """An independent copy (same weights, fresh optimizer state)."""
        other = copy.copy(self)
        other.module = copy.deepcopy(self.module)
        other.model = other.module.model
        opt = other.module.configure_optimizers()
        other.optimizer, other.scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
        other.moe = [m for m in other.model.modules() if hasattr(m, "update_bias")]
        return other

    def step(self) -> float:
        out = self.model(self.input_ids, labels=self.input_ids)
        out.loss.backward()
        with _span("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        for moe in self.moe:
            moe.update_bias()
        return float(out.loss.detach())


# ------------------------------------------------------------------------------- profiling
_OPEN: dict[str, list[Any]] = {}


def _enter(label: str) -> None:
    _OPEN.setdefault(label, []).append(torch.ops.profiler._record_function_enter_new(label, None))


def _exit(label: str) -> None:
    stack = _OPEN.get(label)
    if stack:
        torch.ops.profiler._record_function_exit._RecordFunction(stack.pop())


@contextmanager
def _span(label: str) -> Iterator[None]:
    _enter(label)
    try:
        yield
    finally:
        _exit(label)


class _BackwardMark(torch.autograd.Function):
    """Identity on ``x``; its backward opens (``enter=True``) or closes a profiler range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, label: str, enter: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.label, ctx.enter = label, enter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (_enter if ctx.enter else _exit)(ctx.label)
        return grad, None, None


def _first_grad_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x if x.requires_grad else None
    if isinstance(x, (tuple, list)):
        for y in x:
            t = _first_grad_tensor(y)
            if t is not None:
                return t
    return None


def _mark(x: Any, label: str, enter: bool) -> Any:
    """``x`` (a tensor or a tuple/list starting with one) with its first grad tensor marked."""
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return _BackwardMark.apply(x, label, enter)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor) and x[0].requires_grad:
        return type(x)([_BackwardMark.apply(x[0], label, enter), *x[1:]])
    return x


def instrument(model: nn.Module) -> Callable[[], None]:
    """Add the forward and backward profiler spans to ``model``'s blocks and wrap the KDA op;
    returns a function that removes them."""
    from kimi_linear.layers import kda as kda_layer
    from kimi_linear.layers.kda import KimiDeltaAttention
    from kimi_linear.layers.mla import MLAttention
    from kimi_linear.layers.moe import KimiMLP, KimiMoE

    kinds = {KimiDeltaAttention: "kda_layer", MLAttention: "mla", KimiMoE: "moe", KimiMLP: "mlp"}
    handles = []
    for module in model.modules():
        label = next((lb for cls, lb in kinds.items() if type(module) is cls), None)
        if label is None or (label == "mlp" and _inside_moe(model, module)):
            continue

        def pre(mod: nn.Module, args: tuple, label: str = label) -> tuple:
            _enter(f"{label}/fwd")
            return (_mark(args[0], f"{label}/bwd", False), *args[1:]) if args else args

        def post(mod: nn.Module, args: tuple, out: Any, label: str = label) -> Any:
            _exit(f"{label}/fwd")
            return _mark(out, f"{label}/bwd", True)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    original = kda_layer.dispatch_chunk_kda

    def dispatch_chunk_kda(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any
    ):
        q = _mark(q, "kda_op/bwd", False)
        with _span("kda_op/fwd"):
            o, state = original(q, k, v, *args, **kw)
        return _mark(o, "kda_op/bwd", True), state

    kda_layer.dispatch_chunk_kda = dispatch_chunk_kda

    def remove() -> None:
        for h in handles:
            h.remove()
        kda_layer.dispatch_chunk_kda = original

    return remove


def _inside_moe(model: nn.Module, module: nn.Module) -> bool:
    from kimi_linear.layers.moe import KimiMoE

    return any(
        module is sub for m in model.modules() if isinstance(m, KimiMoE) for sub in m.modules()
    )


def profile_steps(trainee: Trainee, steps: int, warmup: int) -> dict[str, Any]:
    """Profile ``steps`` training steps; per-step ms of every span and the top operators."""
    from torch.profiler import ProfilerActivity, profile, record_function

    remove = instrument(trainee.model)
    try:
        for _ in range(warmup):
            trainee.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("step"):
                    trainee.step()
    finally:
        remove()
    totals: dict[str, float] = {}
    ops = []
    for evt in prof.key_averages():
        if evt.key == "step" or "/" in evt.key or evt.key == "optimizer":
            totals[evt.key] = evt.cpu_time_total / 1e3 / steps
        elif evt.key.startswith(("aten::", "_")) or "Backward" in evt.key:
            ops.append((evt.key, evt.self_cpu_time_total / 1e3 / steps, evt.count // steps))
    ops.sort(key=lambda x: -x[1])
    step_ms = totals.get("step", 0.0)
    spans: dict[str, float] = {}
    for label in SPANS:
        for pas in ("fwd", "bwd"):
            key = label if label == "optimizer" else f"{label}/{pas}"
            if label == "optimizer" and pas == "bwd":
                continue
            spans[key] = totals.get(key, 0.0)
    for pas in ("fwd", "bwd"):  # the KDA layers without the op
        spans[f"kda_layer_other/{pas}"] = spans[f"kda_layer/{pas}"] - spans[f"kda_op/{pas}"]
    covered = sum(v for k, v in spans.items() if not k.startswith("kda_layer/"))  # a partition
    spans["other"] = step_ms - covered
    return {
        "step_ms": step_ms,
        "spans_ms": spans,
        "top_ops": [{"op": k, "self_ms": ms, "calls": c} for k, ms, c in ops[:15]],
    }


# ---------------------------------------------------------------------------- steps per second
@contextmanager
def kda_implementation(op: Callable[..., Any] | None) -> Iterator[None]:
    """Route the torch KDA backend through ``op`` (None: leave it as it is)."""
    from kimi_linear import backends as backend

    if op is None:
        yield
        return
    original = backend._torch_backend
    patched = backend.KDABackend("torch", op, original().recurrent)
    backend._torch_backend = lambda: patched  # type: ignore[assignment]
    try:
        yield
    finally:
        backend._torch_backend = original  # type: ignore[assignment]


def steps_per_second(
    base: Trainee,
    variants: dict[str, tuple[Callable[..., Any] | None, int]],
    rounds: int,
    round_steps: int,
) -> dict[str, dict[str, float]]:
    """Interleaved steps/s of ``variants`` (name -> (KDA op or None for today's, chunk size))."""
    trainees = {}
    for name, (_, chunk) in variants.items():
        t = base.clone()
        for mod in t.model.modules():
            if hasattr(mod, "chunk_size") and hasattr(mod, "backend"):
                mod.chunk_size = chunk
        trainees[name] = t
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds + 1):  # round 0: warm-up
        for j in range(len(names)):
            name = names[(j + r) % len(names)]
            with kda_implementation(variants[name][0]):
                t0 = time.perf_counter()
                for _ in range(round_steps):
                    trainees[name].step()
                dt = time.perf_counter() - t0
            if r > 0:
                samples[name].append(round_steps / dt)
    return {
        name: {
            "median": statistics.median(s), "min": min(s), "max": max(s), "n": len(s),
            "tokens_per_s": statistics.median(s) * base.tokens,
        }
        for name, s in samples.items()
    }  # fmt: skip


# ---------------------------------------------------------------------------------- output
def to_markdown(result: dict[str, Any]) -> str:
    cfg, env = result["config"], result["env"]
    lines = [
        "# Where a CPU training step spends its time",
        "",
        f"Device: {env['device']}, torch {env['torch']}, {cfg['threads']} thread(s); 1-min load "
        f"average {cfg['load_average_start']:.1f} at the start, {cfg['load_average_end']:.1f} at "
        f"the end. Profile: {cfg['steps']} steps after {cfg['warmup']} warm-up steps "
        "(torch.profiler, CPU time per step; spans as in the script's docstring). Random token "
        "batches; loss on every token.",
        "",
        f"Command: `{cfg['command']}`",
        "",
        "## Time per training step, by part (ms; % of the step)",
        "",
    ]
    rows = []
    for name, m in result["models"].items():
        p = m["profile"]
        row: dict[str, Any] = {"model": name, "batch": "x".join(map(str, m["batch"])),
                               "step ms": f"{p['step_ms']:.1f}"}  # fmt: skip
        for key in ("kda_op/fwd", "kda_op/bwd", "kda_layer_other/fwd", "kda_layer_other/bwd",
                    "mla/fwd", "mla/bwd", "moe/fwd", "moe/bwd", "mlp/fwd", "mlp/bwd",
                    "optimizer", "other"):  # fmt: skip
            ms = p["spans_ms"].get(key, 0.0)
            row[key] = f"{ms:.1f} ({100 * ms / p['step_ms']:.0f}%)" if p["step_ms"] else ""
        rows.append(row)
    lines.append(report.markdown_table(rows))
    lines += [
        "",
        "kda_op: `dispatch_chunk_kda` (the chunked KDA recurrence); kda_layer_other: the rest of the KDA "
        "layers; moe: router + dispatch + experts + combine; other: embedding, norms, LM head, "
        "loss, autograd bookkeeping, the schedule and the MoE bias update.",
        "",
        "## Operators with the most self CPU time (ms per step)",
        "",
    ]
    for name, m in result["models"].items():
        ops = ", ".join(f"{o['op']} {o['self_ms']:.1f}" for o in m["profile"]["top_ops"][:8])
        lines.append(f"- {name}: {ops}")
    if any("steps_per_s" in m for m in result["models"].values()):
        lines += [
            "",
            "## Training steps/s, interleaved",
            "",
            f"{cfg['rounds']} rounds of {cfg['round_steps']} steps per variant (after a warm-up "
            "round), variants in a rotating order; median (min-max) steps/s, and the ratio of "
            "medians to the first variant. `now`: torch_chunk_kda of this tree; "
            f"`{cfg['baseline']}`: as committed there; `C`: config.kda_chunk_size.",
            "",
        ]
        rows = []
        for name, m in result["models"].items():
            sps = m.get("steps_per_s")
            if not sps:
                continue
            ref = next(iter(sps.values()))["median"]
            for variant, s in sps.items():
                rows.append({
                    "model": name, "variant": variant,
                    "steps/s": f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})",
                    "tokens/s": f"{s['tokens_per_s']:.0f}", "vs first": f"{s['median'] / ref:.2f}x",
                })  # fmt: skip
        lines.append(report.markdown_table(rows))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    p.add_argument("--seq-len", type=common.positive_int, default=128,
                   help="tokens per example of the synthetic-task models (default 128)")  # fmt: skip
    p.add_argument(
        "--steps", type=common.positive_int, default=5, help="profiled steps (default 5)"
    )
    p.add_argument("--warmup", type=int, default=2, help="steps before profiling (default 2)")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also time steps/s with torch_chunk_kda as committed at git revision REV")  # fmt: skip
    p.add_argument("--chunk-sizes", type=common.size_list(1), default=None,
                   help="config.kda_chunk_size values for the steps/s comparison "
                   "(default: the model's own)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds for steps/s (default 5; 0: no steps/s comparison)")  # fmt: skip
    p.add_argument("--round-steps", type=common.positive_int, default=3,
                   help="steps per variant per round (default 3)")  # fmt: skip
    common.add_timed_run_args(
        p,
        quick_help="tiny batches, 1 profiled step, 1 round (seconds; for CI)",
        seed_help="seed of the initial weights and the batch (default 0)",
    )
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown or 'empty list'}; choose from {','.join(MODELS)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.rounds < 0:
        p.error(f"--rounds must be >= 0, got {args.rounds}")
    if args.quick:
        args.steps, args.warmup, args.rounds, args.round_steps = 1, 1, min(args.rounds, 1), 1
        args.seq_len = min(args.seq_len, 32)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = hardware.resolve_device(args.device)
    dtype = common.parse_dtype(args.dtype) if args.dtype else torch.float32
    threads = hardware.set_threads(args.threads)
    baseline_op = None
    if args.baseline is not None:
        from benchmarks import kda_cpu  # the benchmark's loader of a committed torch_chunk_kda

        old_op = kda_cpu.load_baseline(args.baseline)

        def baseline_op(*a: Any, cu_seqlens: torch.Tensor | None = None, **kw: Any) -> Any:
            if cu_seqlens is not None:  # older revisions had no packed sequences
                raise ValueError(f"torch_chunk_kda at {args.baseline} has no cu_seqlens")
            return old_op(*a, **kw)

    config = {
        "models": args.models, "seq_len": args.seq_len, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "round_steps": args.round_steps,
        "baseline": args.baseline, "chunk_sizes": args.chunk_sizes, "threads": threads,
        "dtype": str(dtype), "quick": args.quick, "load_average_start": os.getloadavg()[0],
        "command": report.command_line(__spec__.name, argv),
    }  # fmt: skip
    print(f"training-step profile: {config}", flush=True)
    models: dict[str, Any] = {}
    for name in report.progress(args.models, "models", enabled=not args.no_progress):
        setup = model_setup(name, args.seq_len, args.quick)
        trainee = Trainee(setup, device, args.seed)
        if dtype != torch.float32:
            trainee.model.to(dtype)
        entry: dict[str, Any] = {
            "batch": list(setup["batch"]), "optimizer": setup["optimizer"],
            "parameters": trainee.model.num_parameters(),
            "kda_chunk_size": trainee.model.config.kda_chunk_size,
        }  # fmt: skip
        entry["profile"] = profile_steps(trainee.clone(), args.steps, args.warmup)
        print(f"  {name}: {entry['profile']['step_ms']:.1f} ms/step (profiled)", flush=True)
        if args.rounds and any(isinstance(m, _layer_types()) for m in trainee.model.modules()):
            sizes = args.chunk_sizes or [trainee.model.config.kda_chunk_size]
            variants: dict[str, tuple[Callable[..., Any] | None, int]] = {}
            for C in sizes:
                if baseline_op is not None:
                    variants[f"{args.baseline} C={C}"] = (baseline_op, C)
                variants[f"now C={C}"] = (None, C)
            entry["steps_per_s"] = steps_per_second(
                trainee, variants, args.rounds, args.round_steps
            )
            for variant, s in entry["steps_per_s"].items():
                print(f"    {variant:<16} {s['median']:.2f} steps/s", flush=True)
        models[name] = entry
    config["load_average_end"] = os.getloadavg()[0]
    result = {"config": config, "env": hardware.env_info(device), "models": models}
    md = to_markdown(result)
    print()
    print(md)
    paths = report.save_results(
        NAME,
        device,
        {"args": vars(args), "config": config, "models": models},
        md,
        None,
        args.out_dir,
        quick=args.quick,
    )
    print("saved: " + ", ".join(str(p) for p in paths.values()))
    return result


def _layer_types() -> tuple[type, ...]:
    from kimi_linear.layers.kda import KimiDeltaAttention

    return (KimiDeltaAttention,)


if __name__ == "__main__":
    main()
