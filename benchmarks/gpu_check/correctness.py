"""Part 1, correctness: every kernel path against the float64 reference (fla's error beside it on
a miss), and the model's triton backend against its torch backend."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu_check.kda import (
    DTYPE_NAMES,
    fla_ops,
    forward_only,
    fwd_bwd,
    kda_inputs,
    shape_str,
    try_fla,
)
from benchmarks.gpu_check.run import Item, ItemContext, Run
from benchmarks.gpu_check.sizes import FLA_SLACK, TOLERANCE
from benchmarks.gpu_check.splitting import dense_offsets, describe_path
from kimi_linear.ops import naive_recurrent_kda, torch_chunk_kda
from kimi_linear.testing import KDA_NAMES, KDA_RTOL, per_sequence, rel_error

#: The model check (fp32): relative loss difference per step, and norm-relative difference of
#: the first step's gradients (all parameters as one vector), triton vs torch backend.
MODEL_LOSS_TOL = 1e-3
MODEL_GRAD_TOL = 5e-3


def compare(
    ours: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    fla: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
) -> tuple[list[dict[str, Any]], bool]:
    """Per-tensor rows (our error and fla's against the reference, ours against fla) and
    whether every tensor passes (:data:`TOLERANCE`, :data:`FLA_SLACK`)."""
    tol = TOLERANCE[dtype]
    rows, ok = [], True
    for name in ours:
        err = rel_error(ours[name], ref[name])
        row: dict[str, Any] = {"tensor": name, "err_vs_fp64": err, "tol": tol}
        fla_err = None
        if fla is not None and name in fla:
            fla_err = rel_error(fla[name], ref[name])
            row["fla_err_vs_fp64"] = fla_err
            row["ours_vs_fla"] = rel_error(ours[name], fla[name])
        passed = math.isfinite(err) and (
            err <= tol
            or (fla_err is not None and math.isfinite(fla_err) and err <= FLA_SLACK * fla_err)
        )
        row["pass"] = passed
        ok &= passed
        rows.append(row)
    return rows, ok


def _second_opinion(
    ctx: ItemContext,
    ours: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    dtype: torch.dtype,
    runner: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor] | None:
    """fla's result for the :data:`FLA_SLACK` rule, run (inside
    :func:`~benchmarks.gpu_check.kda.try_fla`, which also contains a failing import of fla) only
    when ours misses the tolerance somewhere, or always when ``run.fla_second_opinion ==
    "always"`` (the dry run): a passing item then needs no fla kernel compiled."""
    _, ok = compare(ours, ref, None, dtype)
    if ok and ctx.run.fla_second_opinion != "always":
        ctx.record["fla_run"] = "no: every tensor within the tolerance"
        return None
    ctx.record["fla_run"] = "yes" if not ok else "yes (always)"
    return try_fla(ctx, runner)


def _fla_name(ctx: ItemContext, which: str) -> str:
    """The name of fla's function for the record (``which``: chunk or recurrent), guarded."""
    if which == "recurrent":
        return "fla fused_recurrent_kda"
    try:
        return "fla " + fla_ops(ctx.run.device).chunk_name
    except Exception as e:  # noqa: BLE001 - informative only
        return f"fla unavailable ({type(e).__name__})"


def _reference(T: int, dry_run: bool) -> tuple[Callable[..., Any], str]:
    """The float64 reference: the token-by-token recurrence for short sequences, else the
    chunked op (whose autograd keeps one state per chunk, not one per token)."""

    if dry_run or T <= 256:
        return per_sequence(naive_recurrent_kda), "naive_recurrent_kda (fp64)"
    return per_sequence(torch_chunk_kda), "torch_chunk_kda (fp64)"


