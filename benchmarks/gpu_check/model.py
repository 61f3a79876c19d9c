"""Part 3, model (and extra): decode of the 48B layout and its all-MLA twin against the bytes
floor; on request chunked prefill, a packed-batch speed item and bf16 training steps."""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks import common, decode, hardware, prefill, timing, workload
from benchmarks.gpu_check.kda import DTYPE_NAMES
from benchmarks.gpu_check.run import Item, ItemContext, Run, free_memory
from benchmarks.gpu_check.speed import speed_varlen


def model_items(run: Run) -> list[Item]:
    """Decode of the 48B layout and its all-MLA twin at long contexts, against the bytes floor."""
    s = run.sizes
    label = s.bench_preset + (f" --experts {s.bench_experts}" if s.bench_experts else "")
    return [
        Item(f"decode {name} ({label})", "decode_model", _decode_item(name))
        for name in ("hybrid", "all_mla")
    ]


def extra_items(run: Run) -> list[Item]:
    """On request (``--parts extra``): a packed batch of short sequences, chunked prefill of both
    models, and bf16 training steps with each backend."""
    s = run.sizes
    label = s.bench_preset + (f" --experts {s.bench_experts}" if s.bench_experts else "")
    n, lo, hi, H = s.speed_varlen
    items = [
        Item(
            f"chunk_kda bf16 varlen: {n} sequences of {lo}-{hi} tokens, H={H}",
            "speed_varlen",
            speed_varlen,
        )
    ]
    for name in ("hybrid", "all_mla"):
        items.append(Item(f"prefill {name} ({label})", "prefill_model", _prefill_item(name)))
    for backend in s.train_backends:
        items.append(
            Item(f"train {s.train_preset} bf16, backend {backend}", "train", _train_item(backend))
        )
    return items


def _bench_config(run: Run, name: str) -> Any:
    args = SimpleNamespace(
        preset=run.sizes.bench_preset,
        layers=None,
        experts=run.sizes.bench_experts,
        hidden_size=None,
        vocab_size=None,
    )
    cfg = workload.config_from_args(args)
    return cfg if name == "hybrid" else cfg.all_mla_twin()


def _model_dtype(run: Run) -> torch.dtype:
    return torch.float32 if run.dry_run else torch.bfloat16


def _resolved_backend(cfg: Any, device: torch.device) -> str:
    """Which KDA backend ``cfg.kda_backend`` runs on ``device`` (for the record)."""
    for module in ("kimi_linear.backends", "kimi_linear.layers.kda"):
        try:
            mod = importlib.import_module(module)
            fn = getattr(mod, "resolve_kda_backend", None)
            if fn is not None:
                return f"{cfg.kda_backend} -> {fn(cfg.kda_backend, device)}"
        except Exception:  # the record is informative only
            continue
    return cfg.kda_backend


