"""Ragged batches (left padding), cache pruning, sampling distribution and forward edge cases.

Each padded row must behave exactly as its prompt alone: greedy continuations, forward logits,
per-row eos; the pads are filled with random tokens so that any leak would show.
"""

import pytest
import torch
from test_model import make_model

from kimi_linear.model import sample_next_token

PROMPT_LENGTHS = [1, 7, 64, 70]
MODELS = {
    "hybrid": ("hybrid", {}),
    "hybrid-rope": ("hybrid", {"mla_use_nope": False}),
    "kda": ("kda", {}),
    "mla-rope": ("mla", {"mla_use_nope": False}),
}


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def _left_pad(prompts: list[torch.Tensor], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad with random tokens (they must not matter); returns ``(ids, mask)``."""
    T = max(p.numel() for p in prompts)
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, vocab, (len(prompts), T), generator=gen)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - p.numel() :] = p
        mask[i, T - p.numel() :] = 1
    return ids, mask


@pytest.mark.parametrize("name", list(MODELS))
def test_left_padded_generation_equals_each_prompt_alone(name):
    kind, overrides = MODELS[name]
    model = make_model(kind, **overrides)
    V = model.config.vocab_size
    prompts = _prompts(V, PROMPT_LENGTHS)
    ids, mask = _left_pad(prompts, V)
    n = 6
    out = model.generate(ids, n, temperature=0, attention_mask=mask)
    assert out.shape == (len(prompts), ids.shape[1] + n)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # the pads are kept in the output
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], n, temperature=0)
        assert torch.equal(out[i, ids.shape[1] :], alone[0, p.numel() :]), (
            f"row {i} (len {p.numel()})"
        )


@pytest.mark.parametrize("name", ["hybrid-rope", "kda"])
def test_left_padded_forward_equals_each_prompt_alone(name):
    kind, overrides = MODELS[name]
    model = make_model(kind, **overrides)
    V = model.config.vocab_size
    prompts = _prompts(V, PROMPT_LENGTHS, seed=1)
    ids, mask = _left_pad(prompts, V)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        assert torch.isfinite(logits).all()  # pad positions too
        for i, p in enumerate(prompts):
            alone = model(p[None])[0]
            torch.testing.assert_close(logits[i, -p.numel() :], alone, atol=1e-5, rtol=1e-5)
    # the loss scores only real tokens: equal to the token-weighted mean of the rows alone
    out = model(ids, labels=ids, attention_mask=mask)
    alone = [
        model(p[None], labels=p[None]).loss * (p.numel() - 1) for p in prompts if p.numel() > 1
    ]
    ref = sum(alone) / sum(p.numel() - 1 for p in prompts)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    # and so are the gradients (pads contribute nothing)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_chunked_prefill_with_mask_then_decode_matches_one_shot():
    """A mask over cached + new tokens (HF convention); a row still all pads after the first
    block; decode steps without a mask keep the recorded pads."""
    model = make_model("hybrid", mla_use_nope=False)
    V = model.config.vocab_size
    prompts = _prompts(V, [3, 20, 9], seed=2)
    ids, mask = _left_pad(prompts, V)
    nxt = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(
            torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1)
        )
        cache = model.new_cache(3)
        split = 12  # row 0 (3 tokens, 17 pads) is all pads in the first block
        pieces = [model(ids[:, :split], cache=cache, attention_mask=mask[:, :split])]
        pieces.append(model(ids[:, split:], cache=cache, attention_mask=mask))
        assert cache.pad_lengths.tolist() == [17, 0, 11]
        for t in range(4):
            pieces.append(model(nxt[:, t : t + 1], cache=cache))
    got = torch.cat(pieces, dim=1)
    real = torch.cat([mask, torch.ones_like(nxt)], 1).bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must match the pads the cache recorded"):
        model(
            nxt[:, :1],
            cache=cache,
            attention_mask=torch.ones(3, cache.seq_len + 1, dtype=torch.long),
        )


def test_eos_is_handled_per_row():
    model = make_model("hybrid")
    V = model.config.vocab_size
    prompts = _prompts(V, PROMPT_LENGTHS, seed=3)
    ids, mask = _left_pad(prompts, V)
    n = 10
    alone = [model.generate(p[None], n, temperature=0)[0, p.numel() :] for p in prompts]
    eos = int(alone[1][2])  # the third token row 1 generates alone
    sizes = []
    hook = model.model.register_forward_hook(lambda m, args, out: sizes.append(out.shape[0]))
    out = model.generate(ids, n, temperature=0, eos_token_id=eos, attention_mask=mask)
    hook.remove()
    stops = []
    for i, ref in enumerate(alone):
        gen = out[i, ids.shape[1] :]
        hits = (ref == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else n
        stops.append(stop)
        assert torch.equal(gen[:stop], ref[:stop]), f"row {i}"
        assert (gen[stop:] == eos).all()  # finished rows are padded with eos
    # finished rows leave the decoding batch: step s feeds the rows not finished by then
    assert 2 < stops[1] < n
    assert sizes == [len(prompts)] + [sum(s > step for s in stops) for step in range(1, n)]


@pytest.mark.parametrize("keep", [[2, 0], [1, 2, 0]])  # drop a row / reorder (same batch size)
@pytest.mark.parametrize("use_nope", [True, False])
def test_decode_after_pruning_the_cache_equals_the_kept_rows_alone(use_nope, keep):
    """``HybridCache.index_select`` keeps every per-row tensor of every layer (KDA state, conv
    tails, MLA latents and rope keys, pad counts)."""
    model = make_model("hybrid", mla_use_nope=use_nope)
    V = model.config.vocab_size
    prompts = _prompts(V, [5, 12, 9], seed=4)
    ids, mask = _left_pad(prompts, V)
    steps = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(6))
    keep = torch.tensor(keep)
    with torch.no_grad():
        cache = model.new_cache(3)
        model(ids, cache=cache, attention_mask=mask)
        for t in range(3):
            model(steps[:, t : t + 1], cache=cache)
        cache.index_select(keep)
        assert cache.batch_size == len(keep)
        assert cache.pad_lengths.tolist() == [[7, 0, 3][i] for i in keep.tolist()]
        pruned = torch.cat([model(steps[keep, t : t + 1], cache=cache) for t in range(3, 6)], 1)
        for row, i in enumerate(keep.tolist()):
            seq = torch.cat([prompts[i], steps[i]])[None]
            alone = model(seq)[0, -3:]
            torch.testing.assert_close(pruned[row], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="index"):
        cache.index_select([0])


def test_sampling_frequencies_follow_softmax_of_logits_over_temperature():
    """Chi-square goodness of fit of 20000 draws against softmax(logits / T).

    With T = 0.5 the expected distribution is far from softmax(logits * T) (a temperature
    multiplied instead of divided gives a statistic in the thousands); the threshold is the
    0.1% critical value for 5 degrees of freedom (20.5). Fixed generator: deterministic.
    """
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    n = 20000
    gen = torch.Generator().manual_seed(0)

    def chi2(temperature: float, expected_logits: torch.Tensor) -> float:
        draws = sample_next_token(logits.expand(n, -1), temperature, generator=gen)
        counts = torch.bincount(draws, minlength=logits.numel()).double()
        expected = expected_logits.double().softmax(-1) * n
        return float(((counts - expected) ** 2 / expected).sum())

    for temperature in (0.5, 1.0, 2.0):
        assert chi2(temperature, logits / temperature) < 20.5, temperature
    # the test can tell division from multiplication
    assert chi2(0.5, logits * 0.5) > 1000
    # top_k renormalises over the kept tokens
    draws = sample_next_token(logits.expand(n, -1), 0.5, top_k=3, generator=gen)
    counts = torch.bincount(draws, minlength=6).double()
    expected = torch.cat([(logits[:3] / 0.5).softmax(-1), torch.zeros(3)]).double() * n
    assert counts[3:].sum() == 0
    assert float(((counts[:3] - expected[:3]) ** 2 / expected[:3]).sum()) < 13.8  # 2 dof, 0.1%


def test_bad_attention_masks_are_refused():
    model = make_model("hybrid")
    ids = torch.zeros(2, 5, dtype=torch.long)
    good = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hole = torch.tensor([[0, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
    cases = [
        (right, "left-padded.*row 0.*right padding"),
        (hole, "left-padded"),
        (good * 2, "values must be 0 .pad. or 1"),
        (good.float(), "bool or integer dtype"),
        (good[:, 1:], r"shape \[B, L\] = \[2, 5\]"),
        (good.tolist(), "attention_mask must be a torch.Tensor"),
    ]
    for mask, match in cases:
        with pytest.raises(ValueError, match=match):
            model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match=match):
            model.generate(ids, 2, attention_mask=mask)
    empty = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask row 0 holds no token"):
        model.generate(ids, 2, attention_mask=empty)
    # a bool mask is accepted; an all-ones mask is the same as none
    torch.testing.assert_close(
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.bool)), model(ids)
    )


def test_all_ignored_labels_give_zero_loss_and_zero_gradients():
    model = make_model("hybrid").train()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7)
    )
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_positions_beyond_max_position_embeddings_are_refused():
    model = make_model("hybrid", max_position_embeddings=16)
    ids = torch.zeros(1, 17, dtype=torch.long)
    with pytest.raises(ValueError, match="17 positions .input tokens.*max_position_embeddings=16"):
        model(ids)
    assert model(ids[:, :16]).shape[1] == 16
    cache = model.new_cache(1)
    model(ids[:, :10], cache=cache)
    with pytest.raises(ValueError, match="17 positions .cached . input tokens"):
        model(ids[:, :7], cache=cache)
    # rows are counted without their pads; generation checks up front
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[:, :3] = 0
    assert model(ids.expand(2, -1), attention_mask=mask).shape[1] == 17
    with pytest.raises(
        ValueError, match="max_new_tokens=4 .*17 positions.*max_position_embeddings"
    ):
        model.generate(ids[:, :14], 4)
    assert model.generate(ids[:, :14], 3, temperature=0).shape[1] == 17  # 16 positions fed


def test_logits_to_keep_beyond_the_input_is_refused():
    model = make_model("hybrid")
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert model(ids, logits_to_keep=4).shape[1] == 4
    with pytest.raises(ValueError, match="logits_to_keep must be at most .* T=4, got 5"):
        model(ids, logits_to_keep=5)


def test_cli_generate_takes_several_prompts(tmp_path, capsys):
    """``kimi-linear generate --prompt A --prompt B``: one left-padded batch, each prompt's
    greedy continuation equal to running it alone."""
    from kimi_linear.cli import main
    from kimi_linear.tokenizer import ByteTokenizer

    model = make_model("hybrid", vocab_size=ByteTokenizer().vocab_size)
    model.save_pretrained(tmp_path / "m")
    common = ["generate", "--ckpt_path", str(tmp_path / "m"), "--max_new_tokens", "5"]
    common += ["--temperature", "0"]
    prompts = ["a", "hello, world"]
    alone = []
    for text in prompts:
        assert main([*common, "--prompt", text]) == 0
        alone.append(capsys.readouterr().out)
    assert (
        main([*common, "--prompt", prompts[0], "--prompt", prompts[1], "--num_samples", "2"]) == 0
    )
    out = capsys.readouterr().out
    for i, text in enumerate(alone):
        for s in range(2):
            assert f"--- prompt {i} sample {s}\n{text}" in out
    assert main(["generate", "--ckpt_path", str(tmp_path / "m"), "--prompt"]) == 2  # no text
    assert "--prompt" in capsys.readouterr().err


# ----------------------------------------------------------- arguments that cannot be meant, NaN


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0])
def test_non_finite_temperature_is_refused(temperature):
    model = make_model("hybrid")
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.generate(ids, 2, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample_next_token(torch.zeros(1, 4), temperature)


@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-30])
def test_tiny_temperature_samples_among_the_maxima(temperature):
    """A subnormal temperature overflowed ``logits / T`` to inf and NaN inside the sampler; it
    is the limit T -> 0: uniform among each row's largest logits (a tie here), never another."""
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 0.0, 1.0, 2.999]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(logits, temperature, generator=gen) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2}  # both maxima drawn, nothing else
    assert set(draws[:, 1].tolist()) == {0}


