"""Two-process (gloo, CPU) checks of FSDP2 sharding, run by tests/test_fsdp.py as a subprocess.

``python tests/fsdp_worker.py optim OUT_DIR``
    spawns 2 ranks; for three meshes (FSDP over 2 ranks, HSDP 1 x 2 and 2 x 1) each rank
    builds the same tiny model sharded with FSDP2 (meta device ->
    ``fully_shard`` -> ``to_empty`` -> seeded init) and an unsharded reference with the same seed,
    checks that the gathered sharded weights equal the reference bit for bit, then runs
    MuonClip steps on both from the same gradients and max logits (QK-Clip forced with a low
    tau) and writes the largest relative difference to ``OUT_DIR/optim.json``.

``python tests/fsdp_worker.py fit OUT_DIR [INIT_FROM]``
    Lightning ``FSDP2Strategy`` on 2 CPU processes (Lightning's launcher starts the second
    rank): AdamW for 6 steps, with FSDP and with HSDP (2 replicas x 1 shard); MuonClip for 6 steps with a sharded checkpoint at step 3; MuonClip
    resumed from that checkpoint to step 6.  Rank 0 saves the final full state dicts to
    ``OUT_DIR/fit.pt``; :func:`reference_fit` is the single-process run to compare with.
    With ``INIT_FROM`` (a ``save_pretrained`` folder) it also validates a module started from
    those weights (``model.init_from``) and saves its gathered weights.

``python tests/fsdp_worker.py resume1 OUT_DIR CKPT``
    resumes the 2-rank sharded checkpoint on one rank and takes one step (``OUT_DIR/one.pt``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from kimi_linear.testing import rel_error

PRESET_OVERRIDES = {"num_hidden_layers": 2, "mla_every": 2, "vocab_size": 64}
SEED = 1234


def tiny_config():
    from kimi_linear import KimiLinearConfig

    return KimiLinearConfig.from_preset("tiny", **PRESET_OVERRIDES)


# ------------------------------------------------------------------------------ optim
def _optim_rank(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from kimi_linear.lightning.parallel import MESH_DIM_NAMES

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = tiny_config()
    results = {}
    # FSDP over both ranks; the same as a 2-D HSDP mesh (1 replica x 2 shards); and 2 replicas
    # x 1 shard (pure replication: every matrix orthogonalized locally)
    for label, shape in (("fsdp", (2,)), ("hsdp_1x2", (1, 2)), ("hsdp_2x1", (2, 1))):
        names = MESH_DIM_NAMES if len(shape) == 2 else None
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        results[label] = _optim_check(cfg, mesh)
    if rank == 0:
        Path(out_dir, "optim.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _optim_check(cfg, mesh) -> dict:
    """Sharded init and two MuonClip steps on ``mesh`` vs an unsharded reference."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import distribute_tensor

    from kimi_linear.lightning.parallel import shard_model
    from kimi_linear.model import KimiLinearForCausalLM as model_cls
    from kimi_linear.optim import MuonClip as opt_cls

    ref = model_cls(cfg)
    ref.reset_parameters(seed=SEED)
    with torch.device("meta"):
        model = model_cls(cfg)
    shard_model(model, mesh)
    model.to_empty(device="cpu")
    model.reset_parameters(seed=SEED)
    opts = StateDictOptions(full_state_dict=True)
    full = get_model_state_dict(model, options=opts)
    ref_sd = ref.state_dict()
    init_equal = all(torch.equal(full[k], ref_sd[k]) for k in ref_sd)

    tau = 1e-3  # every head clipped
    opt_ref = opt_cls(ref, lr=0.02, qk_clip_tau=tau)
    opt = opt_cls(model, lr=0.02, qk_clip_tau=tau)
    gen = torch.Generator().manual_seed(0)
    gammas = []
    for _ in range(2):
        ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
        ref(ids, labels=ids).loss.backward()
        params = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            params[name].grad = distribute_tensor(
                p.grad, params[name].device_mesh, params[name].placements
            )
        for name, m in opt_ref.mla_modules.items():
            opt.mla_modules[name].max_logits = m.max_logits.clone()
        opt_ref.step()
        opt.step()
        gammas.append(min(float(g.min()) for g in opt.last_clip_gamma.values()))
        opt_ref.zero_grad()
        opt.zero_grad()
    full = get_model_state_dict(model, options=opts)
    ref_sd = ref.state_dict()
    return {
        "init_equal": init_equal,
        "max_rel": max(rel_error(full[k], ref_sd[k]) for k in ref_sd),
        "exact": all(torch.equal(full[k], ref_sd[k]) for k in ref_sd),
        "gamma": gammas,
    }


def run_optim(out_dir: str) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_optim_rank, args=(out_dir, port), nprocs=2)


# ------------------------------------------------------------------------------ fit
def fit_data(n: int = 12, T: int = 16) -> torch.Tensor:
    """Fixed token sequences ``[n, T]`` (a learnable pattern plus noise)."""
    gen = torch.Generator().manual_seed(7)
    base = torch.arange(T)[None, :] * torch.randint(1, 5, (n, 1), generator=gen)
    noise = torch.randint(0, 3, (n, T), generator=gen)
    return (base + noise) % PRESET_OVERRIDES["vocab_size"]


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def lit_module(optimizer: str):
    from kimi_linear.lightning.module import KimiLinearLitModule

    return KimiLinearLitModule(
        overrides=PRESET_OVERRIDES,
        optimizer=optimizer,
        lr=1e-2,
        warmup_steps=2,
        max_steps=6,
        qk_clip_tau=5.0,
        init_seed=SEED,
    )


