"""Serving-side KDA: fla's flags fused in the decode kernel, GVA, the state pool (vLLM's
``ssm_state_indices`` / ``num_accepted_tokens``) and intermediate states for prefix caching.

Kernels run under the Triton interpreter on CPU (conftest), so shapes are tiny. References:
the float64 recurrence :func:`kimi_linear.ops.naive_recurrent_kda` (q and k repeated explicitly over
the value heads for GVA; gate, sigmoid and L2 norm applied in float64) and fla's own naive
references (``naive_recurrent_kda``, ``naive_kda_gate``, ``naive_kda_lowerbound_gate``) at
fla's tolerance (``assert_close(..., 0.005)`` of fla's ``tests/ops/test_kda.py``: a norm-based
relative error, :func:`kimi_linear.testing.rel_error`). fp32 kernels are held to 1e-5 against
float64.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from kimi_linear.kernels import chunk_kda as triton_chunk_kda
from kimi_linear.kernels import fused_recurrent_kda

from kimi_linear.backends import dispatch_chunk_kda, dispatch_decode_kda
from kimi_linear.ops import naive_recurrent_kda, torch_chunk_kda
from kimi_linear.ops.serving import kda_pool_recurrent
from kimi_linear.testing import assert_rel_close, kda_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLA_RTOL = 5e-3  # fla's tolerance for fused_recurrent_kda's o / ht (tests/ops/test_kda.py)
FP32_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# inputs and references
# ---------------------------------------------------------------------------------------------
def raw_inputs(B, T, H, HV, K, V, *, seed=0, dtype=torch.float32, N=None):
    """Raw (pre-flag) inputs as fla's tests draw them: un-normalised q, k ``[B, T, H, K]``;
    v ``[B, T, HV, V]``; a gate projection ``f [B, T, HV, K]`` and its log-sigmoid decay ``g``;
    beta logits ``[B, T, HV]``; ``A_log [HV]``, ``dt_bias [HV * K]``; h0 ``[N or B, HV, K, V]``."""
    gen = torch.Generator().manual_seed(seed)
    x = dict(
        q=torch.randn(B, T, H, K, generator=gen),
        k=torch.randn(B, T, H, K, generator=gen),
        v=torch.randn(B, T, HV, V, generator=gen),
        f=torch.randn(B, T, HV, K, generator=gen),
        beta=torch.randn(B, T, HV, generator=gen),
        A_log=torch.randn(HV, generator=gen),
        dt_bias=torch.randn(HV * K, generator=gen),
        h0=torch.randn(B if N is None else N, HV, K, V, generator=gen),
    )
    x["g"] = F.logsigmoid(x["f"])
    for name in ("q", "k", "v"):
        x[name] = x[name].to(DEVICE, dtype)
    for name in ("f", "g", "beta", "A_log", "dt_bias", "h0"):
        x[name] = x[name].to(DEVICE)
    return x


def flagged_call(x, flags, gva_ok=True):
    """The kernel's positional inputs for ``flags``: ``g`` is the gate projection with
    ``use_gate_in_kernel``, else the decay; beta the logits with ``use_beta_sigmoid_in_kernel``,
    else ``sigmoid(logits)``; q / k L2-normalised unless normalised in the kernel."""
    q, k = x["q"], x["k"]
    if not flags.get("use_qk_l2norm_in_kernel"):
        q, k = (
            F.normalize(q.float(), dim=-1).to(q.dtype),
            F.normalize(k.float(), dim=-1).to(k.dtype),
        )
    g = x["f"] if flags.get("use_gate_in_kernel") else x["g"]
    beta = x["beta"] if flags.get("use_beta_sigmoid_in_kernel") else x["beta"].sigmoid()
    return q, k, x["v"], g, beta


def reference(x, flags, *, scale=None, cu_seqlens=None, h0=None):
    """float64 ``(o, ht)`` of :func:`naive_recurrent_kda` for the call ``flagged_call(x, flags)``:
    every flag applied explicitly, q and k repeated over the value heads (GVA)."""
    q, k, v, g, beta = (t.double() for t in flagged_call(x, flags))
    HV, H = v.shape[2], q.shape[2]
    if flags.get("use_qk_l2norm_in_kernel"):
        q, k = (t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    if flags.get("use_gate_in_kernel"):
        K = q.shape[-1]
        bias = flags.get("dt_bias")
        f = g + (0 if bias is None else bias.double().view(HV, K))
        A_log = flags.get("A_log")
        A = None if A_log is None else A_log.double().view(HV, 1).exp()
        lb = flags.get("lower_bound")
        if lb is None:
            g = -A * F.softplus(f)
        else:
            g = lb * torch.sigmoid(f if A is None else A * f)
    if flags.get("use_beta_sigmoid_in_kernel"):
        beta = torch.sigmoid(beta) * (2 if flags.get("allow_neg_eigval") else 1)
    q, k = (t.repeat_interleave(HV // H, dim=2) for t in (q, k))
    h0 = x["h0"] if h0 is None else h0
    return naive_recurrent_kda(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=h0.double(),
        output_final_state=True,
        cu_seqlens=cu_seqlens,
    )


def fla_reference(x, flags):
    """fla's naive references (fp32 inside) for the same call: ``naive_recurrent_kda`` (GVA
    built in) with fla's naive gates; the L2 norm and sigmoid as fla's tests apply them."""
    from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
    from fla.ops.kda.naive import naive_recurrent_kda

    q, k, v, g, beta = flagged_call(x, flags)
    if flags.get("use_qk_l2norm_in_kernel"):
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    if flags.get("use_gate_in_kernel"):
        lb = flags.get("lower_bound")
        if lb is None:
            g = naive_kda_gate(g, flags["A_log"], flags.get("dt_bias"))
        else:
            g = naive_kda_lowerbound_gate(g, flags.get("A_log"), flags.get("dt_bias"), lb)
    if flags.get("use_beta_sigmoid_in_kernel"):
        beta = beta.sigmoid() * (2 if flags.get("allow_neg_eigval") else 1)
    return naive_recurrent_kda(q, k, v, g, beta, initial_state=x["h0"], output_final_state=True)


FLAG_CASES = {
    "plain": dict(),
    "l2norm": dict(use_qk_l2norm_in_kernel=True),
    "release-gate": dict(use_gate_in_kernel=True, A_log=True, dt_bias=True),
    "release-gate-no-bias": dict(use_gate_in_kernel=True, A_log=True),
    "safe-gate": dict(use_gate_in_kernel=True, A_log=True, dt_bias=True, lower_bound=-5.0),
    "safe-gate-no-A_log": dict(use_gate_in_kernel=True, dt_bias=True, lower_bound=-3.0),
    "beta-sigmoid": dict(use_beta_sigmoid_in_kernel=True),
    "neg-eigval": dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True),
    # the call of fla's KimiDeltaAttention layer (fla/layers/kda.py), minus state_v_first
    "fla-layer": dict(
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        A_log=True,
        dt_bias=True,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=True,
        lower_bound=-5.0,
    ),
}


def resolve(x, case):
    """FLAG_CASES[case] with ``A_log`` / ``dt_bias`` filled in from ``x``."""
    flags = dict(FLAG_CASES[case])
    for name in ("A_log", "dt_bias"):
        if flags.get(name):
            flags[name] = x[name]
    return flags


# ---------------------------------------------------------------------------------------------
# fla's flags, fused in the kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("HV", [2, 4], ids=["HV=H", "GVA-HV=2H"])
@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_flags_match_float64_and_fla_naive_references(case, HV):
    x = raw_inputs(2, 6, 2, HV, 16, 16, seed=sorted(FLAG_CASES).index(case))
    flags = resolve(x, case)
    o, ht = fused_recurrent_kda(
        *flagged_call(x, flags), scale=0.3, initial_state=x["h0"], output_final_state=True, **flags
    )
    ro, rht = reference(x, flags, scale=0.3)
    assert_rel_close(o, ro, FP32_RTOL, "o")
    assert_rel_close(ht, rht, FP32_RTOL, "ht")
    fo, fht = fla_reference(x, dict(flags))
    # fla's naive reference runs with fla's default scale
    ours, _ = fused_recurrent_kda(
        *flagged_call(x, flags), initial_state=x["h0"], output_final_state=True, **flags
    )
    assert_rel_close(ours, fo, FLA_RTOL, "o vs fla naive")


@pytest.mark.parametrize("case", ["fla-layer", "release-gate", "plain"])
def test_same_call_as_fla_fused_recurrent_kda(case):
    """A call written for fla (keywords, state_v_first as fla's layer uses it, packed
    sequences) gives fla's kernel's results: the import is the only change."""
    import fla.ops.kda as fla_kda

    x = raw_inputs(1, 9, 2, 4, 16, 32, seed=7, N=3)
    flags = resolve(x, case)
    q, k, v, g, beta = flagged_call(x, flags)
    h0 = x["h0"].transpose(-1, -2).contiguous()  # [N, HV, V, K]
    call = dict(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        initial_state=h0,
        output_final_state=True,
        state_v_first=True,
        cu_seqlens=torch.tensor([0, 2, 7, 9], device=DEVICE),
        **flags,
    )
    o, ht = fused_recurrent_kda(**call)
    fo, fht = fla_kda.fused_recurrent_kda(
        **{n: t.clone() if torch.is_tensor(t) else t for n, t in call.items()}
    )
    assert_rel_close(o, fo, FP32_RTOL, "o vs fla")
    assert_rel_close(ht, fht, FP32_RTOL, "ht vs fla")
    assert ht.shape == h0.shape
    ro, rht = reference(x, flags, cu_seqlens=call["cu_seqlens"])
    assert_rel_close(o, ro, FP32_RTOL, "o")
    assert_rel_close(ht.transpose(-1, -2), rht, FP32_RTOL, "ht")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flags_16bit_at_fla_tolerance(dtype):
    x = raw_inputs(2, 8, 1, 2, 32, 16, seed=21, dtype=dtype)
    flags = resolve(x, "fla-layer")
    o, ht = fused_recurrent_kda(
        *flagged_call(x, flags), initial_state=x["h0"], output_final_state=True, **flags
    )
    assert o.dtype == dtype and ht.dtype == torch.float32
    ro, rht = reference(x, flags)
    assert_rel_close(o, ro, FLA_RTOL, "o")
    assert_rel_close(ht, rht, FLA_RTOL, "ht")


def test_gva_equals_explicit_repeat_of_q_and_k():
    """Value head i reads key head i // G in place: bit for bit the run with q and k repeated."""
    x = raw_inputs(2, 5, 2, 6, 16, 16, seed=3)
    flags = resolve(x, "fla-layer")
    q, k, v, g, beta = flagged_call(x, flags)
    o, ht = fused_recurrent_kda(
        q, k, v, g, beta, initial_state=x["h0"], output_final_state=True, **flags
    )
    qr, kr = (t.repeat_interleave(3, dim=2) for t in (q, k))
    o2, ht2 = fused_recurrent_kda(
        qr, kr, v, g, beta, initial_state=x["h0"], output_final_state=True, **flags
    )
    assert torch.equal(o, o2) and torch.equal(ht, ht2)


