"""Decode caches of the hybrid model.

* A KDA layer holds a constant-size state per sequence: the fp32 recurrent state
  ``[B, H, K, V]`` and the last ``conv_size - 1`` pre-conv inputs of its q, k and v short
  convolutions (``[B, conv_size - 1, H * K]`` each).
* A server keeps the KDA states of all its live sequences in one :class:`KDAStatePool`
  ``[num_slots, H, K, V]`` addressed by slot (``ssm_state_indices``,
  :mod:`kimi_linear.ops.serving`).
* An MLA layer holds, per token, only the normalised latent ``c_kv`` (``kv_lora_rank``) and the
  shared rope key (``qk_rope_head_dim``): :class:`LatentKVCache`.

:class:`HybridCache` is the per-model list of those, plus the number of tokens already seen and,
for left-padded batches (:mod:`kimi_linear.packing`), the number of pads at the start of each
row (``pad_lengths``), so that every later block keeps the pads masked.
Its :meth:`HybridCache.nbytes` counts the bytes its tensors hold; with ``capacity`` equal to the
context it equals :meth:`KimiLinearConfig.kv_cache_bytes` exactly.
"""

from __future__ import annotations

import torch

from kimi_linear.config import KimiLinearConfig


class KDALayerCache:
    """Constant-size decode state of one KDA layer for ``batch_size`` sequences: conv tails
    ``conv_q``, ``conv_k`` ``[B, conv_size - 1, H * K]``, ``conv_v`` ``[B, conv_size - 1,
    HV * V]`` and the fp32 state ``[B, HV, K, V]`` (``HV = num_v_heads``, default
    ``num_heads``: GVA when larger)."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        conv_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        num_v_heads: int | None = None,
    ) -> None:
        HV = num_heads if num_v_heads is None else num_v_heads
        dim_k, dim_v = num_heads * head_k_dim, HV * head_v_dim
        w = conv_size - 1
        self.conv_q = torch.zeros(batch_size, w, dim_k, device=device, dtype=dtype)
        self.conv_k = torch.zeros(batch_size, w, dim_k, device=device, dtype=dtype)
        self.conv_v = torch.zeros(batch_size, w, dim_v, device=device, dtype=dtype)
        self.state = torch.zeros(
            batch_size, HV, head_k_dim, head_v_dim, device=device, dtype=torch.float32
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_q, self.conv_k, self.conv_v, self.state]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (in place), e.g. after sequences finish."""
        self.conv_q, self.conv_k, self.conv_v, self.state = (
            t.index_select(0, index) for t in self.tensors()
        )


