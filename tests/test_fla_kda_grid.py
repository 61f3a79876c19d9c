"""fla's ``tests/ops/test_kda.py`` parameter grid through our kernels (issue 26).

Every case of fla's KDA op tests (fla-org/flash-linear-attention, ``tests/ops/test_kda.py``)
is listed here with fla's parameters, fla's references (``fla.ops.kda.naive``,
``fla.ops.kda.gate``) as ground truth, fla's tolerance function (``fla.utils.assert_close``:
RMS error over RMS reference) and tolerances, and our kernels called with fla's exact keyword
signature (``kimi_linear.kernels.chunk_kda`` / ``fused_recurrent_kda`` in place of fla's).

Sizes are reduced for the CPU (the kernels run under ``TRITON_INTERPRET=1``): ``tiny`` for the
default suite (one chunk boundary and a tail, small heads), ``reduced`` for the ``slow`` pass
(:func:`_reduced`: ``T`` cut to at most 160 tokens with a partial last chunk, ``D`` halved above
64, at most 2 (key) heads, batch at most 2; the head ratio ``HV / H`` and everything else as fla
has it; the varlen rows keep fla's 4 heads and cut each sequence, :func:`_reduce_cu`). fla
checks ``dA`` (the ``A_log`` gradient) with ``warning=True`` only; so do we (with 16-bit
inputs it sums ``dg * g`` over every token of a head and can cancel: 1-5% here; exact to about
1e-4 with fp32 inputs; the cause, the main backward's 16-bit ``dg`` error times the
cancellation, and the bar that holds are in :func:`test_chunk_gate_param_grads`). Cases that need a GPU-only backend of fla (FlashKDA, Ascend NPU routing) are marked
not applicable with the reason.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from fla.ops.kda import chunk_kda as fla_chunk_kda
from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
from fla.ops.kda.naive import naive_recurrent_kda
from fla.utils import assert_close
from kimi_linear.kernels import chunk_kda, fused_recurrent_kda

from kimi_linear.ops import torch_chunk_kda
from kimi_linear.ops.gate import kda_gate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _reduced(B: int, T: int, H: int, HV: int, D: int) -> tuple[int, int, int, int, int]:
    """fla's sizes cut for the interpreter, keeping the head ratio and odd lengths / dims."""
    G = HV // H
    Hr = min(H, 2)
    Tr = T if T <= 160 else 96 + T % 64 + 1
    Dr = D if D <= 64 else D // 2
    return min(B, 2), Tr, Hr, Hr * G, Dr


def _tiny(B: int, T: int, H: int, HV: int, D: int) -> tuple[int, int, int, int, int]:
    """The default suite's sizes: one batch row, 70 tokens (a chunk boundary and a tail)."""
    G = HV // H
    return 1, min(T, 70), 1, G, min(D, 32)


def _grads(tensors):
    out = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def _run_chunk_case(
    B, T, H, HV, D, scale, normalizer, mask_p, l2, gate, dtype, safe, recompute, cs
):
    """fla's ``test_chunk`` body, rewritten: reference and ours on the same leaves."""
    torch.manual_seed(42)
    q = torch.rand(B, T, H, D, dtype=dtype)
    k = torch.rand(B, T, H, D, dtype=dtype)
    v = torch.rand(B, T, HV, D, dtype=dtype)
    g = torch.randn(B, T, HV, D, dtype=dtype if gate else torch.float)
    A_log = dt_bias = None
    if gate:
        A_log = torch.randn(HV).requires_grad_(True)
        dt_bias = torch.randn(HV * D).requires_grad_(True)
    else:
        g = F.logsigmoid(g) / normalizer
        g = g * (torch.rand_like(g) > mask_p)
    lower_bound = -5.0 if safe else None
    if safe and not gate:
        g = g.clamp(-5, 0)
    beta = torch.randn(B, T, HV, dtype=dtype).sigmoid()
    h0 = torch.randn(B, HV, D, D)
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    params = [p for p in (A_log, dt_bias) if p is not None]
    do, dht = torch.randn_like(v), torch.randn_like(h0)

    if gate:
        decay = (
            naive_kda_lowerbound_gate(g, A_log, dt_bias, lower_bound=lower_bound)
            if safe
            else naive_kda_gate(g, A_log, dt_bias)
        )
    else:
        decay = g
    ref, ref_ht = naive_recurrent_kda(
        q=F.normalize(q, p=2, dim=-1),
        k=F.normalize(k, p=2, dim=-1),
        v=v,
        g=decay,
        beta=beta,
        scale=scale,
        initial_state=h0,
        output_final_state=True,
    )
    ((ref * do).sum() + (ref_ht * dht).sum()).backward(retain_graph=True)
    expected = _grads(leaves + params)

    tri, tri_ht = chunk_kda(
        q=F.normalize(q, p=2, dim=-1) if not l2 else q.clone(),
        k=F.normalize(k, p=2, dim=-1) if not l2 else k.clone(),
        v=v.clone(),
        g=g.clone(),
        beta=beta.clone(),
        A_log=(A_log.clone() if gate else None),
        dt_bias=(dt_bias.clone() if gate else None),
        scale=scale,
        initial_state=h0.clone(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=l2,
        use_gate_in_kernel=gate,
        safe_gate=safe,
        lower_bound=lower_bound,
        disable_recompute=recompute,
        chunk_size=cs,
    )
    ((tri * do).sum() + (tri_ht * dht).sum()).backward(retain_graph=True)
    got = _grads(leaves + params)

    assert_close("o", ref, tri, 0.005)
    assert_close("ht", ref_ht, tri_ht, 0.005)
    # fla's tolerances; fla checks dA with warning=True (16-bit inputs: dA sums dg * g over
    # every token of a head and can cancel; exact to ~1e-4 with fp32 inputs)
    tols = dict(dq=0.008, dk=0.008, dv=0.008, dg=0.02, db=0.02, dh0=0.008, dA=0.003, dbias=0.008)
    for name, e, t in zip(tols, expected, got):
        assert_close(name, e, t, tols[name], warning=name == "dA")


# fla's test_chunk rows: B, T, H, HV, D, scale, gate_logit_normalizer, mask_p,
# use_qk_l2norm_in_kernel, use_gate_in_kernel, dtype, safe_gate, disable_recompute, chunk_size
_F16, _BF16 = torch.float16, torch.bfloat16
CHUNK_GRID = [
    (1, 63, 1, 1, 64, 1, 1, 0, False, False, _F16, True, False, 64),
    (2, 500, 3, 3, 60, 1, 1, 0, False, False, _F16, True, True, 64),
    (2, 1000, 3, 3, 64, 0.1, 1, 0.5, False, False, _F16, False, True, 64),
    (3, 1024, 4, 4, 100, 1, 0.1, 0, False, False, _F16, False, False, 64),
    (4, 1024, 4, 4, 128, 0.1, 1, 0, False, False, _F16, True, True, 64),
    (4, 1024, 4, 4, 128, 0.1, 1, 0, True, False, _F16, True, False, 64),
    (2, 1500, 4, 4, 128, 0.1, 10, 0, False, True, _F16, False, True, 64),
    (4, 2048, 8, 8, 64, 0.1, 1, 0, False, True, _F16, True, True, 64),
    (2, 1024, 2, 4, 64, 0.1, 1, 0, False, False, _F16, False, False, 64),
    (2, 1024, 2, 8, 64, 0.1, 1, 0, False, True, _F16, False, False, 64),
    (2, 1024, 4, 8, 128, 0.1, 1, 0, True, True, _F16, False, False, 64),
    (2, 160, 2, 4, 64, 0.1, 1, 0, False, True, _F16, True, True, 32),
    (2, 1024, 2, 4, 64, 0.1, 1, 0, True, True, _BF16, True, False, 64),
    (2, 1024, 2, 4, 64, 0.1, 1, 0, False, True, _BF16, False, False, 64),
    (2, 160, 2, 4, 64, 0.1, 1, 0, False, True, _BF16, True, True, 32),
    (2, 1024, 2, 8, 128, 0.1, 1, 0, True, True, _BF16, False, False, 64),
]


def _chunk_id(c):
    dt = "f16" if c[10] == _F16 else "bf16"
    return "B{}-T{}-H{}-HV{}-D{}-scale{}-norm{}-mask{}-l2{}-gate{}-{}-safe{}-norecompute{}-cs{}".format(
        *c[:10], dt, *c[11:]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=_chunk_id(c)) for c in CHUNK_GRID],
)
def test_chunk(case):
    _run_chunk_case(*_reduced(*case[:5]), *case[5:])