def test_signature_is_fla_s():
    """fla's parameters, in fla's order, with fla's defaults (a call by position or keyword
    written for fla binds the same way); ours follow, keyword-only."""
    import fla.ops.kda as fla_kda

    theirs = [
        p
        for p in inspect.signature(fla_kda.fused_recurrent_kda).parameters.values()
        if p.kind != p.VAR_KEYWORD
    ]
    ours = list(inspect.signature(fused_recurrent_kda).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.default) for p in theirs
    ]
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs) :])


def test_forward_only_under_autograd_with_gate_parameters():
    x = raw_inputs(1, 3, 1, 1, 16, 16, seed=4)
    flags = resolve(x, "release-gate")
    flags["A_log"] = flags["A_log"].clone().requires_grad_()
    o, _ = fused_recurrent_kda(*flagged_call(x, flags), **flags)
    with pytest.raises(RuntimeError, match="forward-only"):
        o.sum().backward()


def _bad_flag_cases():
    x = raw_inputs(1, 4, 2, 4, 16, 16, seed=5)
    q, k, v, g, beta = flagged_call(x, {})
    base = dict(q=q, k=k, v=v, g=g, beta=beta)
    gate = dict(base, use_gate_in_kernel=True, A_log=x["A_log"])
    return {
        "neg-eigval-without-sigmoid": (
            dict(base, allow_neg_eigval=True),
            "allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True",
        ),
        "A_log-without-gate": (dict(base, A_log=x["A_log"]), "A_log is used only with"),
        "lower_bound-without-gate": (dict(base, lower_bound=-5.0), "lower_bound is used only"),
        "gate-without-A_log": (
            dict(base, use_gate_in_kernel=True),
            "A_log must be provided when use_gate_in_kernel=True",
        ),
        "A_log-size": (dict(gate, A_log=x["A_log"][:2]), r"A_log must hold HV=4 values"),
        "dt_bias-size": (dict(gate, dt_bias=x["dt_bias"][:16]), r"dt_bias must hold HV \* K=64"),
        "lower_bound-positive": (dict(gate, lower_bound=0.5), "finite number < 0"),
        "lower_bound-nan": (dict(gate, lower_bound=float("nan")), "finite number < 0"),
        "heads-not-multiple": (dict(base, v=v[:, :, :3]), "positive multiple of q and k's"),
        "g-heads": (dict(base, g=g[:, :, :2]), r"g must be \[B, T, HV, K\]"),
        "beta-heads": (dict(base, beta=beta[:, :, :2]), r"beta must be \[B, T, HV\]"),
        "state-heads": (
            dict(base, initial_state=x["h0"][:, :2]),
            r"initial_state must be \[N, H, K, V\] = \[1, 4, 16, 16\]",
        ),
    }


