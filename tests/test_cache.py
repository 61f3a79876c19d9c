"""Cache objects: sizes equal the analytic formula, append/grow semantics, errors."""

import pytest
import torch

from kimi_linear.cache import HybridCache, KDALayerCache, LatentKVCache
from kimi_linear.config import KimiLinearConfig


@pytest.mark.parametrize("dtype,nbytes", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_hybrid_cache_bytes_equal_analytic(dtype, nbytes):
    cfg = KimiLinearConfig.from_preset("tiny")
    for seq_len, batch in [(0, 1), (100, 2), (4096, 3)]:
        cache = HybridCache.from_config(cfg, batch, capacity=seq_len, dtype=dtype)
        expected = cfg.kv_cache_bytes(seq_len, batch, cache_dtype_bytes=nbytes)["total"]
        assert cache.nbytes() == expected


def test_latent_cache_append_and_grow():
    c = LatentKVCache(2, kv_lora_rank=8, rope_dim=4, capacity=3)
    lat, rope = torch.randn(2, 2, 8), torch.randn(2, 2, 4)
    a, b = c.append(lat, rope)
    assert a.shape == (2, 2, 8) and b.shape == (2, 2, 4)
    lat2, rope2 = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    a, b = c.append(lat2, rope2)
    assert c.length == 7 and c.capacity >= 7
    torch.testing.assert_close(a, torch.cat([lat, lat2], 1))
    torch.testing.assert_close(b, torch.cat([rope, rope2], 1))
    with pytest.raises(ValueError, match="latent"):
        c.append(torch.randn(3, 1, 8), torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match="k_rope"):
        c.append(torch.randn(2, 1, 8), torch.randn(2, 1, 5))


def test_index_select_keeps_rows():
    cfg = KimiLinearConfig.from_preset("tiny")
    cache = HybridCache.from_config(cfg, 3, capacity=4)
    for layer in cache.layers:
        for t in layer.tensors():
            t.copy_(torch.arange(3, dtype=t.dtype).view(3, *([1] * (t.dim() - 1))).expand_as(t))
    cache.index_select(torch.tensor([2, 0]))
    assert cache.batch_size == 2
    kda = next(layer for layer in cache.layers if isinstance(layer, KDALayerCache))
    assert kda.state[0].eq(2).all() and kda.state[1].eq(0).all()


def test_from_config_rejects_bad_sizes():
    cfg = KimiLinearConfig.from_preset("tiny")
    with pytest.raises(ValueError, match="batch_size"):
        HybridCache.from_config(cfg, 0)
    with pytest.raises(ValueError, match="capacity"):
        HybridCache.from_config(cfg, 1, capacity=-1)