# the default suite: the flag combinations of the grid at tiny sizes (GVA: rows 11, 12)
TINY_CHUNK = [CHUNK_GRID[i] for i in (0, 5, 6, 11, 12)]


@pytest.mark.parametrize("case", [pytest.param(c, id=_chunk_id(c)) for c in TINY_CHUNK])
def test_chunk_tiny(case):
    _run_chunk_case(*_tiny(*case[:5]), *case[5:])


def test_chunk_invalid_chunk_size():
    q = k = v = g = torch.randn(1, 64, 1, 64)
    beta = torch.randn(1, 64, 1)
    with pytest.raises(ValueError, match=r"`chunk_size` must be either 32 or 64"):
        chunk_kda(q, k, v, g, beta, chunk_size=16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # fla's own errors (fla's messages; the A_log one shared with the decode kernel)
        (dict(use_gate_in_kernel=True), "A_log`? must be provided when"),
        (dict(allow_neg_eigval=True), "`allow_neg_eigval=True` requires"),
        (
            dict(use_gate_in_kernel=True, safe_gate=True, A_log=torch.zeros(2)),
            "`lower_bound` must be specified",
        ),
        (
            dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=-6.0),
            "lower_bound must be None or a number in \\[-5, 0\\)",
        ),
        # misuse fla ignores: a clear error here
        (dict(A_log=torch.zeros(2)), "A_log is used only with use_gate_in_kernel=True"),
        (dict(return_intermediate_states=True), "return_intermediate_states=True is inference"),
        (dict(use_graph=True), "use_graph is an fla mode"),
    ],
    ids=[
        "no-A_log",
        "neg-eigval",
        "safe-no-bound",
        "bound-range",
        "A_log-unused",
        "states",
        "graph",
    ],
)
def test_chunk_flag_errors(kwargs, match):
    q = k = torch.randn(1, 8, 2, 16)
    v, g, beta = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.rand(1, 8, 2)
    with pytest.raises(ValueError, match=match):
        chunk_kda(q, k, v, g, beta, **kwargs)


def test_chunk_gva_head_count_error():
    q = k = torch.randn(1, 8, 2, 16)
    v, g, beta = torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16), torch.rand(1, 8, 3)
    with pytest.raises(ValueError, match="must be a positive multiple of q and k's"):
        chunk_kda(q, k, v, g, beta)


def _run_varlen_case(H, D, mask_p, cu, dtype, gate, safe, recompute, cs, with_grad=True):
    """fla's ``test_chunk_varlen`` (``with_grad``) / ``test_chunk_varlen_prefill`` body."""
    torch.manual_seed(42)
    cu_seqlens = torch.LongTensor(cu)
    T, N = int(cu[-1]), len(cu) - 1
    q = torch.randn((1, T, H, D), dtype=dtype)
    k = F.normalize(torch.randn(1, T, H, D), p=2, dim=-1).to(dtype)
    v = torch.randn((1, T, H, D), dtype=dtype)
    g = torch.randn(1, T, H, D, dtype=dtype if gate else torch.float)
    A_log = dt_bias = None
    if gate:
        A_log = torch.log(torch.empty(1, 1, H, 1).uniform_(1, 16))
        dt_bias = torch.randn(H * D)
    else:
        g = F.logsigmoid(g)
        g = g * (torch.rand_like(g) > mask_p)
    mask = torch.rand_like(g) > mask_p
    g = g * mask + (~mask) * (-1000)
    if safe:
        g = g.clamp(-5, 0)
    beta = torch.rand(1, T, H, dtype=dtype).sigmoid()
    h0 = torch.randn((N, H, D, D))
    leaves = [q, k, v, g, beta, h0] + ([A_log, dt_bias] if gate else [])
    if with_grad:
        for x in leaves:
            x.requires_grad_(True)
    do, dht = torch.randn_like(v), torch.rand_like(h0)

    tri, tri_ht = chunk_kda(
        q=F.normalize(q, p=2, dim=-1),
        k=k.clone(),
        v=v.clone(),
        g=g.clone(),
        beta=beta.clone(),
        A_log=(A_log.clone() if gate else None),
        dt_bias=(dt_bias.clone() if gate else None),
        initial_state=h0.clone(),
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens.cpu(),
        use_gate_in_kernel=gate,
        safe_gate=safe,
        disable_recompute=recompute,
        chunk_size=cs,
    )
    if with_grad:
        ((tri * do).sum() + (tri_ht * dht).sum()).backward(retain_graph=True)
        got = _grads(leaves)
    refs, ref_hts = [], []
    for i in range(N):
        s = slice(cu[i], cu[i + 1])
        decay = naive_kda_gate(g[:, s].float(), A_log, dt_bias) if gate else g[:, s]
        o_i, ht_i = naive_recurrent_kda(
            q=F.normalize(q[:, s], p=2, dim=-1),
            k=k[:, s],
            v=v[:, s],
            beta=beta[:, s],
            g=decay,
            initial_state=h0[i],
            output_final_state=True,
        )
        refs.append(o_i)
        ref_hts.append(ht_i)
    ref, ref_ht = torch.cat(refs, 1), torch.cat(ref_hts, 0)
    assert_close("o", ref, tri, 0.005)
    assert_close("ht", ref_ht, tri_ht, 0.005)
    if not with_grad:
        return
    ((ref * do).sum() + (ref_ht * dht).sum()).backward(retain_graph=True)
    expected = _grads(leaves)
    tols = dict(dq=0.007, dk=0.008, dv=0.007, dg=0.015, db=0.015, dh0=0.007, dA=0.008, dbias=0.005)
    for name, e, t in zip(tols, expected, got):
        # fla checks dA here with warning=True (16-bit inputs: dA sums dg * g over every token
        # of a head, two numbers here, and can cancel; ours is exact to 1e-4 with fp32 inputs)
        assert_close(name, e, t, tols[name], warning=name == "dA")