BAD_FLAGS = _bad_flag_cases()


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_raise(case):
    kwargs, message = BAD_FLAGS[case]
    with pytest.raises(ValueError, match=message):
        fused_recurrent_kda(**kwargs)


# ---------------------------------------------------------------------------------------------
# the state pool (ssm_state_indices), decode
# ---------------------------------------------------------------------------------------------
def recurrence(x, slot_states, bos, eos, n_tokens=None):
    """float64 state after running sequence tokens ``bos:eos`` of the packed inputs ``x``
    (q, k, v, g, beta ``[1, TT, ...]``) from ``slot_states`` ``[H, K, V]``; and the outputs."""
    o, S = naive_recurrent_kda(
        *(t[:, bos:eos].double() for t in x),
        initial_state=slot_states.double()[None],
        output_final_state=True,
    )
    return o[0], S[0]


def test_pool_decode_steps_random_slots_and_padding():
    """Three decode steps of 5 sequences (one a pad) in a pool of 12 slots at random places:
    every step equals the recurrence from the pool's initial states, the padded row gives
    zeros, and slots no sequence owns are never touched (bit for bit)."""
    H, K, V, N, steps = 2, 16, 16, 5, 3
    gen = torch.Generator().manual_seed(0)
    pool0 = torch.randn(12, H, K, V, generator=gen).to(DEVICE)
    slots = torch.randperm(12, generator=gen)[:N]
    slots[3] = -1  # a padded batch row (vLLM's PAD_SLOT_ID)
    idx = slots.to(DEVICE)
    q, k, v, g, beta, _ = kda_inputs(N, steps, H, K, V, device=DEVICE, seed=1)
    pool = pool0.clone()
    for t in range(steps):
        step = [x[:, t : t + 1] for x in (q, k, v, g, beta)]
        o, ret = fused_recurrent_kda(*step, initial_state=pool, ssm_state_indices=idx)
        assert ret is pool
        for n in range(N):
            if slots[n] < 0:
                assert torch.equal(o[n], torch.zeros_like(o[n]))
                continue
            ro, rS = recurrence(
                [x[n : n + 1] for x in (q, k, v, g, beta)], pool0[slots[n]], 0, t + 1
            )
            assert_rel_close(o[n, 0], ro[t], FP32_RTOL, f"o (step {t}, sequence {n})")
            assert_rel_close(pool[slots[n]], rS, FP32_RTOL, f"slot of sequence {n}")
    untouched = sorted(set(range(12)) - {int(s) for s in slots if s >= 0})
    assert torch.equal(pool[untouched], pool0[untouched])
    # the torch backend of dispatch_decode_kda and the dispatcher's triton path agree with the kernel
    for backend in ("torch", "triton"):
        other = pool0.clone()
        for t in range(steps):
            step = [x[:, t : t + 1] for x in (q, k, v, g, beta)]
            dispatch_decode_kda(*step, backend=backend, initial_state=other, ssm_state_indices=idx)
        assert_rel_close(other, pool, FP32_RTOL, f"pool ({backend} backend)")


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_pool_varlen_prefill_chunks_and_strided_pool(pool_dtype):
    """Packed sequences of several tokens with a [N] slot table, into a pool that is a strided
    view of a larger cache (vLLM's layout) and, in bf16, stored rounded."""
    H, HV, K, V = 1, 2, 16, 32
    x = raw_inputs(1, 9, H, HV, K, V, seed=8)
    flags = resolve(x, "fla-layer")
    cache = torch.randn(6, 2, HV, K, V, device=DEVICE).to(pool_dtype)  # [slots, (conv | ssm) ...]
    pool = cache[:, 1]  # stride(0) = 2 * HV * K * V
    before = cache.clone()
    cu = torch.tensor([0, 4, 4, 9], device=DEVICE)
    idx = torch.tensor([4, 0, 1], dtype=torch.int32, device=DEVICE)
    o, _ = fused_recurrent_kda(
        *flagged_call(x, flags), initial_state=pool, ssm_state_indices=idx, cu_seqlens=cu, **flags
    )
    h0 = before[:, 1][idx.long()].float()
    ro, rht = reference(x, flags, cu_seqlens=cu, h0=h0)
    rtol = FP32_RTOL if pool_dtype == torch.float32 else FLA_RTOL
    assert_rel_close(o, ro, rtol, "o")
    assert_rel_close(pool[idx.long()].float(), rht, rtol, "written slots")
    assert torch.equal(cache[:, 0], before[:, 0])  # the conv half of the cache is untouched
    assert torch.equal(cache[[2, 3, 5]], before[[2, 3, 5]])