def correctness_items(run: Run) -> list[Item]:
    """Every kernel path we ship, bf16 and fp32: equal-length, safe gate, packed varlen, K != V
    under strong decay, a long sequence, more than 65,535 chunks in one launch, decode (dense,
    varlen, state in place), and the model's triton backend against its torch backend."""
    s = run.sizes
    items = [Item("fp64 reference: chunked op = recurrence", "reference", _check_reference)]
    main, long = s.chunk_shapes[0], s.chunk_shapes[-1]
    bf16 = run.dtypes[0]
    dense_split, varlen_split = s.split_chunks
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        items.append(
            Item(
                f"chunk_kda {dt} {shape_str(*main)}, unsplit and split "
                f"({dense_split} chunk{'s' * (dense_split != 1)}/segment)",
                f"chunk {dt}",
                _chunk_item(main, dtype, paths=(0, dense_split)),
            )
        )
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        items.append(
            Item(
                f"chunk_kda safe gate (gate_lower_bound={s.safe_gate_bound:g}) {dt} "
                f"{shape_str(*main)}",
                f"safe gate {dt}",
                _chunk_item(
                    main, dtype, gate_low=s.safe_gate_bound, bound=s.safe_gate_bound, paths=(0,)
                ),
            )
        )
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        items.append(
            Item(
                f"chunk_kda varlen {dt}, unsplit and split "
                f"({varlen_split} chunk{'s' * (varlen_split != 1)}/segment)",
                f"varlen {dt}",
                _varlen_item(dtype, paths=(0, varlen_split)),
            )
        )
    dt = DTYPE_NAMES[bf16]
    items.append(
        Item(
            f"chunk_kda strong decay, K != V {dt} {shape_str(*s.odd_shape)}",
            f"odd {dt}",
            _chunk_item(s.odd_shape, bf16, gate_low=-20.0, paths=(0,)),
        )
    )
    if long != main:
        items.append(
            Item(
                f"chunk_kda {dt} {shape_str(*long)}, automatic split and unsplit",
                f"long {dt}",
                _chunk_item(long, bf16, paths=(None, 0)),
            )
        )
    items.append(
        Item(
            f"chunk_kda forward, {s.grid_chunks:,} chunks in one launch {dt}",
            f"grid {dt}",
            _grid_item(bf16),
        )
    )
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        for shape in s.recurrent_shapes:
            items.append(
                Item(
                    f"fused_recurrent_kda {dt} {shape_str(*shape)}",
                    f"recurrent {dt}",
                    _recurrent_item(shape, dtype),
                )
            )
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        items.append(
            Item(
                f"fused_recurrent_kda varlen, state in place {dt}",
                f"recurrent varlen {dt}",
                _recurrent_varlen_item(dtype),
            )
        )
    items.append(
        Item(f"model {s.model_preset}: triton vs torch backend", "model_check", _model_check)
    )
    return items


def _check_reference(ctx: ItemContext) -> None:
    """The float64 chunked op against the float64 recurrence (the specification), fwd + bwd."""

    B, T, H, K, V = ctx.run.sizes.reference_check_shape
    x = kda_inputs(B, T, H, K, V, torch.float64, ctx.run.device, ctx.run.seed)
    ref = fwd_bwd(naive_recurrent_kda, x, torch.float64)
    chunk = fwd_bwd(torch_chunk_kda, x, torch.float64)
    tol = KDA_RTOL[torch.float64]
    rows = [{"tensor": n, "err": rel_error(chunk[n], ref[n]), "tol": tol} for n in KDA_NAMES]
    for r in rows:
        r["pass"] = r["err"] <= tol
    ctx.record.update(
        shape=shape_str(B, T, H, K, V),
        reference="naive_recurrent_kda (fp64)",
        checked="torch_chunk_kda (fp64)",
        checks=rows,
        status="pass" if all(r["pass"] for r in rows) else "fail",
        summary=f"max err {max(r['err'] for r in rows):.2e} (tol {tol:.0e})",
    )