def _reduce_cu(cu: list[int]) -> list[int]:
    """fla's sequence lengths cut to at most ~1/10 (at least 1 token, odd lengths kept odd)."""
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    out = [0]
    for n in lengths:
        out.append(out[-1] + max(1, min(n, 15 + n // 12)))
    return out


# fla's test_chunk_varlen rows: H, D, mask_p, cu_seqlens, dtype, use_gate_in_kernel, safe_gate,
# disable_recompute, chunk_size
VARLEN_GRID = [
    (4, 60, 0.1, [0, 15], _F16, True, False, False, 64),
    (4, 64, 0.9, [0, 256, 500, 1000], _F16, True, False, False, 64),
    (4, 128, 0.5, [0, 256, 500, 1000], _F16, False, False, False, 64),
    (4, 100, 0, [0, 15, 100, 300, 1200, 2000], _F16, True, False, False, 64),
    (4, 256, 0, [0, 100, 300, 1200, 3000, 4096], _F16, False, True, True, 64),
    (4, 60, 0.1, [0, 31, 96, 160], _F16, True, False, True, 32),
]


def _varlen_id(c):
    return "H{}-D{}-mask{}-cu{}-gate{}-safe{}-norecompute{}-cs{}".format(
        c[0], c[1], c[2], "_".join(map(str, c[3])), *c[5:]
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=_varlen_id(c)) for c in VARLEN_GRID])
def test_chunk_varlen(case):
    H, D, mask_p, cu, *rest = case
    _run_varlen_case(H, D if D <= 64 else D // 2, mask_p, _reduce_cu(cu), *rest)


def test_chunk_varlen_tiny():
    """Row 1 of fla's varlen grid (gate in the kernel) at tiny sizes: 3 sequences."""
    H, D, mask_p, _, *rest = VARLEN_GRID[1]
    _run_varlen_case(1, 32, mask_p, [0, 20, 85, 100], *rest)


# fla's test_chunk_varlen_prefill rows (forward only, under inference_mode)
PREFILL_GRID = [
    (4, 60, 0.1, [0, 8192], _F16, True, False, False),
    (4, 64, 0.9, [0, 256, 500, 1000], _F16, True, False, False),
    (4, 128, 0.5, [0, 256, 500, 1000], _F16, False, False, False),
    (4, 100, 0, [0, 15, 100, 300, 1200, 2000], _F16, True, False, False),
    (4, 256, 0, [0, 100, 300, 1200, 3000, 4096], _F16, False, True, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=_varlen_id((*c, 64))) for c in PREFILL_GRID])
def test_chunk_varlen_prefill(case):
    H, D, mask_p, cu, *rest = case
    with torch.inference_mode():
        _run_varlen_case(
            min(H, 2), D if D <= 64 else D // 2, mask_p, _reduce_cu(cu), *rest, 64, with_grad=False
        )


def _run_beta_sigmoid_case(B, T, H, D, allow_neg_eigval, dtype):
    """fla's ``test_chunk_use_beta_sigmoid_in_kernel``: ours with the flag against ours with
    ``c * sigmoid(beta)`` precomputed (fla compares its own two calls likewise)."""
    torch.manual_seed(42)
    q = torch.rand(B, T, H, D, dtype=dtype)
    k = torch.rand(B, T, H, D, dtype=dtype)
    v = torch.rand(B, T, H, D, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, D))
    beta_raw = torch.randn(B, T, H, dtype=dtype)
    beta_post = beta_raw.float().sigmoid()
    h0 = torch.randn(B, H, D, D)
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, beta_post, beta_raw, h0)]
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    common = dict(scale=None, initial_state=h0.clone(), output_final_state=True)
    qn, kn = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
    c = 2 if allow_neg_eigval else 1
    ref, ref_ht = chunk_kda(q=qn, k=kn, v=v, g=g, beta=beta_post * c, **common)
    ((ref * do).sum() + (ref_ht * dht).sum()).backward(retain_graph=True)
    r = _grads(leaves)
    tri, tri_ht = chunk_kda(
        q=qn,
        k=kn,
        v=v,
        g=g,
        beta=beta_raw.clone(),
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=allow_neg_eigval,
        **common,
    )
    ((tri * do).sum() + (tri_ht * dht).sum()).backward(retain_graph=True)
    t = _grads(leaves)
    s = beta_post.detach()
    ref_db_raw = (r[4] * s * (1 - s)).to(t[5].dtype)  # fla's chain rule, as fla writes it
    assert_close("o", ref, tri, 1e-4)
    assert_close("ht", ref_ht, tri_ht, 1e-4)
    for name, i in (("dq", 0), ("dk", 1), ("dv", 2), ("dg", 3), ("dh0", 6)):
        assert_close(name, r[i], t[i], 1e-4)
    assert_close("db_raw", ref_db_raw, t[5], 1e-4)