# ---------------------------------------------------------------------------------------------
# speculative decoding: per-token states, num_accepted_tokens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_speculative_verification_continues_from_the_accepted_prefix(backend):
    """Verify S=3 draft tokens per sequence (the state after each written to its slot), accept
    a prefix per sequence, then continue from the state after the last accepted token: equal
    to running the recurrence over the accepted tokens only, token by token."""
    H, K, V, S = 2, 16, 16, 3
    run = fused_recurrent_kda if backend == "kernel" else kda_pool_recurrent
    gen = torch.Generator().manual_seed(2)
    pool0 = torch.randn(16, H, K, V, generator=gen).to(DEVICE)
    # each row: this sequence's slots for token positions 0..S-1; row 3 is a padded request
    table = torch.randperm(16, generator=gen)[: 3 * S].view(3, S)
    table = torch.cat([table, torch.full((1, S), -1)]).to(DEVICE)
    start = pool0[table[:3, 0]]  # states before the draft: in column 0
    verify = kda_inputs(1, 4 * S, H, K, V, device=DEVICE, seed=3)[:5]  # 3 drafts per sequence
    cu1 = torch.tensor([0, 3, 6, 9, 9], device=DEVICE)  # the padded row has no tokens
    pool = pool0.clone()
    verify = [x[:, : 3 * S] for x in verify]
    o1, _ = run(*verify, initial_state=pool, ssm_state_indices=table, cu_seqlens=cu1)
    for n in range(3):
        ro, _ = recurrence(verify, start[n], 3 * n, 3 * n + S)
        assert_rel_close(o1[0, 3 * n : 3 * n + S], ro, FP32_RTOL, f"verify o (sequence {n})")
        for j in range(S):  # the state after draft token j sits in column j
            _, rS = recurrence(verify, start[n], 3 * n, 3 * n + j + 1)
            assert_rel_close(pool[table[n, j]], rS, FP32_RTOL, f"state after token {j}")
    # the sampler accepted 1, 3 and 2 tokens; next step: 2 new tokens per sequence
    accepted = torch.tensor([1, 3, 2, 1], device=DEVICE)
    nxt = kda_inputs(1, 6, H, K, V, device=DEVICE, seed=4)[:5]
    cu2 = torch.tensor([0, 2, 4, 6, 6], device=DEVICE)
    before = pool.clone()
    o2, _ = run(
        *nxt,
        initial_state=pool,
        ssm_state_indices=table,
        num_accepted_tokens=accepted,
        cu_seqlens=cu2,
    )
    for n in range(3):
        a = int(accepted[n])
        # the recurrence over the accepted draft tokens only, then the new ones
        _, prefix = recurrence(verify, start[n], 3 * n, 3 * n + a)
        ro, _ = recurrence(nxt, prefix, 2 * n, 2 * n + 2)
        assert_rel_close(o2[0, 2 * n : 2 * n + 2], ro, FP32_RTOL, f"continued o (sequence {n})")
    used = {int(s) for s in table[:3].flatten()}
    free = sorted(set(range(16)) - used)
    assert torch.equal(pool[free], before[free]) and torch.equal(pool[free], pool0[free])
    # the same call reading the pool only: every token's state comes back instead
    ref_pool = pool.clone()
    o3, states = run(
        *nxt,
        initial_state=before.clone(),
        ssm_state_indices=table,
        num_accepted_tokens=accepted,
        cu_seqlens=cu2,
        inplace_final_state=False,
    )
    assert states.shape == (6, H, K, V)
    torch.testing.assert_close(o3, o2, rtol=0, atol=0)
    for n in range(3):
        for j in range(2):
            torch.testing.assert_close(states[2 * n + j], ref_pool[table[n, j]], rtol=0, atol=0)


