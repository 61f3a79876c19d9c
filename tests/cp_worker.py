"""Multi-process (gloo, CPU) checks of context parallelism, run by tests/test_context_parallel.py.

``python tests/cp_worker.py parity OUT_DIR``
    spawns 4 ranks. For two meshes, ``(dp, cp) = (1, 4)`` and ``(2, 2)`` (two CP groups of 2,
    each with its own global batch), and three models (hybrid KDA + MLA, KDA only, K2-style MLA
    with RoPE and a low-rank query), every rank runs the same global batch(es) in one process
    (the reference) and its shard under CP, then compares: the gathered logits, the loss,
    every parameter gradient (summed over ``cp``, averaged over ``dp``), the MLA max logits
    (max over the group) and the MoE expert loads (summed). The batch is a packed row of
    T = 37 tokens (no multiple of CP x chunk 8) whose documents cross shard borders, with a
    one-token document at a border (offsets 0, 7, 19, 20, 33, 37), plus for the hybrid model a
    plain batch of 2 rows. Writes the largest relative error per check to ``parity.json``.

``python tests/cp_worker.py steps OUT_DIR``
    4 ranks, both meshes: 6 optimizer steps (AdamW; MuonClip with QK-Clip forced by a low tau)
    under CP against 6 single-process steps on the same batches, on the K2-style model; writes
    ``steps.json``. MuonClip runs with Muon's Newton-Schulz in float32 (and once with the
    stock bfloat16 one, whose rounding bounds the agreement at ~1e-2).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch

from kimi_linear.testing import rel_error

SEED = 1234
T = 37
OFFSETS = [0, 7, 19, 20, 33, T]
MODELS = {
    "hybrid": dict(num_hidden_layers=2, mla_every=2),
    "kda": dict(num_hidden_layers=2, layer_types=("kda", "kda")),
    "rope": dict(num_hidden_layers=2, mla_every=2, mla_use_nope=False, q_lora_rank=16),
}
MESHES = ((1, 4), (2, 2))


def config(kind: str):
    from kimi_linear import KimiLinearConfig

    return KimiLinearConfig.from_preset("tiny", vocab_size=64, kda_chunk_size=8, **MODELS[kind])


def batches(dp: int, packed: bool = True) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One global batch per dp rank: ``(ids, cu_seqlens)``."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(dp):
        if packed:
            ids = torch.randint(0, 64, (1, T), generator=gen)
            out.append((ids, torch.tensor(OFFSETS, dtype=torch.int32)))
        else:
            out.append((torch.randint(0, 64, (2, T), generator=gen), None))
    return out


def _build(kind: str):
    from kimi_linear import KimiLinearForCausalLM

    model = KimiLinearForCausalLM(config(kind))
    model.reset_parameters(seed=SEED)
    for m in model.modules():
        if hasattr(m, "record_max_logits"):
            m.record_max_logits = True
    return model.train()


def _mesh(shape: tuple[int, int]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=("dp", "cp"))


def _reduce_grads(model, mesh) -> None:
    """Gradients summed over ``cp`` and averaged over ``dp`` (what the strategy does)."""
    import torch.distributed as dist

    cp_group, dp_group = mesh["cp"].get_group(), mesh["dp"].get_group()
    dp = mesh["dp"].size()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=cp_group)
        dist.all_reduce(p.grad, group=dp_group)
        p.grad /= dp


def _loads(model) -> list[torch.Tensor]:
    return [m.expert_load.clone() for m in model.modules() if hasattr(m, "expert_load")]


def _max_logits(model) -> list[torch.Tensor]:
    return [
        m.max_logits.clone() for m in model.modules() if getattr(m, "max_logits", None) is not None
    ]


def _parity_case(kind: str, shape: tuple[int, int], packed: bool) -> dict:
    import torch.distributed as dist

    from kimi_linear.context_parallel import context_parallel_loss, shard_batch

    mesh = _mesh(shape)
    dp_rank = mesh["dp"].get_local_rank()
    cp_group = mesh["cp"].get_group()
    data = batches(shape[0], packed)

    ref = _build(kind)
    ref_losses, ref_logits = [], []
    for ids, cu in data:
        out = ref(ids, labels=ids, cu_seqlens=cu)
        (out.loss / len(data)).backward()
        ref_losses.append(out.loss.detach())
        ref_logits.append(out.logits.detach())
    model = _build(kind)
    ids, cu = data[dp_rank]
    batch = shard_batch(ids, ids, cu, group=cp_group)
    loss, logits = context_parallel_loss(model, batch)
    loss.backward()
    _reduce_grads(model, mesh)
    with torch.no_grad():
        full_logits = batch.cp.gather_sequence(logits)
    res = {
        "logits": rel_error(full_logits, ref_logits[dp_rank]),
        "loss": rel_error(loss, ref_losses[dp_rank]),
    }
    grads = {n: p.grad for n, p in ref.named_parameters()}
    res["grads"] = max(rel_error(p.grad, grads[n]) for n, p in model.named_parameters())
    zero = [n for n, g in grads.items() if float(g.norm()) == 0.0]
    res["zero_grads"] = len(zero)
    loads = _loads(model)
    for t in loads:
        dist.all_reduce(t)  # over the world: both dp batches, as the reference counted them
    res["loads"] = max((rel_error(a, b) for a, b in zip(loads, _loads(ref))), default=0.0)
    mls = _max_logits(model)
    for t in mls:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    res["max_logits"] = max((rel_error(a, b) for a, b in zip(mls, _max_logits(ref))), default=0.0)
    res["n_max_logits"] = len(mls)
    return res


def _parity_rank(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    results: dict[str, dict] = {}
    for shape in MESHES:
        for kind in MODELS:
            results[f"{kind}/dp{shape[0]}xcp{shape[1]}/packed"] = _parity_case(kind, shape, True)
        results[f"hybrid/dp{shape[0]}xcp{shape[1]}/rows"] = _parity_case("hybrid", shape, False)
    gathered = [None] * 4
    dist.all_gather_object(gathered, results)
    if rank == 0:
        worst = {
            case: {k: max(r[case][k] for r in gathered) for k in results[case]} for case in results
        }
        Path(out_dir, "parity.json").write_text(json.dumps(worst, indent=1))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ steps
STEPS = 6


def _train(model, opt, step_batches, mesh=None) -> None:
    from kimi_linear.context_parallel import context_parallel_loss, shard_batch

    for data in step_batches:
        opt.zero_grad(set_to_none=True)
        if mesh is None:  # one process: the mean over the dp batches
            for ids, cu in data:
                (model(ids, labels=ids, cu_seqlens=cu).loss / len(data)).backward()
        else:
            ids, cu = data[mesh["dp"].get_local_rank()]
            batch = shard_batch(ids, ids, cu, group=mesh["cp"].get_group())
            context_parallel_loss(model, batch)[0].backward()
            _reduce_grads(model, mesh)
        opt.step()
        for m in model.modules():
            if hasattr(m, "update_bias"):
                m.update_bias(sync=mesh is not None)


def _ns_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton-Schulz iteration in float32 (the stock one runs in bfloat16,
    whose rounding turns gradient differences of 1e-7 into update differences of ~1e-3)."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if grad.size(0) > grad.size(1) else x


def _steps_case(opt_name: str, shape: tuple[int, int], fp32_ns: bool = True) -> float:
    import torch.optim._muon as muon

    from kimi_linear.optim import build_optimizer

    mesh = _mesh(shape)
    gen = torch.Generator().manual_seed(5)
    step_batches = [
        [
            (torch.randint(0, 64, (1, T), generator=gen), torch.tensor(OFFSETS, dtype=torch.int32))
            for _ in range(shape[0])
        ]
        for _ in range(STEPS)
    ]
    kwargs = dict(lr=3e-3)
    if opt_name == "muonclip":
        kwargs["qk_clip_tau"] = 0.5  # clips at every step
    stock = muon._zeropower_via_newtonschulz
    if fp32_ns:
        muon._zeropower_via_newtonschulz = _ns_fp32
    try:
        runs = []
        for m in (None, mesh):
            model = _build("rope")
            opt = build_optimizer(model, opt_name, **kwargs)
            _train(model, opt, step_batches, m)
            runs.append(model.state_dict())
    finally:
        muon._zeropower_via_newtonschulz = stock
    return max(rel_error(runs[1][k].float(), runs[0][k].float()) for k in runs[0])


def _steps_rank(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    results = {}
    for shape in MESHES:
        for opt_name in ("adamw", "muonclip"):
            results[f"{opt_name}/dp{shape[0]}xcp{shape[1]}"] = _steps_case(opt_name, shape)
        tag = f"muonclip_bf16_newton_schulz/dp{shape[0]}xcp{shape[1]}"
        results[tag] = _steps_case("muonclip", shape, fp32_ns=False)
    gathered = [None] * 4
    dist.all_gather_object(gathered, results)
    if rank == 0:
        worst = {k: max(r[k] for r in gathered) for k in results}
        Path(out_dir, "steps.json").write_text(json.dumps(worst, indent=1))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ Lightning
FIT_OVERRIDES = {"num_hidden_layers": 2, "mla_every": 2, "vocab_size": 64, "kda_chunk_size": 8}


def fit_batches(n: int = 3) -> torch.utils.data.DataLoader:
    """``n`` packed rows of T = 37 tokens (documents across the CP borders), one per step: the
    checkpoint at step 3 ends epoch 0, so a resumed run reads the same batches after it."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (1, T), generator=gen)
        cu = torch.tensor(OFFSETS, dtype=torch.int32)
        out.append({"input_ids": ids, "labels": ids, "cu_seqlens": cu})
    return torch.utils.data.DataLoader(out, batch_size=None, shuffle=False)