BETA_SIGMOID_GRID = [
    (1, 8192, 96, 128, False, _BF16),
    (1, 8192, 96, 128, True, _BF16),
    (2, 96, 2, 64, True, _F16),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [pytest.param(c, id="B{}-T{}-H{}-D{}-neg{}-{}".format(*c)) for c in BETA_SIGMOID_GRID]
)
def test_chunk_use_beta_sigmoid_in_kernel(case):
    B, T, H, D, neg, dtype = case
    _run_beta_sigmoid_case(min(B, 2), min(T, 96), min(H, 2), D // 2 if D > 64 else D, neg, dtype)


def test_chunk_use_beta_sigmoid_in_kernel_tiny():
    _run_beta_sigmoid_case(1, 70, 1, 32, True, _F16)


STATE_V_FIRST_GRID = [
    (1, 63, 1, 64, 1, 1, _F16),
    (2, 500, 3, 60, 1, 1, _F16),
    (3, 1024, 4, 128, 0.1, 1, _F16),
    (4, 2048, 8, 64, 0.1, 1, _F16),
]


def _run_state_v_first_case(B, T, H, D, scale, normalizer, dtype):
    """fla's ``test_chunk_state_v_first``: ``[V, K]`` states against ``[K, V]`` ones, 1e-4."""
    torch.manual_seed(42)
    q = torch.rand(B, T, H, D, dtype=dtype)
    k = torch.rand(B, T, H, D, dtype=dtype)
    v = torch.rand(B, T, H, D, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, D)) / normalizer
    beta = torch.randn(B, T, H, dtype=dtype).sigmoid()
    h0_kv = torch.randn(B, H, D, D)
    h0_vk = h0_kv.transpose(-1, -2).contiguous()
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, beta, h0_kv, h0_vk)]
    do = torch.randn_like(v)
    dht_vk = torch.randn(B, H, D, D)
    dht_kv = dht_vk.transpose(-1, -2).contiguous()
    qn, kn = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
    kw = dict(scale=scale, output_final_state=True, use_qk_l2norm_in_kernel=False)
    tri, tri_ht = chunk_kda(
        q=qn, k=kn, v=v, g=g, beta=beta, initial_state=h0_vk.clone(), state_v_first=True, **kw
    )
    ((tri * do).sum() + (tri_ht * dht_vk).sum()).backward(retain_graph=True)
    t = _grads(leaves)
    ref, ref_ht = chunk_kda(
        q=qn, k=kn, v=v, g=g, beta=beta, initial_state=h0_kv.clone(), state_v_first=False, **kw
    )
    ((ref * do).sum() + (ref_ht * dht_kv).sum()).backward(retain_graph=True)
    r = _grads(leaves)
    assert_close("o", ref, tri, 1e-4)
    assert_close("ht", ref_ht, tri_ht.transpose(-1, -2), 1e-4)
    for name, i in (("dq", 0), ("dk", 1), ("dv", 2), ("dg", 3), ("db", 4)):
        assert_close(name, r[i], t[i], 1e-4)
    assert_close("dh0", r[5], t[6].transpose(-1, -2), 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id="B{}-T{}-H{}-D{}-scale{}-norm{}-{}".format(*c))
        for c in STATE_V_FIRST_GRID
    ],
)
def test_chunk_state_v_first(case):
    B, T, H, D, *rest = case
    _, Tr, Hr, _, Dr = _reduced(B, T, H, H, D)
    _run_state_v_first_case(min(B, 2), Tr, Hr, Dr, *rest)