def _chunk_item(
    shape: tuple[int, int, int, int, int],
    dtype: torch.dtype,
    gate_low: float = -1.0,
    bound: float | None = None,
    paths: tuple[int | None, ...] = (None,),
) -> Callable[[ItemContext], None]:
    """fwd + bwd of ``chunk_kda`` (``bound``: with ``gate_lower_bound``, the safe-gate path; the
    inputs' g then lies in ``[bound, 0]``) against the float64 reference (fla on a miss), once
    per ``paths`` entry, its ``segment_chunks`` (0: unsplit, n: split into segments of n
    chunks, None: the automatic choice; :mod:`kimi_linear.kernels.split`)."""

    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import chunk_kda

        B, T, H, K, V = shape
        dev = ctx.run.device
        x = kda_inputs(B, T, H, K, V, dtype, dev, ctx.run.seed + T, gate_low=gate_low)
        ref_fn, ref_name = _reference(T, ctx.run.dry_run)
        ref = fwd_bwd(ref_fn, x, torch.float64)
        kw = {} if bound is None else {"gate_lower_bound": bound}
        runs = {
            describe_path(dense_offsets(B, T), H, V, dev, p): fwd_bwd(
                chunk_kda, x, segment_chunks=p, **kw
            )
            for p in paths
        }
        fla = _second_opinion(
            ctx, _worst_run(runs, ref, dtype), ref, dtype, lambda: fwd_bwd(fla_ops(dev).chunk, x)
        )
        _finish(ctx, runs, ref, fla, dtype, shape_str(*shape), ref_name, _fla_name(ctx, "chunk"))
        if bound is not None:
            ctx.record["gate_lower_bound"] = bound

    return item


def _grid_item(dtype: torch.dtype) -> Callable[[ItemContext], None]:
    """Forward of a packed batch whose first sequence has ``grid_chunks`` chunks (past CUDA's
    65,535 blocks on grid axes 1 and 2 on a GPU run): it must launch, and the short sequence
    packed after it must match a run of that sequence alone."""

    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import chunk_kda
        from kimi_linear.kernels.utils import CHUNK_SIZE

        s, dev = ctx.run.sizes, ctx.run.device
        K = V = s.chunk_shapes[0][3]
        long_len, short_len = s.grid_chunks * CHUNK_SIZE - 5, 100
        cu = torch.tensor([0, long_len, long_len + short_len], device=dev)
        x = kda_inputs(1, long_len + short_len, 1, K, V, dtype, dev, ctx.run.seed + 3, N=2)
        names = ("q", "k", "v", "g", "beta")
        with torch.no_grad():
            o, ht = chunk_kda(
                *(x[n] for n in names),
                initial_state=x["h0"],
                output_final_state=True,
                cu_seqlens=cu,
            )
            o1, h1 = chunk_kda(
                *(x[n][:, long_len:] for n in names),
                initial_state=x["h0"][1:],
                output_final_state=True,
            )
        rows = [
            {"tensor": "o (short sequence)", "err": rel_error(o[:, long_len:], o1)},
            {"tensor": "ht (short sequence)", "err": rel_error(ht[1:], h1)},
            {
                "tensor": "o (long sequence) finite",
                "err": 0.0 if torch.isfinite(o).all() else math.inf,
            },
        ]
        tol = TOLERANCE[dtype]
        for r in rows:
            r["tol"], r["pass"] = tol, r["err"] <= tol
        ctx.record.update(
            dtype=DTYPE_NAMES[dtype],
            shape=f"2 sequences of {long_len:,} ({s.grid_chunks:,} chunks) and {short_len} "
            f"tokens, H=1 K={K} V={V}",
            path=describe_path(cu.tolist(), 1, V, dev, None),
            checks=rows,
            status="pass" if all(r["pass"] for r in rows) else "fail",
            summary=f"launched; short sequence err {max(rows[0]['err'], rows[1]['err']):.1e}",
        )

    return item