def test_kernel_and_torch_pool_reference_agree_on_per_token_states():
    H, K, V = 1, 16, 16
    gen = torch.Generator().manual_seed(9)
    pool = torch.randn(5, H, K, V, generator=gen).to(DEVICE)
    inputs = kda_inputs(1, 5, H, K, V, device=DEVICE, seed=9)[:5]
    table = torch.tensor([[3, 1, 0], [2, 4, -1]], device=DEVICE)
    cu = torch.tensor([0, 3, 5], device=DEVICE)
    kw = dict(ssm_state_indices=table, cu_seqlens=cu, inplace_final_state=False)
    o, states = fused_recurrent_kda(*inputs, initial_state=pool, **kw)
    ro, rstates = kda_pool_recurrent(*inputs, initial_state=pool, **kw)
    assert_rel_close(o, ro, FP32_RTOL, "o")
    assert_rel_close(states, rstates, FP32_RTOL, "per-token states")


def _bad_pool_cases():
    H, K, V = 1, 16, 16
    q, k, v, g, beta, _ = kda_inputs(1, 4, H, K, V, device=DEVICE, seed=10)
    pool = torch.zeros(4, H, K, V, device=DEVICE)
    cu = torch.tensor([0, 2, 4], device=DEVICE)
    base = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=pool, cu_seqlens=cu)
    two = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    return {
        "no-pool": (
            dict(base, initial_state=None, ssm_state_indices=torch.tensor([0, 1])),
            "pass the pool",
        ),
        "pool-shape": (
            dict(base, initial_state=pool[..., :8], ssm_state_indices=torch.tensor([0, 1])),
            r"the state pool\) must be \[num_slots, HV, K, V\]",
        ),
        "indices-N": (dict(base, ssm_state_indices=torch.tensor([0])), "N=2 sequences"),
        "indices-dtype": (dict(base, ssm_state_indices=torch.tensor([0.0, 1.0])), "int32 or"),
        "slot-range": (dict(base, ssm_state_indices=torch.tensor([0, 4])), "pool has 4 slots"),
        "shared-slot": (dict(base, ssm_state_indices=torch.tensor([1, 1])), "used by sequences"),
        "accepted-1d": (
            dict(base, ssm_state_indices=torch.tensor([0, 1]), num_accepted_tokens=cu[:2]),
            r"needs ssm_state_indices \[N, S\]",
        ),
        "accepted-range": (
            dict(base, ssm_state_indices=two, num_accepted_tokens=torch.tensor([0, 1])),
            r"must be in \[1, S=2\]",
        ),
        "columns": (
            dict(base, ssm_state_indices=two[:, :1]),
            "has 2 tokens but ssm_state_indices has S=1 columns",
        ),
        "no-indices": (
            dict(base, initial_state=None, inplace_final_state=True),
            "apply to a state pool",
        ),
        "inplace-and-pool": (
            dict(base, ssm_state_indices=torch.tensor([0, 1]), inplace_state=True),
            "updated in place already",
        ),
    }