def _decode_item(name: str) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.model import KimiLinearForCausalLM, cast_model_

        run, dev = ctx.run, ctx.run.device
        s = run.sizes
        cfg = _bench_config(run, name)
        dtype = _model_dtype(run)
        nbytes = torch.empty((), dtype=dtype).element_size()
        with torch.device("meta"):
            meta = cast_model_(KimiLinearForCausalLM(cfg), dtype)
        bw, bw_source = timing.bandwidth(dev, nbytes=1 << 22 if run.dry_run else 1 << 28)
        ctx.record.update(
            model=name,
            config=f"{cfg.name}: {len(cfg.kda_layers)} KDA + {len(cfg.mla_layers)} MLA layers, "
            f"{cfg.num_experts} routed experts (top {cfg.num_experts_per_token})",
            dtype=DTYPE_NAMES[dtype],
            kda_backend=_resolved_backend(cfg, dev),
            bandwidth_GBps=bw / 1e9,
            bandwidth_source=bw_source,
            steps_per_rep=s.decode_steps,
            reps=s.decode_reps,
        )
        model = workload.build_model(cfg, dtype, dev, run.seed)
        opts = SimpleNamespace(steps=s.decode_steps, warmup=1, reps=s.decode_reps, seed=run.seed)
        for ctx_len in s.decode_contexts:
            per_seq = decode.cache_bytes(
                cfg, ctx_len + s.decode_steps, 1, nbytes
            ) + decode.working_bytes(cfg, ctx_len, 1, nbytes)
            free = hardware.available_memory(dev)
            largest = min(int((0.85 * free - (64 << 20)) // per_seq), s.max_batch)
            for batch in dict.fromkeys((1, max(largest, 1))):
                row: dict[str, Any] = {"context": ctx_len, "batch": batch}
                if largest < 1:
                    row["status"] = (
                        f"skipped: one sequence needs about {common.fmt_bytes(per_seq)}, "
                        f"{common.fmt_bytes(free)} is free"
                    )
                    ctx.add_row(row)
                    continue
                reason = ctx.time_left(0 if run.dry_run else 15)
                if reason:
                    row["status"] = reason
                    ctx.add_row(row)
                    continue
                try:
                    t = decode.time_decode(model, ctx_len, batch, opts, dtype, dev)
                except torch.OutOfMemoryError as e:
                    row["status"] = f"out of memory: {str(e).splitlines()[0][:160]}"
                    ctx.add_row(row)
                    free_memory(dev)
                    continue
                free_memory(dev)
                w = workload.active_weight_bytes(meta, batch)["total"]
                c = workload.cache_read_bytes(cfg, ctx_len, batch, nbytes)
                floor = (w + c) / bw
                row.update(
                    status="ok",
                    figure="batch 1" if batch == 1 else "largest batch",
                    tpot_ms=t["median"] * 1e3,
                    tpot_min_ms=t["min"] * 1e3,
                    tpot_max_ms=t["max"] * 1e3,
                    tokens_per_s=batch / t["median"],
                    step_bytes=w + c,
                    floor_ms=floor * 1e3,
                    measured_over_floor=t["median"] / floor,
                )
                ctx.add_row(row)
        rows = [r for r in ctx.record.get("rows", []) if r.get("status") == "ok"]
        ctx.record["summary"] = "; ".join(
            f"{common.fmt_tokens(r['context'])} B={r['batch']}: {r['tpot_ms']:.3g} ms/token "
            f"({r['measured_over_floor']:.1f}x floor)"
            for r in rows
        )

    return item


def _prefill_item(name: str) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        run, dev = ctx.run, ctx.run.device
        s = run.sizes
        cfg = _bench_config(run, name)
        dtype = _model_dtype(run)
        nbytes = torch.empty((), dtype=dtype).element_size()
        ctx.record.update(
            model=name,
            dtype=DTYPE_NAMES[dtype],
            chunk=s.prefill_chunk,
            batch=1,
            kda_backend=_resolved_backend(cfg, dev),
        )
        model = workload.build_model(cfg, dtype, dev, run.seed)
        gen = torch.Generator(device="cpu").manual_seed(run.seed)
        prompt = torch.randint(0, cfg.vocab_size, (1, max(s.prefill_lengths)), generator=gen).to(
            dev
        )
        with torch.inference_mode():
            prefill.prefill(model, prompt[:, : s.prefill_chunk], s.prefill_chunk, dtype)  # warm-up
            for L in sorted(s.prefill_lengths):
                row: dict[str, Any] = {"length": L}
                # prefill.working_bytes counts fp32 [B, H, chunk, L] scores in case attention
                # falls back to unfused math; SDPA's fused kernels on CUDA never form them, so
                # the check leaves them out there and an out-of-memory is recorded instead.
                scores = cfg.num_attention_heads * min(s.prefill_chunk, L) * L * 4 * 2
                need = (
                    cfg.kv_cache_bytes(L, 1, cache_dtype_bytes=nbytes)["total"]
                    + prefill.working_bytes(cfg, L, s.prefill_chunk, 1, nbytes)
                    - (scores if dev.type == "cuda" and cfg.mla_layers else 0)
                )
                free = hardware.available_memory(dev)
                reason = ctx.time_left(0 if run.dry_run else 10)
                if need > 0.85 * free:
                    reason = (
                        f"skipped: needs about {common.fmt_bytes(need)}, "
                        f"{common.fmt_bytes(free)} free"
                    )
                if reason:
                    row["status"] = reason
                    ctx.add_row(row)
                    continue
                ids = prompt[:, :L]
                try:
                    t = timing.timeit(
                        lambda ids=ids: prefill.prefill(model, ids, s.prefill_chunk, dtype),
                        dev,
                        warmup=0,
                        reps=1 if run.dry_run else 2,
                    )
                except torch.OutOfMemoryError as e:
                    row["status"] = f"out of memory: {str(e).splitlines()[0][:160]}"
                    ctx.add_row(row)
                    free_memory(dev)
                    continue
                row.update(
                    status="ok",
                    seconds=t["median"],
                    seconds_min=t["min"],
                    seconds_max=t["max"],
                    tokens_per_s=L / t["median"],
                )
                ctx.add_row(row)
                free_memory(dev)
        rows = [r for r in ctx.record.get("rows", []) if r.get("status") == "ok"]
        ctx.record["summary"] = ", ".join(
            f"{common.fmt_tokens(r['length'])}: {r['tokens_per_s']:.3g} tokens/s" for r in rows
        )

    return item


def _train_item(backend: str) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.config import KimiLinearConfig
        from kimi_linear.model import KimiLinearForCausalLM
        from kimi_linear.optim import build_optimizer

        run, dev = ctx.run, ctx.run.device
        s = run.sizes
        B, T = s.train_batch
        cfg = KimiLinearConfig.from_preset(s.train_preset, kda_backend=backend)
        torch.manual_seed(run.seed)
        with torch.device(dev):
            model = KimiLinearForCausalLM(cfg)
        opt = build_optimizer(model, "adamw", lr=1e-3)
        gen = torch.Generator(device="cpu").manual_seed(run.seed)
        batches = [
            torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(dev) for _ in range(2)
        ]
        losses: list[float] = []

        def step(ids: torch.Tensor) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        step(batches[0])  # warm-up: kernel compilation, allocator
        hardware.synchronize(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for i in range(s.train_steps):
            step(batches[i % 2])
        hardware.synchronize(dev)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        loss_values = [float(x) for x in losses]
        if not all(math.isfinite(x) for x in loss_values):
            raise RuntimeError(f"non-finite training loss: {loss_values}")
        ctx.record.update(
            preset=s.train_preset,
            kda_backend=backend,
            precision="bf16 autocast, fp32 weights (bf16-mixed)",
            optimizer="AdamW",
            batch=[B, T],
            timed_steps=s.train_steps,
            seconds=seconds,
            tokens_per_s=B * T * s.train_steps / seconds,
            step_ms=seconds / s.train_steps * 1e3,
            peak_memory_bytes=peak,
            losses=loss_values,
            summary=f"{B * T * s.train_steps / seconds:.3g} tokens/s"
            + (f", peak {common.fmt_bytes(peak)}" if peak is not None else ""),
        )

    return item