def _varlen_item(
    dtype: torch.dtype, paths: tuple[int | None, ...] = (None,)
) -> Callable[[ItemContext], None]:
    """fwd + bwd of ``chunk_kda`` on a packed batch, once per ``paths`` entry (its
    ``segment_chunks``), against the float64 reference per sequence (fla on a miss)."""

    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import chunk_kda

        lengths = ctx.run.sizes.varlen_lengths
        H, K, V = ctx.run.sizes.varlen_heads
        dev = ctx.run.device
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev)
        x = kda_inputs(1, sum(lengths), H, K, V, dtype, dev, ctx.run.seed + 7, N=len(lengths))
        ref_fn, ref_name = _reference(max(lengths), ctx.run.dry_run)
        ref = fwd_bwd(ref_fn, x, torch.float64, cu_seqlens=cu)
        offsets = cu.tolist()
        runs = {
            describe_path(offsets, H, V, dev, p): fwd_bwd(
                chunk_kda, x, cu_seqlens=cu, segment_chunks=p
            )
            for p in paths
        }
        fla = _second_opinion(
            ctx,
            _worst_run(runs, ref, dtype),
            ref,
            dtype,
            lambda: fwd_bwd(fla_ops(dev).chunk, x, cu_seqlens=cu),
        )
        what = f"{len(lengths)} sequences of lengths {list(lengths)}, H={H} K={K} V={V}"
        _finish(
            ctx, runs, ref, fla, dtype, what, ref_name + " per sequence", _fla_name(ctx, "chunk")
        )

    return item


def _recurrent_item(
    shape: tuple[int, int, int, int, int], dtype: torch.dtype
) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import fused_recurrent_kda

        B, T, H, K, V = shape
        x = kda_inputs(B, T, H, K, V, dtype, ctx.run.device, ctx.run.seed + 11 + T)
        ref = forward_only(naive_recurrent_kda, x, torch.float64)
        ours = forward_only(fused_recurrent_kda, x)
        dev = ctx.run.device
        fla = _second_opinion(
            ctx, ours, ref, dtype, lambda: forward_only(fla_ops(dev).recurrent, x)
        )
        _finish(
            ctx,
            ours,
            ref,
            fla,
            dtype,
            shape_str(*shape),
            "naive_recurrent_kda (fp64)",
            _fla_name(ctx, "recurrent"),
        )

    return item


def _recurrent_varlen_item(dtype: torch.dtype) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import fused_recurrent_kda

        lengths = ctx.run.sizes.varlen_lengths[:4]
        H, K, V = ctx.run.sizes.varlen_heads
        dev = ctx.run.device
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev)
        x = kda_inputs(1, sum(lengths), H, K, V, dtype, dev, ctx.run.seed + 13, N=len(lengths))
        ref = forward_only(per_sequence(naive_recurrent_kda), x, torch.float64, cu_seqlens=cu)
        state = x["h0"].clone()
        ptr = state.data_ptr()
        with torch.no_grad():
            o, ht = fused_recurrent_kda(
                *(x[n] for n in ("q", "k", "v", "g", "beta")),
                initial_state=state,
                cu_seqlens=cu,
                inplace_state=True,
            )
        if ht is None or ht.data_ptr() != ptr:
            raise RuntimeError("inplace_state=True did not return the updated initial_state")
        ours = {"o": o, "ht": state}
        fla = _second_opinion(
            ctx, ours, ref, dtype, lambda: forward_only(fla_ops(dev).recurrent, x, cu_seqlens=cu)
        )
        what = f"{len(lengths)} sequences of lengths {list(lengths)}, H={H} K={K} V={V}"
        _finish(
            ctx,
            ours,
            ref,
            fla,
            dtype,
            what,
            "naive_recurrent_kda (fp64) per sequence",
            _fla_name(ctx, "recurrent"),
        )

    return item