BAD_POOL = _bad_pool_cases()


@pytest.mark.parametrize("case", sorted(BAD_POOL))
def test_bad_pool_arguments_raise(case):
    kwargs, message = BAD_POOL[case]
    with pytest.raises(ValueError, match=message):
        fused_recurrent_kda(**kwargs)


def test_dispatcher_refuses_pool_on_fla_and_with_grad():
    q, k, v, g, beta, _ = kda_inputs(2, 1, 1, 16, 16, device=DEVICE, seed=11)
    pool = torch.zeros(3, 1, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="forward-only"):
        dispatch_decode_kda(
            q.requires_grad_(),
            k,
            v,
            g,
            beta,
            backend="torch",
            initial_state=pool,
            ssm_state_indices=torch.tensor([0, 1]),
        )
    with pytest.raises(ValueError, match="applies to a state pool"):
        dispatch_decode_kda(q.detach(), k, v, g, beta, backend="torch", inplace_final_state=False)


# ---------------------------------------------------------------------------------------------
# prefix caching: intermediate states of the chunked prefill
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, FP32_RTOL)])
def test_prefix_hit_resumed_from_an_intermediate_state_equals_full_recompute(dtype, rtol):
    B, T, H, K, V, C = 2, 50, 2, 16, 8, 16
    q, k, v, g, beta, h0 = (x.to(dtype) for x in kda_inputs(B, T, H, K, V, seed=12))
    o, ht, h = dispatch_chunk_kda(
        q,
        k,
        v,
        g,
        beta,
        backend="torch",
        initial_state=h0,
        output_final_state=True,
        chunk_size=C,
        return_intermediate_states=True,
    )
    assert h.shape == (B, 4, H, K, V) and not h.requires_grad
    torch.testing.assert_close(h[:, 0], h0.to(h.dtype), rtol=0, atol=0)
    for i in range(1, 4):
        t = i * C
        _, rS = naive_recurrent_kda(
            *(x[:, :t].double() for x in (q, k, v, g, beta)),
            initial_state=h0.double(),
            output_final_state=True,
        )
        assert_rel_close(h[:, i], rS, rtol, f"state after {t} tokens")
        # a prefix-cache hit: the suffix resumed from the stored state (chunked prefill, or
        # our decode kernel token by token) equals the full recompute
        so, sS = torch_chunk_kda(
            *(x[:, t:] for x in (q, k, v, g, beta)),
            initial_state=h[:, i],
            output_final_state=True,
            chunk_size=C,
        )
        assert_rel_close(so, o[:, t:], rtol, f"suffix outputs after {t}")
        assert_rel_close(sS, ht, rtol, f"final state after {t}")
    if dtype == torch.float32:
        t = 2 * C
        do, dS = fused_recurrent_kda(
            *(x[:, t:] for x in (q, k, v, g, beta)), initial_state=h[:, 2], output_final_state=True
        )
        assert_rel_close(do, o[:, t:], rtol, "decode kernel from the stored state")
        assert_rel_close(dS, ht, rtol, "decode kernel final state")