def trainer(max_steps: int, root: str, **kw):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def rank_batches(n: int = 12, batch: int = 2) -> list[list[list[int]]]:
    """``[rank][step]``: the row indices of each rank's batches (rank r: rows r, r + 2, ...)."""
    rows = [list(range(r, n, 2)) for r in range(2)]
    return [[rows[r][i : i + batch] for i in range(0, len(rows[r]), batch)] for r in range(2)]


def reference_fit(root: str, optimizer: str):
    """The single-process run with the same global batches: each step accumulates rank 0's
    and then rank 1's batch of the 2-rank run (``DistributedSampler`` order, no shuffle)."""
    ids = fit_data()
    per_rank = rank_batches()
    batches = [b for step in zip(*per_rank) for b in step]
    loader = torch.utils.data.DataLoader(_Rows(ids), batch_sampler=batches)
    module = lit_module(optimizer)
    trainer(6, root, accelerator="cpu", devices=1, accumulate_grad_batches=2).fit(module, loader)
    return module.model.state_dict()


def run_fit(out_dir: str, init_from: str | None = None) -> None:
    """AdamW for 6 steps (FSDP, then HSDP 2 x 1); MuonClip for 6 steps (sharded checkpoint at
    3), then MuonClip resumed from that checkpoint to step 6; with ``init_from`` (a
    ``save_pretrained`` folder), the sharded model loaded from it.  Rank 0 saves the full
    weights of the runs."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from kimi_linear.lightning.parallel import FSDP2Strategy

    torch.set_num_threads(1)
    # 12 rows, 2 per rank and step: 3 steps per epoch, the checkpoint at step 3 ends epoch 0.
    # Rank r reads rows r, r + 2, ... (Lightning's launcher sets LOCAL_RANK before re-running
    # this script for rank 1; rank 0 has none yet).
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    loader = torch.utils.data.DataLoader(_Rows(fit_data()), batch_sampler=rank_batches()[rank])
    ckpt_dir = os.path.join(out_dir, "ckpt")
    kw = dict(accelerator="cpu", devices=2, use_distributed_sampler=False)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {}
    for name, optimizer, ckpt, replicas in (
        ("adamw", "adamw", None, 1),
        ("adamw_hsdp", "adamw", None, 2),  # HSDP mesh 2 x 1: replicated, all-reduced
        ("muonclip", "muonclip", None, 1),
        ("muonclip_resumed", "muonclip", os.path.join(ckpt_dir, "epoch=0-step=3.ckpt"), 1),
    ):
        module = lit_module(optimizer)
        callbacks = []
        if name == "muonclip":
            callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)]
        strategy = FSDP2Strategy(replicate_size=replicas)
        tr = trainer(6, out_dir, strategy=strategy, callbacks=callbacks, **kw)
        tr.fit(module, loader, ckpt_path=ckpt)
        out[name] = get_model_state_dict(module.model, options=opts)
        out[name + "_step"] = tr.global_step
    out["sharded"] = os.path.isdir(os.path.join(ckpt_dir, "epoch=0-step=3.ckpt"))
    if init_from is not None:  # pretrained weights into the sharded model (validate: no step)
        from kimi_linear.lightning.module import KimiLinearLitModule

        module = KimiLinearLitModule(init_from=init_from, init_seed=SEED)
        trainer(1, out_dir, strategy=FSDP2Strategy(), **kw).validate(module, loader)
        out["init_from"] = get_model_state_dict(module.model, options=opts)
    if tr.global_rank == 0:
        torch.save(out, os.path.join(out_dir, "fit.pt"))


def run_resume_one_rank(out_dir: str, ckpt: str) -> None:
    """Resume the 2-rank sharded checkpoint ``ckpt`` on 1 rank (DCP reshards weights and the
    MuonClip state) and take one more step; saves the weights right after the restore."""
    import lightning.pytorch as pl
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from kimi_linear.lightning.parallel import FSDP2Strategy

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    seen = {}

    class Grab(pl.Callback):
        def on_train_start(self, trainer, module):
            # cloned: on one rank the "full" tensors share storage with the parameters
            state = get_model_state_dict(module.model, options=opts)
            seen["restored"] = {k: v.clone() for k, v in state.items()}

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(_Rows(fit_data()), batch_size=4, shuffle=False)
    module = lit_module("muonclip")
    tr = trainer(
        4, out_dir, accelerator="cpu", devices=1, strategy=FSDP2Strategy(), callbacks=[Grab()]
    )
    tr.fit(module, loader, ckpt_path=ckpt)
    torch.save({"restored": seen["restored"], "step": tr.global_step}, Path(out_dir, "one.pt"))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "optim":
        run_optim(out)
    elif mode == "resume1":
        run_resume_one_rank(out, sys.argv[3])
    elif mode == "fit":
        run_fit(out, sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected optim, fit or resume1")
