"""Muon on FSDP2 / HSDP row-sharded (DTensor) parameters, equal to torch.optim.Muon unsharded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kimi_linear.sharding import local_shard


def _muon_kernels() -> tuple[Callable[..., Tensor], Callable[..., float]]:
    """PyTorch's own Newton-Schulz and learning-rate adjustment (``torch.optim._muon``), so the
    sharded step does exactly the arithmetic of :class:`torch.optim.Muon`."""
    try:
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
    except ImportError as e:  # pragma: no cover - depends on the torch version
        raise RuntimeError(
            "MuonClip on sharded parameters needs torch.optim._muon._zeropower_via_newtonschulz "
            f"and _adjust_lr (torch {torch.__version__}); MuonClip must be updated for this version"
        ) from e
    return _zeropower_via_newtonschulz, _adjust_lr


def _shard_mesh_dim(p: Tensor) -> int | None:
    """The mesh dim ``p`` is row-sharded over (``Shard(0)``), ``None`` when it is replicated.

    Raises:
        NotImplementedError: for any other layout (a shard of another dim, several shard dims,
            partial values): MuonClip supports FSDP / HSDP sharding only.
    """
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for i, placement in enumerate(p.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard) and placement.dim == 0:
            dims.append(i)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"MuonClip supports parameters sharded on dim 0 over one mesh dim (FSDP2 / HSDP); "
                f"got placements {p.placements} for a parameter of shape {tuple(p.shape)}"  # type: ignore[attr-defined]
            )
    if len(dims) > 1:
        raise NotImplementedError(
            f"MuonClip supports one sharded mesh dim, got placements {p.placements}"  # type: ignore[attr-defined]
        )
    return dims[0] if dims else None


def _row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank`` in a dim-0 ``Shard`` of ``rows`` rows (torch.chunk)."""
    chunk = -(-rows // world)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def _orthogonalize_row_shards(
    updates: list[Tensor], shapes: list[tuple[int, int]], group: Any, ns: Callable[[Tensor], Tensor]
) -> list[Tensor]:
    """Newton-Schulz of row-sharded matrices, each done once, by one rank of ``group``.

    ``updates[k]`` is this rank's row block of matrix ``k`` of full shape ``shapes[k]``.
    Matrices are assigned to ranks greedily by size (largest first to the least loaded rank);
    one ``all_to_all`` brings every owner the row blocks of its matrices, the owner runs
    ``ns`` on the full matrix, and a second ``all_to_all`` returns each rank its rows of every
    orthogonalized matrix.  Returns this rank's row blocks of the results (fp32).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    loads = [0] * world
    owner = [0] * len(shapes)
    for k in sorted(range(len(shapes)), key=lambda k: -shapes[k][0] * shapes[k][1]):
        owner[k] = min(range(world), key=lambda r: loads[r])
        loads[owner[k]] += shapes[k][0] * shapes[k][1]
    mine = [k for k in range(len(shapes)) if owner[k] == rank]
    device = updates[0].device if updates else torch.device("cpu")

    def numel(k: int, r: int) -> int:
        r0, r1 = _row_range(shapes[k][0], world, r)
        return (r1 - r0) * shapes[k][1]

    # 1. row blocks to their owners
    send = [
        [updates[k].float().reshape(-1) for k in range(len(shapes)) if owner[k] == j]
        for j in range(world)
    ]
    send_sizes = [sum(t.numel() for t in chunk) for chunk in send]
    recv_sizes = [sum(numel(k, i) for k in mine) for i in range(world)]
    flat_send = (
        torch.cat([t for chunk in send for t in chunk])
        if any(send_sizes)
        else torch.empty(0, device=device)
    )
    flat_recv = torch.empty(sum(recv_sizes), device=device)
    dist.all_to_all_single(flat_recv, flat_send, recv_sizes, send_sizes, group=group)
    # 2. orthogonalize the owned matrices
    pieces = [
        list(t.split([numel(k, i) for k in mine]))
        for i, t in enumerate(flat_recv.split(recv_sizes))
    ]
    results = []
    for j, k in enumerate(mine):
        full = torch.cat([pieces[i][j] for i in range(world)]).view(shapes[k])
        results.append(ns(full).float())
    # 3. each rank its rows of every result
    back = []
    for i in range(world):
        for j, k in enumerate(mine):
            r0, r1 = _row_range(shapes[k][0], world, i)
            back.append(results[j][r0:r1].reshape(-1))
    back_sizes = [sum(numel(k, i) for k in mine) for i in range(world)]
    recv_back_sizes = send_sizes
    flat_back = torch.cat(back) if back else torch.empty(0, device=device)
    flat_out = torch.empty(sum(recv_back_sizes), device=device)
    dist.all_to_all_single(flat_out, flat_back, recv_back_sizes, back_sizes, group=group)
    out: list[Tensor | None] = [None] * len(shapes)
    for j, chunk in enumerate(flat_out.split(recv_back_sizes)):
        ks = [k for k in range(len(shapes)) if owner[k] == j]
        for k, t in zip(ks, chunk.split([numel(k, rank) for k in ks])):
            out[k] = t.view_as(updates[k])
    return out  # type: ignore[return-value]


@torch.no_grad()
def _sharded_muon_step(
    state: dict[Tensor, dict[str, Any]], params: list[Tensor], group: dict[str, Any]
) -> None:
    """One Muon step of DTensor parameters (FSDP2 / HSDP row shards), equal to
    :class:`torch.optim.Muon` on the full matrices.

    Momentum, Nesterov blend, weight decay and the update are elementwise and run on the local
    shards; only the Newton-Schulz orthogonalization needs whole matrices:

    * stacked experts ``[E, out, in]`` are sharded by expert, so every rank orthogonalizes the
      experts it holds (no communication, the work is spread by construction);
    * 2-D matrices row-sharded over a mesh dim are gathered matrix by matrix to one owner rank
      of that dim's process group, orthogonalized there once, and scattered back
      (:func:`_orthogonalize_row_shards`); with HSDP each replica group does this for itself;
    * replicated matrices are orthogonalized locally.
    """
    zeropower, adjust_lr = _muon_kernels()
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]

    def ns(x: Tensor) -> Tensor:
        return zeropower(x, group["ns_coefficients"], group["ns_steps"], group["eps"])

    def apply(p_local: Tensor, update: Tensor, shape: tuple[int, ...]) -> None:
        p_local.mul_(1 - lr * wd)
        p_local.add_(update, alpha=-adjust_lr(lr, group["adjust_lr_fn"], torch.Size(shape)))

    exchange: dict[Any, list[tuple[Tensor, Tensor, tuple[int, int]]]] = {}
    for p in params:
        mesh_dim = _shard_mesh_dim(p)
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p)
        p_local, _ = local_shard(p)
        g_local, _ = local_shard(p.grad)  # type: ignore[arg-type]
        buf_local, _ = local_shard(st["momentum_buffer"])
        if g_local.shape != p_local.shape or buf_local.shape != p_local.shape:
            raise RuntimeError(
                f"gradient / momentum shard of shape {tuple(g_local.shape)} / "
                f"{tuple(buf_local.shape)} does not match the parameter shard {tuple(p_local.shape)}"
            )
        buf_local.lerp_(g_local, 1 - momentum)
        update = g_local.lerp(buf_local, momentum) if group["nesterov"] else buf_local
        if p.ndim == 3:  # experts: whole [out, in] slices are local
            for e in range(p_local.shape[0]):
                apply(p_local[e], ns(update[e]), tuple(p.shape[1:]))
        elif mesh_dim is None:
            apply(p_local, ns(update), tuple(p.shape))
        else:
            pg = p.device_mesh.get_group(mesh_dim)  # type: ignore[attr-defined]
            exchange.setdefault(pg, []).append((p_local, update, (p.shape[0], p.shape[1])))
    for pg, entries in exchange.items():
        results = _orthogonalize_row_shards(
            [u for _, u, _ in entries], [shape for _, _, shape in entries], pg, ns
        )
        for (p_local, _, shape), o in zip(entries, results):
            apply(p_local, o, shape)