# fla's test_naive_chunk checks its chunked torch form against its recurrence; ours is
# kimi_linear.ops.torch_chunk_kda (the torch backend), at fla's full sizes (plain torch).
NAIVE_CHUNK_GRID = [
    (1, 64, 1, 1, 64, 1, 1),
    (2, 512, 3, 3, 60, 1, 1),
    (4, 1024, 4, 4, 128, 0.1, 1),
    (4, 1024, 4, 4, 128, 1, 10),
    (1, 64, 1, 2, 64, 1, 1),
    (2, 512, 2, 4, 60, 1, 1),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            id="B{}-T{}-H{}-HV{}-D{}-scale{}-norm{}".format(*c),
            marks=[pytest.mark.slow] if c[1] * c[3] * c[4] > 64 * 64 * 2 else [],
        )
        for c in NAIVE_CHUNK_GRID
    ],
)
def test_naive_chunk(case):
    B, T, H, HV, D, scale, normalizer = case
    torch.manual_seed(42)
    q = torch.rand(B, T, H, D)
    k = torch.rand(B, T, H, D)
    v = torch.rand(B, T, HV, D)
    g = F.logsigmoid(torch.randn(B, T, HV, D)) / normalizer
    beta = torch.randn(B, T, HV).sigmoid()
    h0 = torch.randn(B, HV, D, D)
    qn, kn = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
    ref, ref_ht = naive_recurrent_kda(
        q=qn, k=kn, v=v, g=g, beta=beta, scale=scale, initial_state=h0, output_final_state=True
    )
    if HV > H:  # our torch op takes one head count: q / k repeated (a torch reference op)
        qn, kn = (x.repeat_interleave(HV // H, dim=2) for x in (qn, kn))
    tri, tri_ht = torch_chunk_kda(
        qn, kn, v, g, beta, scale=scale, initial_state=h0, output_final_state=True
    )
    assert_close("o", ref, tri, 0.005)
    assert_close("ht", ref_ht, tri_ht, 0.005)


# fla's test_fused_recurrent rows: B, T, H, HV, D, scale, gate_logit_normalizer,
# use_qk_l2norm_in_kernel (fp32)
FUSED_RECURRENT_GRID = [
    (1, 64, 1, 1, 64, 1, 1, False),
    (2, 512, 3, 3, 60, 1, 1, False),
    (3, 1000, 4, 4, 100, 0.1, 1, True),
    (4, 1024, 4, 4, 128, 0.1, 1, False),
    (2, 512, 2, 4, 60, 1, 1, False),
    (2, 1024, 2, 8, 128, 0.1, 1, True),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            id="B{}-T{}-H{}-HV{}-D{}-scale{}-norm{}-l2{}".format(*c),
            marks=[] if c[1] <= 64 else [pytest.mark.slow],
        )
        for c in FUSED_RECURRENT_GRID
    ],
)
def test_fused_recurrent(case):
    B, T, H, HV, D, scale, normalizer, l2 = case
    B, T, H, HV, D = _reduced(B, T, H, HV, D)
    torch.manual_seed(42)
    q = torch.rand(B, T, H, D)
    k = torch.rand(B, T, H, D)
    v = torch.rand(B, T, HV, D)
    g = F.logsigmoid(torch.randn(B, T, HV, D)) / normalizer
    beta = torch.randn(B, T, HV).sigmoid()
    h0 = torch.randn(B, HV, D, D)
    qn, kn = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
    ref, ref_ht = naive_recurrent_kda(
        q=qn, k=kn, v=v, g=g, beta=beta, scale=scale, initial_state=h0, output_final_state=True
    )
    tri, tri_ht = fused_recurrent_kda(
        q=qn if not l2 else q.clone(),
        k=kn if not l2 else k.clone(),
        v=v.clone(),
        g=g.clone(),
        beta=beta.clone(),
        scale=scale,
        initial_state=h0.clone(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=l2,
    )
    assert_close("o", ref, tri, 0.005)
    assert_close("ht", ref_ht, tri_ht, 0.005)


def _run_fr_beta_sigmoid_case(B, T, H, D, allow_neg_eigval, dtype):
    """fla's ``test_fused_recurrent_use_beta_sigmoid_in_kernel``: the kernel's sigmoid against
    the post-sigmoid beta (fla compares its own two calls; we also check the recurrence)."""
    torch.manual_seed(42)
    q = torch.rand(B, T, H, D, dtype=dtype)
    k = torch.rand(B, T, H, D, dtype=dtype)
    v = torch.rand(B, T, H, D, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, D))
    beta_post = torch.randn(B, T, H, dtype=dtype).sigmoid()
    beta_raw = torch.logit(beta_post.float().clamp_(1e-4, 1 - 1e-4)).to(dtype)
    h0 = torch.randn(B, H, D, D)
    qn, kn = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
    c = 2 if allow_neg_eigval else 1
    common = dict(scale=None, output_final_state=True, use_qk_l2norm_in_kernel=False)
    ref, ref_ht = fused_recurrent_kda(
        q=qn, k=kn, v=v, g=g, beta=beta_post * c, initial_state=h0.clone(), **common
    )
    tri, tri_ht = fused_recurrent_kda(
        q=qn,
        k=kn,
        v=v,
        g=g,
        beta=beta_raw.clone(),
        initial_state=h0.clone(),
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=allow_neg_eigval,
        **common,
    )
    assert_close("o", ref, tri, 0.005)
    assert_close("ht", ref_ht, tri_ht, 0.005)
    gold, gold_ht = naive_recurrent_kda(
        q=qn, k=kn, v=v, g=g, beta=beta_post * c, initial_state=h0, output_final_state=True
    )
    assert_close("o (recurrence)", gold, tri, 0.005)
    assert_close("ht (recurrence)", gold_ht, tri_ht, 0.005)


FR_BETA_SIGMOID_GRID = [
    (2, 256, 4, 64, False, torch.float),
    (2, 256, 4, 64, True, torch.float),
    (1, 512, 3, 60, True, torch.float),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id="B{}-T{}-H{}-D{}-neg{}-{}".format(*c)) for c in FR_BETA_SIGMOID_GRID],
)
def test_fused_recurrent_use_beta_sigmoid_in_kernel(case):
    B, T, H, D, *rest = case
    B, T, H, _, D = _reduced(B, T, H, H, D)
    _run_fr_beta_sigmoid_case(B, T, H, D, *rest)


def test_fused_recurrent_use_beta_sigmoid_in_kernel_tiny():
    _run_fr_beta_sigmoid_case(*_tiny(1, 512, 3, 3, 60)[:3], 30, True, torch.float)


def _run_fr_state_v_first_case(B, T, H, D, scale, normalizer, dtype):
    """fla's ``test_fused_recurrent_state_v_first``: ``[V, K]`` states against ``[K, V]``
    ones at 1e-4, and fla's deprecated ``transpose_state_layout`` alias."""
    torch.manual_seed(42)
    q = torch.rand(B, T, H, D, dtype=dtype)
    k = torch.rand(B, T, H, D, dtype=dtype)
    v = torch.rand(B, T, H, D, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, D)) / normalizer
    beta = torch.randn(B, T, H, dtype=dtype).sigmoid()
    h0_kv = torch.randn(B, H, D, D)
    h0_vk = h0_kv.transpose(-1, -2).contiguous()
    qn, kn = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
    kw = dict(scale=scale, output_final_state=True, use_qk_l2norm_in_kernel=False)
    ref, ref_ht = fused_recurrent_kda(
        q=qn, k=kn, v=v, g=g, beta=beta, initial_state=h0_kv.clone(), state_v_first=False, **kw
    )
    tri, tri_ht = fused_recurrent_kda(
        q=qn, k=kn, v=v, g=g, beta=beta, initial_state=h0_vk.clone(), state_v_first=True, **kw
    )
    assert_close("o", ref, tri, 1e-4)
    assert_close("ht", ref_ht, tri_ht.transpose(-1, -2), 1e-4)
    # fla: the legacy `transpose_state_layout` maps to `state_v_first` with a warning, and
    # passing both names is rejected
    with pytest.warns(DeprecationWarning):
        fused_recurrent_kda(q=q, k=k, v=v, g=g, beta=beta, transpose_state_layout=True)
    with pytest.raises(ValueError):
        fused_recurrent_kda(
            q=q, k=k, v=v, g=g, beta=beta, state_v_first=True, transpose_state_layout=True
        )


FR_STATE_V_FIRST_GRID = [
    (1, 64, 1, 64, 1, 1, torch.float),
    (2, 512, 3, 60, 1, 1, torch.float),
    (3, 1000, 4, 100, 0.1, 1, torch.float),
    (4, 1024, 4, 128, 0.1, 1, torch.float),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            id="B{}-T{}-H{}-D{}-scale{}-norm{}-{}".format(*c),
            marks=[] if c[1] <= 64 else [pytest.mark.slow],
        )
        for c in FR_STATE_V_FIRST_GRID
    ],
)
def test_fused_recurrent_state_v_first(case):
    B, T, H, D, *rest = case
    B, T, H, _, D = _reduced(B, T, H, H, D)
    _run_fr_state_v_first_case(B, T, H, D, *rest)


