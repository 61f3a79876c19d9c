"""KDA backend dispatch (kimi_linear.backends): names, ``auto`` resolution, the two entry
points on every backend that runs here (torch; triton under the interpreter), errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kimi_linear.backends as backend_mod
from kimi_linear.backends import (
    dispatch_chunk_kda,
    dispatch_decode_kda,
    get_kda_backend,
    resolve_kda_backend,
)
from kimi_linear.config import KimiLinearConfig
from kimi_linear.ops import KDA_BACKENDS, naive_recurrent_kda, torch_chunk_kda

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def make_inputs(B, T, H=2, K=16, V=16, N=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, K, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B if N is None else N, H, K, V, generator=gen)
    return q, k, v, g, beta, h0


def reference(q, k, v, g, beta, h0, cu_seqlens=None):
    """float64 recurrence, per packed sequence when ``cu_seqlens`` is given."""
    x = [t.double() for t in (q, k, v, g, beta)]
    return naive_recurrent_kda(
        *x, initial_state=h0.double(), output_final_state=True, cu_seqlens=cu_seqlens
    )


# ------------------------------------------------------------------------------ names, resolution


def test_backend_names_live_in_one_place():
    import kimi_linear.config as config_mod
    import kimi_linear.ops.options as options_mod

    assert config_mod.KDA_BACKENDS is options_mod.KDA_BACKENDS is KDA_BACKENDS
    assert KDA_BACKENDS == ("auto", "torch", "triton", "fla")
    for name in KDA_BACKENDS:
        assert KimiLinearConfig.from_preset("tiny", kda_backend=name).kda_backend == name
    with pytest.raises(ValueError, match=r"kda_backend must be one of.*did you mean 'torch'"):
        KimiLinearConfig.from_preset("tiny", kda_backend="torh")


def test_validated_arch_set_holds_compute_capabilities():
    archs = backend_mod.VALIDATED_TRITON_ARCHS
    assert isinstance(archs, frozenset)
    assert all(
        isinstance(a, tuple) and len(a) == 2 and all(isinstance(i, int) for i in a) for a in archs
    )


def test_auto_is_torch_off_cuda_and_fla_on_unvalidated_gpus(monkeypatch):
    assert resolve_kda_backend("auto", CPU) == "torch"
    assert resolve_kda_backend("auto", "meta") == "torch"
    monkeypatch.setattr(backend_mod, "_cuda_capability", lambda index: (9, 0))
    monkeypatch.setattr(backend_mod, "VALIDATED_TRITON_ARCHS", frozenset())
    assert resolve_kda_backend("auto", CUDA) == "fla"
    monkeypatch.setattr(backend_mod, "VALIDATED_TRITON_ARCHS", frozenset({(9, 0)}))
    assert resolve_kda_backend("auto", CUDA) == "triton"
    assert resolve_kda_backend("auto", "cuda:0") == "triton"
    monkeypatch.setattr(backend_mod, "_cuda_capability", lambda index: (8, 0))
    assert resolve_kda_backend("auto", CUDA) == "fla"
    # explicit names are taken as given on CUDA
    for name in ("torch", "triton", "fla"):
        assert resolve_kda_backend(name, CUDA) == name


def test_resolution_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"kda_backend must be one of .*got 'cuda'"):
        resolve_kda_backend("cuda", CPU)
    with pytest.raises(ValueError, match=r"got None"):
        resolve_kda_backend(None, CPU)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kda_backend='fla'.*needs CUDA"):
        resolve_kda_backend("fla", CPU)
    with pytest.raises(ValueError, match="kda_backend='triton'.*needs CUDA"):
        resolve_kda_backend("triton", "meta")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kda_backend='triton'.*TRITON_INTERPRET=1"):
        resolve_kda_backend("triton", CPU)


def test_missing_fla_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla.ops.kda", None)  # import of it raises ImportError
    backend_mod._fla_backend.cache_clear()
    try:
        with pytest.raises(
            ValueError,
            match=r"needs fla\.ops\.kda: .* is not installed \(pip install flash-linear-attention\)",
        ):
            get_kda_backend("fla", CUDA)
    finally:
        backend_mod._fla_backend.cache_clear()


def test_get_kda_backend_gives_the_operators():
    ops = get_kda_backend("auto", CPU)
    assert (ops.name, ops.chunk, ops.recurrent) == ("torch", torch_chunk_kda, naive_recurrent_kda)
    assert get_kda_backend(ops, CUDA) is ops  # a resolved backend passes through
    from kimi_linear.kernels import chunk_kda, fused_recurrent_kda

    ops = get_kda_backend("triton", CPU)  # the interpreter is on in the test suite
    assert (ops.name, ops.chunk, ops.recurrent) == ("triton", chunk_kda, fused_recurrent_kda)


def test_config_imports_without_torch():
    """The command line loads the configuration (and so the backend names) before torch."""
    code = (
        "import sys, kimi_linear.config, kimi_linear.ops, kimi_linear.ops.options; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -------------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_chunked_entry_point_dense_and_packed(backend):
    q, k, v, g, beta, h0 = make_inputs(2, 21, seed=1)
    o, state = dispatch_chunk_kda(
        q, k, v, g, beta, backend=backend, initial_state=h0, output_final_state=True
    )
    ro, rstate = reference(q, k, v, g, beta, h0)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)
    o, none = dispatch_chunk_kda(q, k, v, g, beta, backend=backend)
    assert none is None and o.shape == (2, 21, 2, 16)

    cu = torch.tensor([0, 5, 5, 30], dtype=torch.int32)
    q, k, v, g, beta, h0 = make_inputs(1, 30, N=3, seed=2)
    o, state = dispatch_chunk_kda(
        q, k, v, g, beta, backend=backend, initial_state=h0, output_final_state=True, cu_seqlens=cu
    )
    ro, rstate = reference(q, k, v, g, beta, h0, cu_seqlens=cu)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_entry_point_dense_packed_and_multi_token(backend):
    q, k, v, g, beta, h0 = make_inputs(3, 1, seed=3)
    ro, rstate = reference(q, k, v, g, beta, h0)
    o, state = dispatch_decode_kda(q, k, v, g, beta, backend=backend, initial_state=h0)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)
    # the same three tokens packed as three sequences of one token
    packed = [t.transpose(0, 1) for t in (q, k, v, g, beta)]
    cu = torch.arange(4, dtype=torch.int32)
    o, state = dispatch_decode_kda(*packed, backend=backend, initial_state=h0, cu_seqlens=cu)
    torch.testing.assert_close(o.double(), ro.transpose(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)
    # any lengths (a short speculative block, say)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    q, k, v, g, beta, h0 = make_inputs(1, 3, N=2, seed=4)
    o, state = dispatch_decode_kda(
        q, k, v, g, beta, backend=backend, initial_state=h0, cu_seqlens=cu
    )
    ro, rstate = reference(q, k, v, g, beta, h0, cu_seqlens=cu)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)


def test_triton_decode_updates_the_state_in_place_only_when_allowed():
    q, k, v, g, beta, h0 = make_inputs(2, 1, seed=5)
    _, rstate = reference(q, k, v, g, beta, h0)
    state = h0.clone()
    _, new = dispatch_decode_kda(q, k, v, g, beta, backend="triton", initial_state=state)
    assert new is not state and torch.equal(state, h0)
    _, new = dispatch_decode_kda(
        q, k, v, g, beta, backend="triton", initial_state=state, inplace_state=True
    )
    assert new is state
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_stays_differentiable(backend):
    """With gradients needed the triton backend takes its chunked kernel, not the forward-only
    fused one; gradients match the float64 recurrence."""
    q, k, v, g, beta, h0 = (t.requires_grad_() for t in make_inputs(2, 1, seed=6))
    o, state = dispatch_decode_kda(q, k, v, g, beta, backend=backend, initial_state=h0)
    grads = torch.autograd.grad(o.sum() + state.square().sum(), (q, k, v, g, beta, h0))
    xs = [t.detach().double().requires_grad_() for t in (q, k, v, g, beta, h0)]
    ro, rstate = naive_recurrent_kda(*xs[:5], initial_state=xs[5], output_final_state=True)
    rgrads = torch.autograd.grad(ro.sum() + rstate.square().sum(), xs)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_entry_points_check_inputs_and_gates():
    q, k, v, g, beta, h0 = make_inputs(1, 4, seed=7)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        dispatch_chunk_kda(q, k[:, :2], v, g, beta, backend="torch")
    with pytest.raises(ValueError, match=r"g must be a log decay in \[-inf, 0\]"):
        dispatch_decode_kda(q[:, :1], k[:, :1], v[:, :1], -g[:, :1], beta[:, :1], backend="torch")
    with pytest.raises(ValueError, match="kda_backend must be one of"):
        dispatch_chunk_kda(q, k, v, g, beta, backend="flash")


@pytest.mark.slow  # importing fla takes ~10 s
def test_fla_decode_through_the_entry_point():
    """fla's fused recurrent kernel runs under the Triton interpreter (its chunked one needs a
    GPU driver): the entry point hands it int64 offsets and our checks run first."""
    import fla.ops.kda  # noqa: F401  (a dependency: a broken install fails here)

    ops = backend_mod._fla_backend()  # a resolved backend skips the CUDA-only resolution
    q, k, v, g, beta, h0 = make_inputs(1, 9, N=2, seed=8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    o, state = dispatch_decode_kda(
        q, k, v, g, beta, backend=ops, initial_state=h0.clone(), cu_seqlens=cu
    )
    ro, rstate = reference(q, k, v, g, beta, h0, cu_seqlens=cu)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\]"):
        dispatch_decode_kda(q, k, v, g, beta, backend=ops, initial_state=h0[:1], cu_seqlens=cu)


def test_old_op_names_warn_and_give_the_new_ops():
    """Issue 22 renames: the old user-facing names still work, with a DeprecationWarning that
    names the new one; the moved dispatcher names are gone from kimi_linear.ops."""
    import kimi_linear
    import kimi_linear.ops as ops

    for module, old, new in (
        (ops, "kda_chunk", "torch_chunk_kda"),
        (ops, "kda_recurrent", "naive_recurrent_kda"),
        (ops, "kda_decode_step", "naive_kda_step"),
        (kimi_linear, "kda_chunk", "torch_chunk_kda"),
        (kimi_linear, "kda_recurrent", "naive_recurrent_kda"),
    ):
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use .*{new}"):
            assert getattr(module, old) is getattr(ops, new)
    for gone in ("kda_chunked", "kda_decode"):
        with pytest.raises(AttributeError):
            getattr(ops, gone)
    assert torch.ops.kimi_linear.chunk_kda.default is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entry_points_take_gva(backend):
    """GVA through the dispatcher (q, k on 1 head; v, g, beta, state on 2): chunked and decode
    entry points against the float64 recurrence; fla's path refuses it with a clear error."""
    q, k, v, g, beta, h0 = make_inputs(2, 9, H=2, seed=5)
    q, k = q[:, :, :1].contiguous(), k[:, :, :1].contiguous()
    ro, rstate = reference(q, k, v, g, beta, h0)
    o, state = dispatch_chunk_kda(
        q, k, v, g, beta, backend=backend, initial_state=h0, output_final_state=True
    )
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)
    step = [t[:, :1] for t in (q, k, v, g, beta)]
    ro, rstate = reference(*step, h0)
    o, state = dispatch_decode_kda(*step, backend=backend, initial_state=h0)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), rstate, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="kda_backend='fla' with GVA"):
        backend_mod._fla_inputs(q, k, v, g, beta, None, h0, None)