def _lit(optimizer: str):
    from kimi_linear.lightning.module import KimiLinearLitModule

    return KimiLinearLitModule(
        overrides=FIT_OVERRIDES,
        optimizer=optimizer,
        lr=1e-2,
        warmup_steps=2,
        max_steps=6,
        qk_clip_tau=0.5,
        init_seed=SEED,
    )


def _trainer(root: str, **kw):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=6,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        use_distributed_sampler=False,
        **kw,
    )


def _full_state(module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone() for k, v in get_model_state_dict(module.model, options=opts).items()}


def run_fit(out_dir: str) -> None:
    """Lightning, 2 ranks, ContextParallelStrategy(cp_size=2): AdamW 6 steps; MuonClip 6 steps
    with a sharded checkpoint at step 3; MuonClip resumed from it to step 6. Rank 0 saves the
    full weights (``fit.pt``). Muon's Newton-Schulz in float32 (see :func:`_ns_fp32`)."""
    import torch.optim._muon as muon
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kimi_linear.lightning.context_parallel import ContextParallelStrategy

    torch.set_num_threads(1)
    muon._zeropower_via_newtonschulz = _ns_fp32
    ckpt_dir = os.path.join(out_dir, "ckpt")
    out: dict = {}
    for name, optimizer, ckpt in (
        ("adamw", "adamw", None),
        ("muonclip", "muonclip", None),
        ("muonclip_resumed", "muonclip", os.path.join(ckpt_dir, "step3.ckpt")),
    ):
        module = _lit(optimizer)
        callbacks = []
        if name == "muonclip":
            callbacks = [
                ModelCheckpoint(
                    dirpath=ckpt_dir,
                    filename="step{step}",
                    every_n_train_steps=3,
                    save_top_k=-1,
                    auto_insert_metric_name=False,
                )
            ]
        tr = _trainer(
            out_dir, devices=2, strategy=ContextParallelStrategy(cp_size=2), callbacks=callbacks
        )
        tr.fit(module, fit_batches(), ckpt_path=ckpt)
        out[name] = _full_state(module)
        out[name + "_step"] = tr.global_step
    if tr.global_rank == 0:
        torch.save(out, os.path.join(out_dir, "fit.pt"))