def _run_fr_gate_case(B, T, H, HV, D, scale, has_a_log, has_dt_bias, safe, dtype):
    """fla's ``test_fused_recurrent_gate_in_kernel``: the gate formed in the kernel against
    fla's gate reference fed to the same kernel, 0.002."""
    torch.manual_seed(42)
    q = torch.rand(B, T, H, D, dtype=dtype)
    k = torch.rand(B, T, H, D, dtype=dtype)
    v = torch.rand(B, T, HV, D, dtype=dtype)
    beta = torch.rand(B, T, HV, dtype=dtype).sigmoid()
    g_raw = torch.randn(B, T, HV, D)
    A_log = torch.log(torch.empty(HV).uniform_(1, 16)) if has_a_log else None
    dt_bias = torch.randn(HV * D) if has_dt_bias else None
    h0 = torch.randn(B, HV, D, D)
    lower_bound = -5.0 if safe else None
    gate_fn = naive_kda_lowerbound_gate if safe else naive_kda_gate
    g_ref = gate_fn(g_raw, A_log, dt_bias)
    common = dict(scale=scale, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref, ref_ht = fused_recurrent_kda(
        q=q.clone(), k=k.clone(), v=v.clone(), g=g_ref, beta=beta.clone(),
        initial_state=h0.clone(), **common
    )  # fmt: skip
    tri, tri_ht = fused_recurrent_kda(
        q=q.clone(),
        k=k.clone(),
        v=v.clone(),
        g=g_raw.clone(),
        beta=beta.clone(),
        A_log=A_log.clone() if A_log is not None else None,
        dt_bias=dt_bias.clone() if dt_bias is not None else None,
        initial_state=h0.clone(),
        use_gate_in_kernel=True,
        lower_bound=lower_bound,
        **common,
    )
    assert_close("o", ref, tri, 0.002)
    assert_close("ht", ref_ht, tri_ht, 0.002)


# fla's rows: B, T, H, HV, D, scale, has_a_log, has_dt_bias, safe_gate, dtype
FR_GATE_GRID = [
    (1, 64, 1, 1, 64, 1, True, False, False, torch.float),
    (2, 256, 2, 2, 64, 1, True, True, False, torch.float),
    (2, 512, 2, 4, 64, 0.1, True, True, True, torch.float16),
    (3, 1000, 2, 8, 128, 1, True, False, False, torch.float16),
    (4, 1024, 4, 4, 128, 0.1, True, True, True, torch.float16),
    (1, 64, 1, 1, 64, 1, False, False, True, torch.float),
    (2, 256, 2, 4, 64, 1, False, True, True, torch.float),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            id="B{}-T{}-H{}-HV{}-D{}-scale{}-A{}-bias{}-safe{}-{}".format(*c),
            marks=[] if c[1] <= 64 else [pytest.mark.slow],
        )
        for c in FR_GATE_GRID
    ],
)
def test_fused_recurrent_gate_in_kernel(case):
    _run_fr_gate_case(*_reduced(*case[:5]), *case[5:])


def _run_vllm_decode_case(B, H, D, scale, normalizer, l2, gate, safe, dtype):
    """fla's ``test_fused_recurrent_vllm_decode`` (fla runs it on CUDA / NPU only; ours runs
    under the interpreter): one token per sequence, states in a paged pool addressed by
    ``ssm_state_indices``, updated in place; untouched slots stay bit-identical. fla calls its
    ``fused_recurrent_kda_fwd`` (vLLM's import); ours takes the same keywords publicly."""
    torch.manual_seed(42)
    slots = B * 3
    pool = torch.randn(slots, H, D, D)
    idx = torch.randperm(slots)[:B].int()
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[idx.long()] = False
    pool[untouched] = 1e30  # out-of-bounds reads would show
    q = torch.rand(1, B, H, D, dtype=dtype)
    k = torch.rand(1, B, H, D, dtype=dtype)
    v = torch.rand(1, B, H, D, dtype=dtype)
    g = torch.randn(1, B, H, D, dtype=dtype if gate else torch.float)
    if gate:
        A_log = torch.log(torch.randn(1, 1, H, 1).uniform_(1, 16)).squeeze()
        dt_bias = torch.randn(H * D)
        lower_bound = -5.0 if safe else None
        gate_fn = naive_kda_lowerbound_gate if safe else naive_kda_gate
    else:
        g = F.logsigmoid(g) / normalizer
        A_log = dt_bias = lower_bound = gate_fn = None
    beta = torch.randn(1, B, H, dtype=dtype).sigmoid()
    cu_seqlens = torch.arange(0, B + 1, dtype=torch.int32)
    ref_pool, tri_pool = pool.clone(), pool.clone()
    ref_out = []
    for i in range(B):
        s, slot = slice(i, i + 1), int(idx[i])
        o_i, ht_i = naive_recurrent_kda(
            q=F.normalize(q[:, s], p=2, dim=-1),
            k=F.normalize(k[:, s], p=2, dim=-1),
            v=v[:, s],
            g=gate_fn(g[:, s], A_log, dt_bias) if gate else g[:, s],
            beta=beta[:, s],
            scale=scale,
            initial_state=ref_pool[slot].clone().unsqueeze(0),
            output_final_state=True,
        )
        ref_out.append(o_i)
        ref_pool[slot] = ht_i.squeeze(0)
    ref_out = torch.cat(ref_out, dim=1)
    q_in, k_in = (q, k) if l2 else (F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1))
    tri_out, _ = fused_recurrent_kda(
        q=q_in,
        k=k_in,
        v=v,
        g=g,
        beta=beta,
        A_log=A_log,
        dt_bias=dt_bias,
        initial_state=tri_pool,
        scale=scale,
        output_final_state=False,
        inplace_final_state=True,
        cu_seqlens=cu_seqlens,
        ssm_state_indices=idx,
        num_accepted_tokens=None,
        use_qk_l2norm_in_kernel=l2,
        use_gate_in_kernel=gate,
        lower_bound=lower_bound,
    )
    assert_close("o", ref_out, tri_out, 0.005)
    assert_close("ht", ref_pool[idx.long()], tri_pool[idx.long()], 0.005)
    assert torch.equal(ref_pool[untouched], tri_pool[untouched])  # fla: assert_close(..., 0.0)