def test_intermediate_states_packed_layout_and_gradients():
    """Packed sequences: [1, NT, H, K, V], each sequence's ceil(length / chunk_size) states in
    order (an empty sequence has none); gradients through o and the final state unchanged."""
    H, K, V, C = 1, 16, 8, 16
    lengths = [5, 0, 40, 16]
    offsets = [0, 5, 5, 45, 61]
    x = [t.double() for t in kda_inputs(1, 61, H, K, V, seed=13, N=4)]
    leaves = [t.clone().requires_grad_() for t in x]
    cu = torch.tensor(offsets)
    o, ht, h = torch_chunk_kda(
        *leaves[:5],
        initial_state=leaves[5],
        output_final_state=True,
        cu_seqlens=cu,
        chunk_size=C,
        return_intermediate_states=True,
    )
    assert h.shape == (1, 1 + 0 + 3 + 1, H, K, V)
    row = 0
    for n, length in enumerate(lengths):
        for i in range(-(-length // C)):
            bos = offsets[n]
            _, rS = naive_recurrent_kda(
                *(t[:, bos : bos + i * C] for t in x[:5]),
                initial_state=x[5][n : n + 1],
                output_final_state=True,
            )
            assert_rel_close(h[:, row], rS, 1e-10, f"sequence {n}, chunk {i}")
            row += 1
    (o.sum() + ht.sum()).backward()
    plain = [t.clone().requires_grad_() for t in x]
    o2, ht2 = torch_chunk_kda(
        *plain[:5], initial_state=plain[5], output_final_state=True, cu_seqlens=cu, chunk_size=C
    )
    (o2.sum() + ht2.sum()).backward()
    for a, b in zip(leaves, plain):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_intermediate_states_after_a_poisoned_token_are_nan():
    """A NaN key at token 20 poisons the states after it (chunks 2, 3 of that head and row),
    as the recurrence has it; every other state is exact."""
    B, T, H, K, V, C = 2, 50, 2, 16, 8, 16
    q, k, v, g, beta, h0 = kda_inputs(B, T, H, K, V, seed=14)
    k = k.clone()
    k[1, 20, 0, 3] = float("nan")
    _, _, h = torch_chunk_kda(
        q, k, v, g, beta, initial_state=h0, chunk_size=C, return_intermediate_states=True
    )
    bad = torch.zeros(B, 4, H, dtype=torch.bool)
    bad[1, 2:, 0] = True
    assert h[bad].isnan().all()
    assert torch.isfinite(h[~bad]).all()


def _recurrent_state(x: list[torch.Tensor], h0: torch.Tensor, group: int = 1) -> torch.Tensor:
    """The float64 recurrence's state after the tokens of ``x = [q, k, v, g, beta]`` (GVA:
    q and k repeated over their ``group`` of value heads, for the reference only)."""
    q, k, v, g, beta = (t.double() for t in x)
    if group > 1:
        q, k = (t.repeat_interleave(group, dim=2) for t in (q, k))
    _, S = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0.double(), output_final_state=True)
    return S


@pytest.mark.parametrize("group", [1, 2], ids=["MHA", "GVA"])
def test_triton_prefix_hit_resumed_from_an_intermediate_state_equals_full_recompute(group):
    """Our chunk kernels' ``return_intermediate_states`` (fla's flag and layout): h[:, i] is the
    float64 recurrence's state after 64 * i tokens, and a suffix resumed from it (a prefix-cache
    hit, run by the same kernels) equals the full recompute, outputs and final state."""
    B, T, H, K, V = 1, 140, 1, 16, 16  # chunks of 64, 64 and a 12-token tail
    q, k, v, g, beta, _ = kda_inputs(B, T, H, K, V, device=DEVICE, seed=17)
    v, g, beta, h0 = kda_inputs(B, T, H * group, K, V, device=DEVICE, seed=18)[2:]
    x = [q, k, v, g, beta]
    with torch.inference_mode():
        o, ht, h = triton_chunk_kda(
            *x, initial_state=h0, output_final_state=True, return_intermediate_states=True
        )
    assert h.shape == (B, 3, H * group, K, V) and h.dtype == q.dtype
    torch.testing.assert_close(h[:, 0], h0, rtol=0, atol=0)
    for i in (1, 2):
        t = 64 * i
        ref = _recurrent_state([y[:, :t] for y in x], h0, group)
        assert_rel_close(h[:, i], ref, FP32_RTOL, f"state after {t} tokens")
        with torch.inference_mode():
            so, sS = triton_chunk_kda(
                *(y[:, t:] for y in x), initial_state=h[:, i], output_final_state=True
            )
        assert_rel_close(so, o[:, t:], FP32_RTOL, f"suffix outputs after {t}")
        assert_rel_close(sS, ht, FP32_RTOL, f"final state after {t}")
    # the dispatcher's triton backend returns the same states
    with torch.inference_mode():
        _, _, hd = dispatch_chunk_kda(
            *x, backend="triton", initial_state=h0, return_intermediate_states=True
        )
    torch.testing.assert_close(hd, h, rtol=0, atol=0)


def test_triton_intermediate_states_packed_layout_and_state_v_first():
    """Packed sequences: [1, NT, HV, K, V], each sequence's ceil(length / 64) states in order (an
    empty sequence has none), each the float64 recurrence's; state_v_first gives [..., V, K]."""
    H, K, V = 1, 16, 8
    offsets = [0, 70, 70, 75, 205]  # 2, 0, 1 and 3 chunks
    q, k, v, g, beta, h0 = kda_inputs(1, 205, H, K, V, device=DEVICE, seed=19, N=4)
    x = [q, k, v, g, beta]
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    with torch.inference_mode():
        _, _, h = triton_chunk_kda(
            *x, initial_state=h0, cu_seqlens=cu, return_intermediate_states=True
        )
        _, _, hv = triton_chunk_kda(
            *x,
            initial_state=h0.transpose(-1, -2).contiguous(),
            cu_seqlens=cu,
            cu_seqlens_cpu=cu.cpu(),
            state_v_first=True,
            return_intermediate_states=True,
        )
    assert h.shape == (1, 6, H, K, V) and hv.shape == (1, 6, H, V, K)
    torch.testing.assert_close(hv, h.transpose(-1, -2), rtol=0, atol=0)
    row = 0
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        for i in range(-(-(eos - bos) // 64)):
            ref = _recurrent_state([y[:, bos : bos + 64 * i] for y in x], h0[n : n + 1])
            assert_rel_close(h[:, row], ref, FP32_RTOL, f"sequence {n}, chunk {i}")
            row += 1


def test_triton_intermediate_states_after_a_poisoned_token_are_nan():
    """A NaN key at token 70 of head 1 poisons that head's states after it (chunk 2), as the
    recurrence has it; every other state is finite and unchanged."""
    B, T, H, K, V = 1, 140, 2, 16, 8
    q, k, v, g, beta, h0 = kda_inputs(B, T, H, K, V, device=DEVICE, seed=20)
    with torch.inference_mode():
        _, _, clean = triton_chunk_kda(
            q, k, v, g, beta, initial_state=h0, return_intermediate_states=True
        )
        k = k.clone()
        k[0, 70, 1, 3] = float("nan")
        _, _, h = triton_chunk_kda(
            q, k, v, g, beta, initial_state=h0, return_intermediate_states=True
        )
    bad = torch.zeros(B, 3, H, dtype=torch.bool, device=DEVICE)
    bad[0, 2, 1] = True
    assert h[bad].isnan().all()
    torch.testing.assert_close(h[~bad], clean[~bad], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, inference, match",
    [
        ({}, False, "inference-only"),
        (dict(disable_recompute=True), True, "must be used with disable_recompute=False"),
        (dict(chunk_size=32), True, "needs chunk_size=64"),
    ],
    ids=["autograd", "disable_recompute", "chunk32"],
)
def test_triton_intermediate_states_misuse(kwargs, inference, match):
    """fla's rules (inference mode only, recomputation on), and our 64-token chunks."""
    q, k, v, g, beta, _ = kda_inputs(1, 4, 1, 16, 16, device=DEVICE, seed=15)
    with torch.inference_mode(inference), pytest.raises(ValueError, match=match):
        triton_chunk_kda(q, k, v, g, beta, return_intermediate_states=True, **kwargs)


def test_dispatch_intermediate_states_triton_rules():
    q, k, v, g, beta, _ = kda_inputs(1, 4, 1, 16, 16, device=DEVICE, seed=15)
    kw = dict(backend="triton", return_intermediate_states=True)
    with pytest.raises(ValueError, match="needs torch.inference_mode"):
        dispatch_chunk_kda(q, k, v, g, beta, **kw)
    with torch.inference_mode(), pytest.raises(ValueError, match="needs chunk_size=64"):
        dispatch_chunk_kda(q, k, v, g, beta, chunk_size=32, **kw)


def test_state_pool_object_serves_prefix_hits_and_recycles_slots():
    """KDAStatePool end to end: a prefill's intermediate state stored as a new sequence's slot
    (a prefix-cache hit), decoded from there with the pool kernel: equal to the full run;
    freed slots are handed out again, zeroed; misuse is a ValueError."""
    from kimi_linear.cache import KDAStatePool

    B, T, H, K, V, C = 2, 40, 1, 16, 16, 16
    q, k, v, g, beta, h0 = kda_inputs(B, T, H, K, V, device=DEVICE, seed=16)
    pool = KDAStatePool(6, H, K, V, device=DEVICE)
    o_full, _ = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0)
    with torch.no_grad():
        _, _, h = dispatch_chunk_kda(
            *(x[:, :32] for x in (q, k, v, g, beta)),
            backend="torch",
            initial_state=h0,
            chunk_size=C,
            return_intermediate_states=True,
        )
    slots = pool.allocate(B)
    assert pool.num_free == 4 and slots.dtype == torch.int32
    pool.store(slots, h[:, 1])  # both rows hit the cached 16-token prefix
    for t in range(C, C + 3):  # decode three tokens from the cached state
        o, _ = fused_recurrent_kda(
            *(x[:, t : t + 1] for x in (q, k, v, g, beta)),
            initial_state=pool.state,
            ssm_state_indices=slots,
        )
        assert_rel_close(o, o_full[:, t : t + 1], FP32_RTOL, f"o at token {t}")
    pool.free(slots)
    again = pool.allocate(6)
    assert sorted(again.tolist()) == list(range(6)) and pool.num_free == 0
    assert torch.equal(pool.load(again), torch.zeros(6, H, K, V, device=DEVICE))
    with pytest.raises(ValueError, match="cannot allocate 1 state slots: 0 are free"):
        pool.allocate(1)
    pool.free(again[:2])
    with pytest.raises(ValueError, match="slot 0 is not an allocated slot"):
        pool.free(torch.tensor([0]))
    pool.free(torch.tensor([-1]))  # padding is ignored
    with pytest.raises(ValueError, match="num_slots must be a positive int"):
        KDAStatePool(0, H, K, V)
