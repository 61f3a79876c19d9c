"""Sequence layouts of one forward: packed documents (``cu_seqlens``) and left-padded rows.

Two ways to put sequences of different lengths through the model in one call:

* **Packing** (training): several documents back to back in one row, ``input_ids [1, N]``,
  with ``cu_seqlens`` their offsets ``[0, l_0, l_0 + l_1, ..., N]`` (int32 or int64, as fla and
  flash-attn take them). Every document is computed as if it were alone: KDA state and short
  convolutions restart at each document start, MLA attends block-diagonally, RoPE positions
  restart, and no label is scored across a boundary.
* **Left padding** (generation, the Hugging Face convention): ``input_ids [B, T]`` with an
  ``attention_mask [B, T]`` of ``0`` (pad) then ``1`` (real token) in every row. Pads change
  nothing: each row is computed as if its real tokens were alone, positions start at its first
  real token, and decoding then continues every row at its own length.

This module holds the validation (one place, named errors) and the per-token positions both
layouts need; the layers take ``cu_seqlens`` / ``pad_lengths`` / a token mask directly.

:func:`check_cu_seqlens` is the one ``cu_seqlens`` contract, also what every KDA op checks
(:func:`kimi_linear.ops.checks.check_kda_inputs`). A model forward checks it once
(:func:`packed_documents`) and hands the host offsets (:class:`PackedDocuments`) down to the
layers and through the dispatcher into the ops (their ``cu_seqlens_cpu`` argument, fla's name),
so no layer reads the offsets back from the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PackedDocuments",
    "check_attention_mask",
    "check_cu_seqlens",
    "document_positions",
    "packed_documents",
    "padded_positions",
    "real_token_mask",
]

CU_SEQLENS_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(
    cu_seqlens: object,
    batch_size: int,
    n_tokens: int,
    device: torch.device,
    *,
    host: torch.Tensor | Sequence[int] | None = None,
    inputs: str = "q",
) -> tuple[int, ...] | None:
    """The one ``cu_seqlens`` contract: offsets of sequences packed back to back in one row of
    ``n_tokens`` tokens (inputs ``[batch_size, n_tokens, ...]`` on ``device``).

    ``cu_seqlens`` must be a 1-D int32 / int64 tensor of at least two offsets on ``device``,
    come with ``batch_size == 1``, start at 0, end at ``n_tokens`` and never decrease (equal
    neighbours are empty sequences, allowed).

    The values are read from the device once (a sync on CUDA), unless ``host`` holds them
    already: the same offsets on the host (Python ints, as :class:`PackedDocuments` carries them,
    built once per model forward, or a CPU tensor, fla's ``cu_seqlens_cpu``). Then ``host`` is checked instead and the device is
    never touched; host offsets that differ from the tensor's are the caller's bug, which this
    check cannot see. ``inputs`` names the tensor the inputs' device is taken from (messages).

    Returns:
        The offsets as a tuple of ints; ``None`` for a meta tensor without ``host`` (no values).

    Raises:
        ValueError: naming ``cu_seqlens`` and what was expected.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(
            "cu_seqlens must be a 1-D int32 tensor of sequence offsets [0, ..., T], got "
            f"{type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in CU_SEQLENS_DTYPES:
        raise ValueError(
            f"cu_seqlens must have dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "cu_seqlens must be 1-D with at least two offsets [0, ..., T], got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if batch_size != 1:
        raise ValueError(
            "cu_seqlens needs the sequences packed in one row (B == 1), got batch size "
            f"{batch_size}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {inputs} is on {device}")
    if host is not None:
        offsets = tuple(host.tolist() if isinstance(host, torch.Tensor) else map(int, host))
        if len(offsets) != cu_seqlens.numel():
            raise ValueError(
                f"cu_seqlens_cpu must hold the {cu_seqlens.numel()} offsets of cu_seqlens, "
                f"got {len(offsets)}"
            )
    elif cu_seqlens.device.type == "meta":  # no values to check
        return None
    else:
        offsets = tuple(cu_seqlens.tolist())  # the one device -> host read
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T={n_tokens} (the packed length), got "
            f"{offsets[0]} ... {offsets[-1]}"
        )
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        if b < a:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got {a} then {b} at index {i + 1}"
            )
    return offsets


@dataclass(frozen=True)
class PackedDocuments:
    """Validated ``cu_seqlens`` with what the layers derive from it, built once per forward
    (:func:`packed_documents`) and passed to every layer in place of the tensor, so the offsets
    are read back to the host once, not once per layer.

    Attributes:
        cu_seqlens: the offsets ``[n_docs + 1]`` as given (on the inputs' device).
        offsets: the same offsets on the host.
        positions: ``[N]`` long, each token's position inside its document.
    """

    cu_seqlens: torch.Tensor
    offsets: tuple[int, ...]
    positions: torch.Tensor

    @property
    def spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` of every non-empty document."""
        return [(a, b) for a, b in zip(self.offsets[:-1], self.offsets[1:]) if b > a]


def packed_documents(
    cu_seqlens: Any, batch_size: int, n_tokens: int, device: torch.device
) -> PackedDocuments:
    """:class:`PackedDocuments` of ``cu_seqlens``: a tensor (checked by
    :func:`check_cu_seqlens`) or an already built :class:`PackedDocuments` (checked against the
    inputs' shape and device)."""
    if isinstance(cu_seqlens, PackedDocuments):
        if torch.compiler.is_compiling():
            # checked when built; reading the offsets here would make torch.compile guard on
            # them (a recompilation per document count)
            return cu_seqlens
        if batch_size != 1 or cu_seqlens.offsets[-1] != n_tokens:
            raise ValueError(
                f"cu_seqlens describes a pack of {cu_seqlens.offsets[-1]} tokens in one row, "
                f"got inputs [{batch_size}, {n_tokens}]"
            )
        if cu_seqlens.positions.device != device:
            raise ValueError(
                f"cu_seqlens is on {cu_seqlens.positions.device} but the inputs are on {device}"
            )
        return cu_seqlens
    offsets = check_cu_seqlens(cu_seqlens, batch_size, n_tokens, device, inputs="input_ids")
    if offsets is None:
        raise ValueError("cu_seqlens must hold values (a meta tensor has none)")
    return PackedDocuments(cu_seqlens, offsets, document_positions(offsets, device))


def check_attention_mask(
    attention_mask: Any, shape: tuple[int, int], device: torch.device, require_token: bool = False
) -> torch.Tensor:
    """Validate a left-padding mask of ``shape = (B, L)``; return the pad counts ``[B]`` (long).

    ``attention_mask`` holds ``1`` / ``True`` for real tokens and ``0`` / ``False`` for pads,
    bool or integer dtype, with every row's pads first (left padding). Right padding, holes and
    values other than 0 / 1 are refused (they would otherwise give silently wrong results).
    ``require_token``: every row must hold at least one real token.

    Raises:
        ValueError: naming ``attention_mask`` and what was expected.
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"attention_mask must be a torch.Tensor [B, L] of 0 (pad) / 1 (token), got {type(attention_mask).__name__}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(
            f"attention_mask must have a bool or integer dtype, got {attention_mask.dtype}"
        )
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask must have shape [B, L] = {list(shape)} (L counts the cached tokens "
            f"and this block's), got {list(attention_mask.shape)}"
        )
    if attention_mask.device != device:
        raise ValueError(
            f"attention_mask is on {attention_mask.device} but input_ids is on {device}"
        )
    mask = attention_mask
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask values must be 0 (pad) or 1 (token)")
        mask = mask.bool()
    if mask.shape[1] > 1:
        after_token = mask[:, :-1] & ~mask[:, 1:]  # a pad right after a token
        if bool(after_token.any()):
            row = int(after_token.any(dim=1).nonzero()[0])
            raise ValueError(
                f"attention_mask must be left-padded (every row's 0s before its 1s); row {row} has "
                "a 0 after a 1 (right padding or a hole). Pad prompts on the left "
                "(tokenizer padding_side='left')"
            )
    pads = (~mask).sum(dim=1)
    if require_token and bool((pads == mask.shape[1]).any()):
        row = int((pads == mask.shape[1]).nonzero()[0])
        raise ValueError(f"attention_mask row {row} holds no token (all pads)")
    return pads


def document_positions(
    offsets: list[int] | tuple[int, ...], device: torch.device | str | None = None
) -> torch.Tensor:
    """Position of every packed token inside its document: ``[N]`` long (restarts at 0)."""
    lengths = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])], device=device)
    starts = torch.tensor(offsets[:-1], device=device)
    return torch.arange(offsets[-1], device=device) - starts.repeat_interleave(lengths)


def padded_positions(pad_lengths: torch.Tensor, offset: int, T: int) -> torch.Tensor:
    """Per-row positions ``[B, T]`` of the block starting at absolute index ``offset`` in rows
    with ``pad_lengths [B]`` leading pads: ``index - pad``, clamped at 0 for the pads."""
    index = torch.arange(offset, offset + T, device=pad_lengths.device)
    return (index[None, :] - pad_lengths[:, None]).clamp(min=0)


def real_token_mask(pad_lengths: torch.Tensor, offset: int, T: int) -> torch.Tensor:
    """``[B, T]`` bool: which tokens of the block starting at absolute index ``offset`` are real."""
    index = torch.arange(offset, offset + T, device=pad_lengths.device)
    return index[None, :] >= pad_lengths[:, None]