# fla's rows: B, H, D, scale, gate_logit_normalizer, use_qk_l2norm_in_kernel,
# use_gate_in_kernel, safe_gate, dtype
VLLM_DECODE_GRID = [
    (16, 16, 128, 0.1, 1.0, True, False, False, _BF16),
    (32, 8, 64, 1.0, 1.0, False, False, False, _F16),
    (7, 32, 128, 0.5, 0.5, True, False, False, _BF16),
    (16, 16, 128, 0.1, 1.0, True, True, False, _BF16),
    (32, 8, 64, 1.0, 1.0, False, True, False, _F16),
    (7, 32, 128, 0.5, 0.5, True, True, True, _BF16),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id="B{}-H{}-D{}-scale{}-norm{}-l2{}-gate{}-safe{}-{}".format(*c))
        for c in VLLM_DECODE_GRID
    ],
)
def test_fused_recurrent_vllm_decode(case):
    B, H, D, *rest = case
    _run_vllm_decode_case(B, min(H, 4), D if D <= 64 else D // 2, *rest)


def test_fused_recurrent_vllm_decode_tiny():
    """fla's last row (odd batch, safe gate in the kernel) at 2 heads of 32."""
    _run_vllm_decode_case(7, 2, 32, *VLLM_DECODE_GRID[-1][3:])


def _run_return_states_case(B, T, H, D, dtype):
    """fla's ``test_chunk_return_intermediate_states`` body (fla's inputs, which include
    ``g > 0``: fla checks shapes and dtypes only; the values are checked against the
    recurrence in tests/test_kda_serving.py)."""
    torch.manual_seed(42)
    chunk_size = 64
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, D, dtype=dtype)
    g = torch.randn(B, T, H, D, dtype=dtype)
    beta = torch.rand(B, T, H, dtype=dtype)
    with torch.inference_mode():
        o, final_state, h = chunk_kda(
            q=q,
            k=k,
            v=v,
            g=g,
            beta=beta,
            initial_state=None,
            output_final_state=True,
            return_intermediate_states=True,
            disable_recompute=False,
        )
        assert o.shape == (B, T, H, D)
        assert final_state.shape == (B, H, D, D)
        expected_nt = (T + chunk_size - 1) // chunk_size
        assert h.shape == (B, expected_nt, H, D, D)
        assert h.dtype == dtype
        total_tokens, N = T, 2
        cu_seqlens = torch.tensor([0, total_tokens // N, total_tokens], dtype=torch.long)
        qv, kv, vv, gv = (torch.randn(1, total_tokens, H, D, dtype=dtype) for _ in range(4))
        bv = torch.rand(1, total_tokens, H, dtype=dtype)
        o_varlen, final_state_varlen, h_varlen = chunk_kda(
            q=qv,
            k=kv,
            v=vv,
            g=gv,
            beta=bv,
            initial_state=None,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            return_intermediate_states=True,
            disable_recompute=False,
        )
        assert o_varlen.shape == (1, total_tokens, H, D)
        assert final_state_varlen.shape == (N, H, D, D)
        assert h_varlen.shape[0] == 1
        assert h_varlen.shape[2:] == (H, D, D)
        assert h_varlen.dtype == dtype


# fla's inputs hold g > 0: numpy's overflow warnings under the interpreter are expected
_OVERFLOW_OK = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@_OVERFLOW_OK
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [_BF16])
def test_chunk_return_intermediate_states(dtype):
    B, T, H, _, D = _reduced(2, 1024, 4, 4, 128)
    _run_return_states_case(B, T, H, D, dtype)


@_OVERFLOW_OK
def test_chunk_return_intermediate_states_tiny():
    _run_return_states_case(2, 70, 1, 32, _BF16)


#: fla's ``test_gate`` rows ``(B, T, H, D, HAS_BIAS)``: its fused gate op against
#: ``naive_kda_gate``; ours is :func:`kimi_linear.ops.gate.kda_gate` (the one place the layer's
#: decay is formed; the kernels' in-kernel gate is checked through ``test_chunk`` above).
GATE_GRID = [
    (B, T, H, D, bias)
    for bias in (False, True)
    for B, T, H, D in (
        (1, 2, 2, 12),
        (1, 32, 2, 16),
        (2, 64, 4, 32),
        (4, 128, 8, 64),
        (4, 128, 8, 128),
    )
]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id="B{}-T{}-H{}-D{}-bias{}".format(*c)) for c in GATE_GRID]
)
def test_gate(case):
    """fla's ``test_gate``: the gate and its gradients into ``g``, ``A_log`` and ``dt_bias``
    against fla's ``naive_kda_gate`` at fla's tolerance (1e-4)."""
    B, T, H, D, has_bias = case
    torch.manual_seed(42)
    g = (torch.randn(B, T, H, D) * 10).requires_grad_(True)
    A_log = torch.log(torch.empty(1, 1, H, 1).uniform_(1, 16)).requires_grad_(True)
    dt_bias = torch.randn(H * D).requires_grad_(True) if has_bias else None
    do = torch.randn(B, T, H, D)
    leaves = [g, A_log] + ([dt_bias] if has_bias else [])
    ref = naive_kda_gate(g, A_log, dt_bias)
    ref_grads = torch.autograd.grad((ref * do).sum(), leaves)
    ours = kda_gate(g, A_log, dt_bias)
    our_grads = torch.autograd.grad((ours * do).sum(), leaves)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert_close("o", ref, ours, 1e-4)
    for name, r, o in zip(("dg", "dA", "dbias"), ref_grads, our_grads):
        assert_close(name, r, o, 1e-4)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("test_flash_kda_chunk", "fla's FlashKDA backend: CUDA (sm_90) only, not our kernels"),
        ("test_flash_kda_chunk_varlen", "fla's FlashKDA backend: CUDA (sm_90) only"),
        ("test_triton_ascend_backend_routing", "fla's Ascend NPU backend routing: NPU only"),
    ],
)
def test_not_applicable(name, reason):
    """fla cases that exercise a GPU-only backend of fla itself (listed, not run)."""
    pytest.skip(f"{name}: not applicable, {reason}")


def test_chunk_signature_is_fla_s():
    """fla's chunk_kda parameters, in fla's order with fla's defaults, then fla's ``**kwargs``
    (``A_log``, ``dt_bias``, ``chunk_size``) as keyword-only ones, then the kit's extras."""
    fla_params = [
        p for p in inspect.signature(fla_chunk_kda).parameters.values() if p.kind != p.VAR_KEYWORD
    ]
    ours = list(inspect.signature(chunk_kda).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(fla_params)]] == [
        (p.name, p.default) for p in fla_params
    ]
    rest = {p.name: p for p in ours[len(fla_params) :]}
    assert {"A_log", "dt_bias", "chunk_size"} <= set(rest)
    assert all(p.kind == p.KEYWORD_ONLY for p in rest.values())
    assert rest["chunk_size"].default == 64