def _worst_run(
    runs: dict[str, dict[str, torch.Tensor]], ref: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The first of ``runs`` (one per path) that misses the tolerance, else the first: the run
    :func:`_second_opinion` decides on."""
    return next(
        (out for out in runs.values() if not compare(out, ref, None, dtype)[1]),
        next(iter(runs.values())),
    )


def _finish(
    ctx: ItemContext,
    ours: dict[str, torch.Tensor] | dict[str, dict[str, torch.Tensor]],
    ref: dict[str, torch.Tensor],
    fla: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
    what: str,
    ref_name: str,
    fla_name: str,
) -> None:
    """Record the item: ``ours`` is one run's tensors by name, or several runs by path (the
    ``path`` column of the checks: which ``segment_chunks`` ran, :func:`describe_path`)."""
    runs = ours if isinstance(next(iter(ours.values())), dict) else {None: ours}
    rows, ok = [], True
    for path, out in runs.items():
        path_rows, path_ok = compare(out, ref, fla, dtype)
        rows += path_rows if path is None else [{"path": path, **r} for r in path_rows]
        ok &= path_ok
    worst = max(rows, key=lambda r: r["err_vs_fp64"] / r["tol"])
    where = f" ({worst['path']})" if len(runs) > 1 else ""
    if len(runs) > 1 or None not in runs:
        ctx.record["paths"] = list(runs)
    ctx.record.update(
        dtype=DTYPE_NAMES[dtype],
        shape=what,
        reference=ref_name,
        fla=fla_name,
        checks=rows,
        status="pass" if ok else "fail",
        summary=f"worst {worst['tensor']}{where} err {worst['err_vs_fp64']:.2e} "
        f"(tol {worst['tol']:.0e})",
    )


def _model_check(ctx: ItemContext) -> None:
    """A few fp32 AdamW steps of the same model with the ``triton`` and the ``torch`` backend."""
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    s, dev = ctx.run.sizes, ctx.run.device
    B, T = s.model_batch
    models, opts = {}, {}
    for backend in ("torch", "triton"):
        cfg = KimiLinearConfig.from_preset(s.model_preset, kda_backend=backend)
        torch.manual_seed(ctx.run.seed)
        with torch.device(dev):
            models[backend] = KimiLinearForCausalLM(cfg)
        opts[backend] = torch.optim.AdamW(models[backend].parameters(), lr=1e-3)
    ref_sd = models["torch"].state_dict()
    for key, t in models["triton"].state_dict().items():
        if not torch.equal(t, ref_sd[key]):
            raise RuntimeError(f"the two models were not initialised alike ({key})")
    gen = torch.Generator(device="cpu").manual_seed(ctx.run.seed)
    vocab = models["torch"].config.vocab_size
    losses: dict[str, list[float]] = {"torch": [], "triton": []}
    grad_err = math.nan
    for step in range(s.model_steps):
        ids = torch.randint(0, vocab, (B, T), generator=gen).to(dev)
        grads = {}
        for backend, model in models.items():
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses[backend].append(loss.item())
            if step == 0:
                grads[backend] = torch.cat(
                    [p.grad.flatten() for p in model.parameters() if p.grad is not None]
                )
            opts[backend].step()
            opts[backend].zero_grad(set_to_none=True)
        if step == 0:
            grad_err = rel_error(grads["triton"], grads["torch"])
    loss_err = [abs(a - b) / abs(b) for a, b in zip(losses["triton"], losses["torch"])]
    param_err = rel_error(
        torch.cat([p.detach().flatten() for p in models["triton"].parameters()]),
        torch.cat([p.detach().flatten() for p in models["torch"].parameters()]),
    )
    ok = max(loss_err) <= MODEL_LOSS_TOL and grad_err <= MODEL_GRAD_TOL
    ctx.record.update(
        preset=s.model_preset,
        batch=[B, T],
        steps=s.model_steps,
        optimizer="AdamW lr 1e-3, fp32",
        loss_torch=losses["torch"],
        loss_triton=losses["triton"],
        loss_rel_diff=loss_err,
        loss_tol=MODEL_LOSS_TOL,
        first_step_grad_rel_diff=grad_err,
        grad_tol=MODEL_GRAD_TOL,
        final_param_rel_diff=param_err,
        status="pass" if ok else "fail",
        summary=f"max loss diff {max(loss_err):.1e} (tol {MODEL_LOSS_TOL:.0e}), "
        f"step-1 grads {grad_err:.1e} (tol {MODEL_GRAD_TOL:.0e})",
    )