class KDAStatePool:
    """A server's KDA recurrent states: ``state [num_slots, H, K, V]`` and a free list.

    The pool that :func:`kimi_linear.kernels.fused_recurrent_kda` and
    :func:`kimi_linear.backends.dispatch_decode_kda` address with ``ssm_state_indices`` (vLLM's convention,
    :mod:`kimi_linear.ops.serving`): :meth:`allocate` hands out slots for new sequences (or
    ``S`` per sequence for speculative decoding), :meth:`free` returns them, :meth:`store` /
    :meth:`load` copy states in and out (prefix caching: a stored intermediate state
    becomes a new sequence's starting state). Slots are zeroed when allocated.
    """

    def __init__(
        self,
        num_slots: int,
        num_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, n in (
            ("num_slots", num_slots),
            ("num_heads", num_heads),
            ("head_k_dim", head_k_dim),
            ("head_v_dim", head_v_dim),
        ):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.state = torch.zeros(
            num_slots, num_heads, head_k_dim, head_v_dim, device=device, dtype=dtype
        )
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> torch.Tensor:
        """``n`` free slots (int32, on the pool's device), zeroed.

        Raises:
            ValueError: fewer than ``n`` slots are free.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} state slots: {len(self._free)} are free")
        slots = [self._free.pop() for _ in range(n)]
        index = torch.tensor(slots, dtype=torch.int32, device=self.state.device)
        self.state[index.long()] = 0
        return index

    def free(self, slots: torch.Tensor) -> None:
        """Return ``slots`` to the pool (negative entries, padding, are ignored).

        Raises:
            ValueError: a slot out of range or not allocated.
        """
        values = [s for s in torch.as_tensor(slots).flatten().tolist() if s >= 0]
        free = set(self._free)
        for s in values:
            if s >= self.state.shape[0] or s in free:
                raise ValueError(f"slot {s} is not an allocated slot of this pool")
            free.add(s)
        self._free.extend(values)

    def store(self, slots: torch.Tensor, states: torch.Tensor) -> None:
        """Copy ``states [n, H, K, V]`` into ``slots [n]`` (cast to the pool's dtype)."""
        self.state[torch.as_tensor(slots, device=self.state.device).long()] = states.to(
            self.state.dtype
        )

    def load(self, slots: torch.Tensor) -> torch.Tensor:
        """A copy of the states in ``slots [n]``: ``[n, H, K, V]``."""
        return self.state[torch.as_tensor(slots, device=self.state.device).long()].clone()

    def nbytes(self) -> int:
        return self.state.numel() * self.state.element_size()


class LatentKVCache:
    """Per-token MLA cache: latent ``[B, L, kv_lora_rank]`` and rope key ``[B, L, rope_dim]``.

    Storage is preallocated to ``capacity`` tokens and grows (doubling) when exceeded, so a
    decode step appends without reallocating.
    """

    def __init__(
        self,
        batch_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        capacity: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.latent = torch.zeros(batch_size, capacity, kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(batch_size, capacity, rope_dim, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.latent.shape[1]

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity, 16)
        B, _, R = self.latent.shape
        latent = self.latent.new_zeros(B, new_cap, R)
        k_rope = self.k_rope.new_zeros(B, new_cap, self.k_rope.shape[-1])
        latent[:, : self.length] = self.latent[:, : self.length]
        k_rope[:, : self.length] = self.k_rope[:, : self.length]
        self.latent, self.k_rope = latent, k_rope

    def append(
        self, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``latent [B, t, R]`` and ``k_rope [B, t, P]``; return all cached ``[B, L, *]``."""
        B, t, R = latent.shape
        if B != self.latent.shape[0] or R != self.latent.shape[2]:
            raise ValueError(
                f"latent must be [B={self.latent.shape[0]}, t, R={self.latent.shape[2]}], got {tuple(latent.shape)}"
            )
        if k_rope.shape != (B, t, self.k_rope.shape[2]):
            raise ValueError(
                f"k_rope must be [{B}, {t}, {self.k_rope.shape[2]}], got {tuple(k_rope.shape)}"
            )
        end = self.length + t
        if end > self.capacity:
            self._grow(end)
        self.latent[:, self.length : end] = latent.to(self.latent.dtype)
        self.k_rope[:, self.length : end] = k_rope.to(self.k_rope.dtype)
        self.length = end
        return self.latent[:, :end], self.k_rope[:, :end]

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent, self.k_rope]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (in place): latents and rope keys alike."""
        self.latent = self.latent.index_select(0, index)
        self.k_rope = self.k_rope.index_select(0, index)


class HybridCache:
    """All layers' decode caches of one model, in layer order, and the tokens seen so far.

    Attributes:
        seq_len: tokens per row seen so far (pads included).
        pad_lengths: ``None``, or ``[B]`` long: how many of each row's first tokens are left
            padding (set by a forward with ``attention_mask``; the model keeps those tokens
            out of every layer's state and attention).
    """

    def __init__(self, layers: list[KDALayerCache | LatentKVCache]) -> None:
        self.layers = layers
        self.seq_len = 0
        self.pad_lengths: torch.Tensor | None = None

    @classmethod
    def from_config(
        cls,
        config: KimiLinearConfig,
        batch_size: int,
        capacity: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> HybridCache:
        """Empty caches for ``batch_size`` sequences; MLA layers preallocate ``capacity`` tokens.

        ``dtype`` is that of the conv tails and the MLA latents; KDA states are always fp32.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        layers: list[KDALayerCache | LatentKVCache] = []
        for kind in config.layer_kinds:
            if kind == "kda":
                layers.append(
                    KDALayerCache(
                        batch_size,
                        config.kda_num_heads,
                        config.kda_head_dim,
                        config.kda_head_dim,
                        config.kda_conv_size,
                        device=device,
                        dtype=dtype,
                        num_v_heads=config.kda_value_heads,
                    )
                )
            else:
                layers.append(
                    LatentKVCache(
                        batch_size,
                        config.kv_lora_rank,
                        config.qk_rope_head_dim,
                        capacity,
                        device=device,
                        dtype=dtype,
                    )
                )
        return cls(layers)

    @property
    def batch_size(self) -> int:
        first = self.layers[0]
        return (first.state if isinstance(first, KDALayerCache) else first.latent).shape[0]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def index_select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` of every layer (in place), e.g. to drop finished
        sequences from a batch being decoded; ``index`` is a 1-D long tensor of row numbers."""
        if (
            not isinstance(index, torch.Tensor)
            or index.dim() != 1
            or index.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(f"index must be a 1-D integer tensor of batch rows, got {index!r}")
        for layer in self.layers:
            layer.index_select(index)
        if self.pad_lengths is not None:
            self.pad_lengths = self.pad_lengths.index_select(0, index)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> KDALayerCache | LatentKVCache:
        return self.layers[i]