def run_one(out_dir: str, ckpt: str | None) -> None:
    """One process: AdamW and MuonClip 6 steps from scratch (the references), and MuonClip
    resumed at CP = 1 from the CP = 2 checkpoint ``ckpt`` to step 6 (``one.pt``)."""
    import torch.optim._muon as muon

    from kimi_linear.lightning.context_parallel import ContextParallelStrategy

    torch.set_num_threads(1)
    muon._zeropower_via_newtonschulz = _ns_fp32
    out: dict = {}
    for name, optimizer in (("adamw", "adamw"), ("muonclip", "muonclip")):
        module = _lit(optimizer)
        _trainer(out_dir, devices=1).fit(module, fit_batches())
        out[name] = {k: v.clone() for k, v in module.model.state_dict().items()}
    if ckpt is not None:
        module = _lit("muonclip")
        tr = _trainer(out_dir, devices=1, strategy=ContextParallelStrategy(cp_size=1))
        tr.fit(module, fit_batches(), ckpt_path=ckpt)
        out["muonclip_resumed_cp1"] = _full_state(module)
        out["muonclip_resumed_cp1_step"] = tr.global_step
    torch.save(out, os.path.join(out_dir, "one.pt"))


def _spawn(fn, out_dir: str, nprocs: int = 4) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(out_dir, port), nprocs=nprocs)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    modes = {"parity": _parity_rank, "steps": _steps_rank}
    if mode == "fit":
        run_fit(out)
    elif mode == "one":
        run_one(out, sys.argv[3] if len(sys.argv) > 3 else None)
    elif mode in modes:
        _spawn(modes[mode], out)
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected one of {sorted(modes)}, fit, one")