def test_nan_logits_row_is_named():
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    logits[2] = float("-inf")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"logits of batch row\(s\) \[1, 2\] hold NaN"):
            sample_next_token(logits, temperature)
    ok = torch.zeros(2, 5)
    ok[0, :4] = float("-inf")  # masked tokens are fine while one stays
    assert sample_next_token(ok, 1.0)[0] == 4


@pytest.mark.parametrize("name", ["hybrid", "kda"])
def test_nan_embedding_in_one_row_leaves_the_other_rows_intact(name):
    """Issue 27 item 8: a NaN in one batch row stopped the whole forward with an error about
    `g` (the KDA decay, an input the user never passes). The other rows must be exact, the
    poisoned row NaN from the poisoned token on; generation names the prompt that carried it."""
    model = make_model(name)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (3, 40), generator=torch.Generator().manual_seed(5))
    ids[1, 30] = 0
    with torch.no_grad():
        ref = model(ids)
        model.model.embed_tokens.weight[0] = float("nan")
        out = model(ids)
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], atol=0, rtol=0)
    assert torch.isnan(out[1, 30:]).all()
    if name == "kda":  # causal within the row too (MLA: see test_numerics.py)
        torch.testing.assert_close(out[1, :30], ref[1, :30], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"logits for new token 0 .*row\(s\) \[1\]"):
        model.generate(ids, 2, temperature=0)
    torch.testing.assert_close(  # rows without the NaN token continue exactly as before
        model.generate(ids[[0, 2]], 2, temperature=0)[:, :40], ids[[0, 2]], atol=0, rtol=0
    )