@pytest.mark.parametrize("safe", [False, True], ids=["softplus", "safe"])
@pytest.mark.parametrize("dtype", [_F16, _BF16], ids=["f16", "bf16"])
def test_chunk_gate_param_grads(dtype, safe):
    """``A_log`` / ``dt_bias`` gradients of the in-kernel gate, 16-bit inputs (fla's varlen row 1
    at tiny sizes: 3 sequences, ``H=2``).

    1. The fused chain (``_gate_bwd`` and the per-chunk fp32 partial sums of
       ``_bwd_dqkg_kernel``) adds no error: it equals the same kernels' fp32 log-decay gradient
       chained through the torch gate (``kimi_linear.ops.gate.kda_gate``) to 1e-3 of the
       terms' absolute sum (fp32 rounding apart).
    2. Against fla's fp32 reference (same rounded inputs): each gradient is a sum over tokens
       of ``dg * dy/dparam`` that cancels (``sum |terms| / |sum|`` is 5-60 here) and ``dg``
       carries the error of the kernels' 16-bit tensor-core operands (as fla's; fla's ``dg``
       bar is 0.015-0.02), so the sums miss fla's 8e-3 relative bar by up to the cancellation
       factor (bf16: 1-9% here; fp32 inputs: ~4e-6). The bar that holds whatever the
       cancellation: the error of each sum within 0.03 (fla's ``dg`` bars are 0.015-0.02) of
       the largest absolute sum of terms (seen: up to 2.2e-3 for ``dA``, 1.6e-2 for ``dt_bias``
       in bf16; a sum of terms each within ``e`` is within ``e * sum |terms|``).
    """
    torch.manual_seed(42)
    H, D, cu = 2, 32, [0, 20, 85, 100]
    T, N = cu[-1], len(cu) - 1
    lb = -5.0 if safe else None
    q = F.normalize(torch.randn(1, T, H, D), p=2, dim=-1).to(dtype)
    k = F.normalize(torch.randn(1, T, H, D), p=2, dim=-1).to(dtype)
    v = torch.randn(1, T, H, D, dtype=dtype)
    f = torch.randn(1, T, H, D).to(dtype)
    f = torch.where(torch.rand(f.shape) > 0.9, f, torch.full_like(f, -1000.0)) if not safe else f
    A_log = torch.log(torch.empty(H).uniform_(1, 16))
    dt_bias = torch.randn(H * D)
    beta = torch.rand(1, T, H, dtype=dtype).sigmoid()
    h0 = torch.randn(N, H, D, D)
    do, dht = torch.randn_like(v), torch.rand_like(h0)
    cu_t = torch.LongTensor(cu)
    fla_gate = (lambda x, a, b: naive_kda_lowerbound_gate(x, a, b, lb)) if safe else naive_kda_gate

    # fla's reference, per sequence; keep dL/dy to form the terms of each sum
    A_r, b_r = A_log.clone().requires_grad_(), dt_bias.clone().requires_grad_()
    y = fla_gate(f.float(), A_r, b_r)
    y.retain_grad()
    loss = 0
    for i in range(N):
        s = slice(cu[i], cu[i + 1])
        o, ht = naive_recurrent_kda(
            q[:, s], k[:, s], v[:, s], y[:, s], beta[:, s], None, h0[i], True
        )
        loss = loss + (o * do[:, s]).sum() + (ht * dht[i]).sum()
    loss.backward()
    x = f.double() + dt_bias.double().view(H, D)
    a = A_log.double().exp().view(H, 1)
    if safe:
        s_ = torch.sigmoid(a * x)
        dydx = lb * s_ * (1 - s_) * a
        terms_A, terms_b = y.grad.double() * dydx * x, y.grad.double() * dydx
    else:
        terms_A = y.grad.double() * (-a * F.softplus(x))
        terms_b = y.grad.double() * (-a * torch.sigmoid(x))

    def ours(in_kernel):
        A_o, b_o = A_log.clone().requires_grad_(), dt_bias.clone().requires_grad_()
        kw = dict(use_gate_in_kernel=True, A_log=A_o, dt_bias=b_o, safe_gate=safe, lower_bound=lb)
        g_in = f.clone().requires_grad_()
        if not in_kernel:  # same kernel path: the safe gate's bound promised on g
            g_in, kw = kda_gate(g_in, A_o, b_o, lb), dict(gate_lower_bound=lb)
        o, ht = chunk_kda(
            q=q,
            k=k,
            v=v,
            g=g_in,
            beta=beta,
            initial_state=h0,
            output_final_state=True,
            cu_seqlens=cu_t,
            **kw,
        )
        ((o * do).sum() + (ht * dht).sum()).backward()
        return A_o.grad.double(), b_o.grad.double()

    dA, db = ours(True)
    dA_t, db_t = ours(False)
    for name, got, chained, want, terms in (
        ("dA", dA, dA_t, A_r.grad.double(), terms_A.flatten(0, 1).transpose(0, 1).flatten(1)),
        ("dbias", db, db_t, b_r.grad.double(), terms_b.flatten(0, 1).flatten(1).T),
    ):
        torch.testing.assert_close(terms.sum(1), want, rtol=1e-4, atol=1e-4)  # the sum's terms
        # channels whose tokens all decay by exactly 0 (f = -1000) have no terms
        absum = terms.abs().sum(1) + 1e-6 * terms.abs().sum(1).max()
        # the fused chain against the torch chain: fp32 sums in another order and the gate's
        # fp32 forward (exp / softplus) rounding apart: up to 1.9e-4 of sum|terms| seen
        chain = ((got - chained).abs() / absum).max().item()
        assert chain <= 1e-3, f"{name}: fused vs torch chain / sum|terms| = {chain:.2e}"
        # dg's error scales with dg's norm, not per element: a channel whose reference terms
        # nearly vanish still gets its share, so the bar is the largest sum |terms|
        ratio = ((got - want).abs().max() / absum.max()).item()
        assert ratio <= 0.03, f"{name}: error / max sum|terms| = {ratio:.2e} > 0.03"
