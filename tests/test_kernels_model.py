"""The model with ``kda_backend="triton"`` trains and decodes like the pure-PyTorch backend.

Same initial weights and data for both backends; a few AdamW steps on the ``tiny`` preset must
give the same losses (1e-4 relative) and weights (1e-4 absolute). On CPU the kernels run under
the Triton interpreter (conftest.py), so the sequences are short.
"""

from __future__ import annotations

import pytest
import torch

from kimi_linear import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(backend: str, state: dict | None = None) -> KimiLinearForCausalLM:
    cfg = KimiLinearConfig.from_preset("tiny", kda_backend=backend)
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg).to(DEVICE)
    if state is not None:
        model.load_state_dict(state)
    return model


def train(model: KimiLinearForCausalLM, batches: list[torch.Tensor]) -> list[float]:
    # eps well above fp32 rounding noise of the gradients: Adam's first step moves a weight by
    # ~lr * sign(grad), so with the default eps a gradient at the rounding level (e.g. -3e-7 vs
    # +2e-8 on an embedding entry whose row peaks at 3.5e-2) would flip a 3e-3 update.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-4)
    losses = []
    for ids in batches:
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses


@pytest.mark.slow
def test_triton_backend_trains_like_torch_backend():
    reference = build("torch")
    ours = build("triton", reference.state_dict())
    assert any(getattr(layer.self_attn, "backend", None) == "triton" for layer in ours.model.layers)
    gen = torch.Generator().manual_seed(0)
    vocab = reference.config.vocab_size
    # T = 70 crosses a chunk boundary and leaves a tail chunk
    batches = [torch.randint(0, vocab, (2, 70), generator=gen).to(DEVICE) for _ in range(3)]
    ref_losses = train(reference, batches)
    our_losses = train(ours, batches)
    torch.testing.assert_close(
        torch.tensor(our_losses), torch.tensor(ref_losses), rtol=1e-4, atol=0
    )
    ref_params = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-4, rtol=0, msg=f"parameter {name}")


def test_triton_backend_cached_decode_matches_torch_backend():
    reference = build("torch").eval()
    ours = build("triton", reference.state_dict()).eval()
    ids = torch.randint(
        0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(DEVICE)
    with torch.no_grad():
        outs = {}
        for name, model in (("torch", reference), ("triton", ours)):
            cache = model.new_cache(2)
            pieces = [model(ids[:, :9], cache=cache)]  # chunked prefill
            pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 12)]  # decode steps
            outs[name] = torch.cat(pieces, dim=1)
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-4, rtol=1e-4)
