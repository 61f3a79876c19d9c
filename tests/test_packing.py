"""Document packing (``cu_seqlens``): every document is computed as if it were alone.

The packed forward of documents of lengths 1, 5, 64, 65 and 130 (a single token, one shorter
than a KDA chunk, exactly one chunk, one past it, several chunks) is compared with the
separate forwards of the documents, logits and every parameter gradient, for KDA-only, hybrid
and RoPE-MLA models; the layer-level paths and the argument checks are tested too.
"""

import pytest
import torch
import torch.nn.functional as F
from test_model import make_model

from kimi_linear.layers.mla import MLAttention
from kimi_linear.packing import check_cu_seqlens, document_positions, packed_documents
from kimi_linear.testing import assert_rel_close

LENGTHS = [1, 5, 64, 65, 130]
# (model kind, config overrides): KDA-only, hybrid (NoPE MLA, as released), RoPE MLA (K2-style)
MODELS = {
    "kda": ("kda", {}),
    "hybrid": ("hybrid", {}),
    "hybrid-rope": ("hybrid", {"mla_use_nope": False}),
    "mla-rope": ("mla", {"mla_use_nope": False}),
}


def _docs(vocab: int, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_forward_and_gradients_equal_separate_documents(name):
    kind, overrides = MODELS[name]
    model = make_model(kind, **overrides)
    docs = _docs(model.config.vocab_size, LENGTHS)
    ids = torch.cat(docs)[None]  # [1, N]
    cu = _offsets(LENGTHS)

    packed = model(ids, labels=ids, cu_seqlens=cu)
    packed.loss.backward()
    packed_grads = _grads(model)

    # reference: each document alone; the loss is the same mean over all scored targets
    scored = sum(n - 1 for n in LENGTHS)
    logits, total = [], torch.zeros(())
    for doc in docs:
        out = model(doc[None])
        logits.append(out)
        if doc.numel() > 1:
            total = total + F.cross_entropy(out[0, :-1], doc[1:], reduction="sum")
    (total / scored).backward()
    separate_grads = _grads(model)

    torch.testing.assert_close(packed.logits, torch.cat(logits, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.loss, total / scored, atol=1e-6, rtol=1e-6)
    assert packed_grads.keys() == separate_grads.keys() and len(packed_grads) > 10
    for n in packed_grads:
        torch.testing.assert_close(
            packed_grads[n], separate_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_no_label_is_scored_across_a_boundary():
    """A document's first token is never a target (of the previous document's last token)."""
    model = make_model("hybrid")
    docs = _docs(model.config.vocab_size, [6, 9])
    ids = torch.cat(docs)[None]
    cu = _offsets([6, 9])
    labels = ids.clone()
    labels[0, :6] = -100  # score only the second document
    base = model(ids, labels=labels, cu_seqlens=cu).loss
    alone = model(docs[1][None], labels=docs[1][None]).loss
    torch.testing.assert_close(base, alone, atol=1e-6, rtol=1e-6)
    # the first document's last position would predict the second's first token: not scored
    labels = ids.clone()
    labels[0, 7:] = -100
    labels[0, :6] = -100  # left: the target at index 6 (the second document's first token)
    loss = model(ids, labels=labels, cu_seqlens=cu).loss
    assert loss.item() == 0.0  # no target left: zero loss


def test_empty_documents_and_single_document():
    model = make_model("hybrid")
    docs = _docs(model.config.vocab_size, [7, 3])
    ids = torch.cat(docs)[None]
    cu = torch.tensor([0, 0, 7, 7, 10, 10], dtype=torch.int32)  # empty documents around
    with torch.no_grad():
        got = model(ids, cu_seqlens=cu)
        ref = torch.cat([model(d[None]) for d in docs], dim=1)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        one = model(ids, cu_seqlens=torch.tensor([0, 10], dtype=torch.int64))
        torch.testing.assert_close(one, model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_nope", [True, False])
def test_mla_layer_packed_plain_and_absorbed_paths(use_nope):
    model = make_model("mla", mla_use_nope=use_nope)
    layer: MLAttention = model.model.layers[0].self_attn
    lengths = [3, 1, 17, 9]
    x = torch.randn(
        1, sum(lengths), model.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    cu = _offsets(lengths)
    with torch.no_grad():
        ref = torch.cat([layer(part) for part in x.split(lengths, dim=1)], dim=1)
        plain = layer(x, cu_seqlens=cu, absorb=False)
        absorbed = layer(x, cu_seqlens=cu, absorb=True)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(absorbed, ref, atol=1e-5, rtol=1e-5)


def test_mla_max_logits_stay_inside_documents():
    """QK-Clip's statistic over a pack equals the max over the documents alone."""
    model = make_model("mla")
    layer: MLAttention = model.model.layers[0].self_attn
    lengths = [4, 11]
    x = torch.randn(1, 15, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    layer.train()
    layer.record_max_logits = True
    alone = []
    for part in x.split(lengths, dim=1):
        layer.reset_max_logits()
        layer(part)
        alone.append(layer.max_logits)
    for absorb in (False, True):
        layer.reset_max_logits()
        layer(x, cu_seqlens=_offsets(lengths), absorb=absorb)
        torch.testing.assert_close(layer.max_logits, torch.maximum(*alone), atol=1e-5, rtol=1e-5)


def test_positions_restart_and_limit_counts_per_document():
    assert document_positions([0, 2, 2, 5]).tolist() == [0, 1, 0, 1, 2]
    model = make_model("hybrid", max_position_embeddings=8, mla_use_nope=False)
    ids = torch.zeros(1, 12, dtype=torch.long)
    out = model(ids, cu_seqlens=torch.tensor([0, 6, 12], dtype=torch.int32))  # 6 <= 8 each
    assert out.shape == (1, 12, model.config.vocab_size)
    with pytest.raises(ValueError, match="longest document.*max_position_embeddings=8"):
        model(ids, cu_seqlens=torch.tensor([0, 3, 12], dtype=torch.int32))


@pytest.mark.parametrize(
    "cu, match",
    [
        ([0, 3, 10], "start at 0 and end at T=8"),
        ([1, 8], "start at 0"),
        ([0, 5, 3, 8], "non-decreasing"),
        ([0], "at least two offsets"),
    ],
)
def test_bad_cu_seqlens_values(cu, match):
    model = make_model("hybrid")
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        model(ids, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_bad_cu_seqlens_arguments():
    model = make_model("hybrid")
    ids = torch.zeros(1, 8, dtype=torch.long)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must have dtype torch.int32"):
        model(ids, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="cu_seqlens must have dtype torch.int32"):
        model(ids, cu_seqlens=cu.bool())
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        model(ids, cu_seqlens=cu[None])
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32 tensor"):
        model(ids, cu_seqlens=[0, 8])
    with pytest.raises(ValueError, match="packed in one row.*batch size 2"):
        model(ids.expand(2, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens.*cannot be combined with a cache"):
        model(ids, cu_seqlens=cu, cache=model.new_cache(1))
    with pytest.raises(ValueError, match="cu_seqlens and attention_mask cannot be combined"):
        model(ids, cu_seqlens=cu, attention_mask=torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens is on meta"):
        check_cu_seqlens(cu.to("meta"), 1, 8, torch.device("cpu"))
    layer = model.model.layers[1].self_attn  # MLA: the layer checks on its own too
    x = torch.randn(1, 8, model.config.hidden_size)
    with pytest.raises(ValueError, match="cannot continue a cache"):
        layer(x, cu_seqlens=cu, position_offset=3)


def test_rope_positions_restart_per_document_and_count_from_the_first_real_token():
    """RoPE scores depend on relative positions only, so the attention output cannot show where
    positions start; the rotation itself must (absolute positions matter for precision at long
    context and for max_position_embeddings)."""
    model = make_model("mla", mla_use_nope=False)
    layer: MLAttention = model.model.layers[0].self_attn
    P, H = layer.rope_dim, layer.num_heads
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 9, H, P, generator=gen), torch.randn(1, 9, P, generator=gen)
    packed = packed_documents(torch.tensor([0, 4, 9]), 1, 9, q.device)
    q_doc, k_doc = layer._rotate(q, k, 0, packed=packed)
    q_ref, k_ref = zip(*(layer._rotate(q[:, a:b], k[:, a:b], 0) for a, b in ((0, 4), (4, 9))))
    torch.testing.assert_close(q_doc, torch.cat(q_ref, 1))
    torch.testing.assert_close(k_doc, torch.cat(k_ref, 1))
    # left pads: row 1 has 3 pads, so its token at index 3 + t sits at position t
    q2, k2 = q.expand(2, -1, -1, -1), k.expand(2, -1, -1)
    q_pad, k_pad = layer._rotate(q2, k2, 0, pad_lengths=torch.tensor([0, 3]))
    q_row, k_row = layer._rotate(q[:, 3:], k[:, 3:], 0)
    torch.testing.assert_close(q_pad[1, 3:], q_row[0])
    torch.testing.assert_close(k_pad[1, 3:], k_row[0])
    torch.testing.assert_close(k_pad[0], layer._rotate(q, k, 0)[1][0])
    # with a cache offset, a decode token of row 1 at index 9 sits at position 6
    q1, k1 = q2[:, :1], k2[:, :1]
    _, k_dec = layer._rotate(q1, k1, 9, pad_lengths=torch.tensor([0, 3]))
    torch.testing.assert_close(k_dec[1], layer._rotate(q1[:1], k1[:1], 6)[1][0])


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("triton", marks=pytest.mark.slow)],  # interpreter: ~10 s
)
def test_kda_layer_packed_equals_separate_through_the_backend_entry(backend):
    """The layer's varlen path (conv restart + the backend's cu_seqlens) on the torch ops and
    on the Triton kernels (interpreter on CPU), forward and input gradient."""
    model = make_model("kda")
    layer = model.model.layers[0].self_attn
    layer.backend = backend
    lengths = [1, 5, 20]
    x = torch.randn(
        1, sum(lengths), model.config.hidden_size, generator=torch.Generator().manual_seed(2)
    )
    x.requires_grad_(True)
    packed = layer(x, cu_seqlens=_offsets(lengths))
    (gp,) = torch.autograd.grad(packed.square().sum(), x)
    parts = [layer(part) for part in x.split(lengths, dim=1)]
    ref = torch.cat(parts, dim=1)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gp, gr, atol=1e-5, rtol=1e-5)


def test_packed_conv_equals_per_document_conv():
    from kimi_linear.layers.kda import causal_conv1d, causal_conv1d_packed

    gen = torch.Generator().manual_seed(4)
    lengths = [1, 2, 3, 7]
    x, w = torch.randn(1, 13, 6, generator=gen), torch.randn(6, 1, 4, generator=gen)
    got = causal_conv1d_packed(x, w, document_positions([0, 1, 3, 6, 13]))
    ref = torch.cat([causal_conv1d(part, w)[0] for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(got, ref)


def _conv_reference(x: torch.Tensor, w: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """float64 depthwise causal conv of each document alone (zero history), by F.conv1d."""
    W = w.shape[-1]
    parts = [
        F.conv1d(F.pad(part.double().transpose(1, 2), (W - 1, 0)), w.double(), groups=w.shape[0])
        for part in x.split(lengths, dim=1)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)


def _assert_rounded_once(got: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """``got`` (bf16) is float64 ``ref`` rounded once: within half a bf16 spacing of it (plus
    2^-20 relative for an fp32 accumulation's own error); chains of bf16 roundings are not."""
    _, exp = torch.frexp(ref)
    spacing = torch.ldexp(torch.ones_like(ref), exp - 8)  # bf16: 8 significant bits
    err = (got.double() - ref).abs()
    bad = err > 0.5 * spacing + 2**-20 * ref.abs() + 1e-30
    assert not bad.any(), f"{name}: {int(bad.sum())} of {bad.numel()} values not rounded once"


def test_conv_accumulates_in_fp32_and_both_layouts_agree_bitwise():
    """The short convolution sums its taps in fp32 and rounds once, in the packed layout as in
    the batch one: inputs ``2^-9, 2^-9, 2^-9, 1`` (weights 1) give bf16 ``1 + 2^-7`` (the sum
    ``1 + 3 * 2^-9`` rounded), not 1 (each partial sum from the current token back rounded to
    bf16, as multiply-adds in bf16 do); random bf16 rows agree bit for bit between ``[B, T]``
    and ``[1, B * T]`` with ``cu_seqlens``, and are the float64 result rounded once."""
    from kimi_linear.layers.kda import causal_conv1d, causal_conv1d_packed

    x = torch.tensor([2**-9, 2**-9, 2**-9, 1.0], dtype=torch.bfloat16).view(1, 4, 1)
    w = torch.ones(1, 1, 4, dtype=torch.bfloat16)
    expected = torch.tensor(1 + 2**-7, dtype=torch.bfloat16)
    assert causal_conv1d_packed(x, w, document_positions([0, 4]))[0, -1, 0] == expected
    assert causal_conv1d(x, w)[0][0, -1, 0] == expected

    gen = torch.Generator().manual_seed(6)
    B, T, D = 3, 37, 16
    x = torch.randn(B, T, D, generator=gen).bfloat16()
    w = (0.5 * torch.randn(D, 1, 4, generator=gen)).bfloat16()
    batch, _ = causal_conv1d(x, w)
    offsets = list(range(0, B * T + 1, T))
    packed = causal_conv1d_packed(x.reshape(1, B * T, D), w, document_positions(offsets))
    assert torch.equal(packed.view(B, T, D), batch)
    ref = _conv_reference(x.reshape(1, B * T, D), w, [T] * B).view(B, T, D)
    _assert_rounded_once(batch, ref, "y")


def test_packed_conv_gradients_accumulate_in_fp32():
    """bf16 gradients of the packed short convolution, input and weight (the weight's summed
    over every token), are the float64 gradients rounded once; fp32 ones agree with float64
    to fp32 accuracy."""
    from kimi_linear.layers.kda import causal_conv1d_packed

    gen = torch.Generator().manual_seed(7)
    lengths = [1, 2, 9, 200]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    x0 = torch.randn(1, sum(lengths), 8, generator=gen)
    w0, dy = torch.randn(8, 1, 4, generator=gen), torch.randn(1, sum(lengths), 8, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        x, w = (t.to(dtype).requires_grad_() for t in (x0, w0))
        got = causal_conv1d_packed(x, w, document_positions(offsets))
        dx, dw = torch.autograd.grad(got, (x, w), dy.to(dtype))
        assert dx.dtype == dtype and dw.dtype == dtype and dw.shape == w.shape
        x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
        ref = _conv_reference(x64, w64, lengths)
        rx, rw = torch.autograd.grad(ref, (x64, w64), dy.to(dtype).double())
        for name, a, b in (("y", got, ref), ("dx", dx, rx), ("dw", dw, rw)):
            if dtype == torch.bfloat16:
                _assert_rounded_once(a, b, name)
            else:
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_bf16_batch_and_packed_rows_agree_at_fla_bar():
    """fla's model test: the same rows as a ``[B, T]`` batch and packed ``[1, B * T]`` with
    ``cu_seqlens`` give the same hidden states in bf16 (relative 1e-3 after 4 layers; it was
    2.6e-2 with the packed convolution's bf16 multiply-adds)."""
    from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM

    torch.manual_seed(0)
    config = KimiLinearConfig.from_preset("tiny")  # 4 layers: 3 KDA, 1 MLA; MoE
    assert config.num_hidden_layers == 4
    model = KimiLinearForCausalLM(config).to(torch.bfloat16).eval()
    B, T = 3, 100
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    with torch.no_grad():
        batch = model.model(ids)
        packed = model.model(ids.reshape(1, B * T), cu_seqlens=cu).view(B, T, -1)
    assert_rel_close(packed, batch, 1e-3, "hidden states (packed vs batch, bf16)")


def test_layer_level_layout_arguments_are_checked():
    model = make_model("hybrid")
    kda, mla = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    x = torch.randn(2, 5, model.config.hidden_size)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention_mask must be a bool tensor \\[B, T\\]"):
        kda(x, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be a bool tensor \\[B, T\\]"):
        kda(x, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seqlens.*cannot continue a cache"):
        kda(x[:1], cu_seqlens=cu, cache=model.new_cache(1).layers[0])
    with pytest.raises(ValueError, match="cu_seqlens and attention_mask cannot be combined"):
        kda(x[:1], cu_seqlens=cu, attention_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed in one row"):
        kda(x, cu_seqlens=cu)
    with pytest.raises(ValueError, match="pad_lengths must be a torch.long tensor \\[B=2\\]"):
        mla(x, pad_lengths=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="cu_seqlens and pad_lengths cannot be combined"):
        mla(x[:1], cu_seqlens=cu, pad_lengths=torch.tensor([0]))


def test_packed_documents_are_built_once_and_checked_when_reused():
    cu = torch.tensor([0, 0, 3, 7], dtype=torch.int32)
    packed = packed_documents(cu, 1, 7, torch.device("cpu"))
    assert packed.offsets == (0, 0, 3, 7) and packed.spans == [(0, 3), (3, 7)]
    assert packed.positions.tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert packed_documents(packed, 1, 7, torch.device("cpu")) is packed
    with pytest.raises(ValueError, match="cu_seqlens describes a pack of 7 tokens.*\\[1, 8\\]"):
        packed_documents(packed, 1, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="cu_seqlens is on cpu but the inputs are on meta"):
        packed_documents(packed, 1, 7, torch.device("meta"))
    model = make_model("hybrid")  # the layers take it in place of the tensor
    ids = torch.randint(
        0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(8)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.model(ids, cu_seqlens=packed), model.model(ids, cu_seqlens=cu)
        )


def test_mla_packed_under_torch_compile_uses_one_graph_for_any_packing():
    """Traced by torch.compile, the MLA layer takes the block-diagonal-mask path: no Python
    loop over documents, so a new document count does not recompile, and the result (output and
    QK-Clip statistic) equals the eager per-document path."""
    import torch._dynamo

    model = make_model("mla", mla_use_nope=False)
    layer: MLAttention = model.model.layers[0].self_attn
    layer.train()
    layer.record_max_logits = True
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(1, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    for i, lengths in enumerate([[3, 21], [1, 5, 8, 10], [24]]):
        packed = packed_documents(_offsets(lengths), 1, 24, x.device)
        layer.reset_max_logits()
        eager = layer(x, cu_seqlens=packed)
        eager_max = layer.max_logits
        layer.reset_max_logits()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(x, cu_seqlens=packed)
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.max_logits, eager_max, atol=1e-5, rtol=1e-5)


def _count_offset_reads(monkeypatch, cu: torch.Tensor) -> dict[str, int]:
    """Count the reads of ``cu``'s values back to the host (``tolist`` / ``item`` / ``cpu`` /
    ``numpy`` on ``cu`` or any tensor sharing its memory): a device sync each on CUDA."""
    reads = {"n": 0}
    for name in ("tolist", "item", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if self.device == cu.device and self.untyped_storage().data_ptr() == cu.data_ptr():
                reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_cu_seqlens_is_read_once_per_model_forward(monkeypatch, backend):
    """The model checks cu_seqlens once per forward and hands the host offsets down: no KDA
    layer (three here) reads the offsets back from the device, forward or backward."""
    model = make_model("kda", num_hidden_layers=3, layer_types=("kda",) * 3, kda_backend=backend)
    lengths = [3, 9, 4]
    ids = torch.cat(_docs(model.config.vocab_size, lengths))[None]
    cu = _offsets(lengths)
    reads = _count_offset_reads(monkeypatch, cu)
    out = model(ids, labels=ids, cu_seqlens=cu)
    assert reads["n"] == 1, f"{reads['n']} reads of cu_seqlens in one forward of 3 KDA layers"
    out.loss.backward()
    assert reads["n"] == 1, "the backward read cu_seqlens back from the device"


def test_host_offsets_reach_the_ops_unread_and_agree(monkeypatch):
    """The dispatcher hands ``cu_seqlens_cpu`` to the op: the same results, no device read; the
    host offsets are checked like the tensor (the one contract, check_cu_seqlens)."""
    from kimi_linear.backends import dispatch_chunk_kda
    from kimi_linear.ops import torch_chunk_kda

    gen = torch.Generator().manual_seed(3)
    T, H, K = 19, 2, 8
    q, k = (F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(1, T, H, K, generator=gen)
    g = -torch.rand(1, T, H, K, generator=gen)
    beta = torch.rand(1, T, H, generator=gen)
    cu = _offsets([5, 0, 14])
    ref, ref_state = torch_chunk_kda(q, k, v, g, beta, cu_seqlens=cu, output_final_state=True)
    reads = _count_offset_reads(monkeypatch, cu)
    o, state = dispatch_chunk_kda(
        q, k, v, g, beta, backend="torch", cu_seqlens=cu, cu_seqlens_cpu=(0, 5, 5, 19),
        output_final_state=True, chunk_size=32,
    )  # fmt: skip
    assert reads["n"] == 0
    torch.testing.assert_close(o, ref, rtol=0, atol=0)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=19"):
        torch_chunk_kda(q, k, v, g, beta, cu_seqlens=cu, cu_seqlens_cpu=(0, 5, 5, 18))
    with pytest.raises(ValueError, match="cu_seqlens_cpu must hold the 4 offsets"):
        torch_chunk_kda(q, k, v, g, beta, cu_seqlens=cu, cu_seqlens_cpu=(0, 19))
    assert check_cu_seqlens(cu, 1, 19, cu.device) == (0, 5, 5, 19)
