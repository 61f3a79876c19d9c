"""kimi_linear.testing: the one comparison rule and the KDA reference runs."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_linear.ops import naive_recurrent_kda
from kimi_linear.testing import (
    KDA_NAMES,
    assert_kda_close,
    assert_rel_close,
    kda_inputs,
    kda_reference,
    kda_run,
    rel_error,
)


def test_rel_error_is_the_norm_of_the_difference_over_the_reference_norm():
    ref = torch.tensor([3.0, 4.0])
    assert rel_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_error(ref.to(torch.bfloat16), ref) == 0.0
    # missing, non-finite (either side) or wrong against an all-zero reference: infinitely wrong
    assert rel_error(None, ref) == rel_error(ref, None) == math.inf
    assert rel_error(torch.tensor([math.nan, 4.0]), ref) == math.inf
    assert rel_error(ref, torch.tensor([math.inf, 4.0])) == math.inf
    assert rel_error(torch.tensor([1e-30]), torch.zeros(1)) == math.inf
    assert rel_error(torch.zeros(2), torch.zeros(2)) == 0.0


def test_a_dropped_small_term_fails_however_small_its_entries():
    """Half the entries missing: about 0.7 relative error, although every entry is 1e-6."""
    ref = torch.full((100,), 1e-6)
    half = ref.clone()
    half[50:] = 0
    assert rel_error(half, ref) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(AssertionError, match="relative error 7.071e-01"):
        assert_rel_close(half, ref, 1e-3, "o")


def test_assert_rel_close_names_the_tensor_error_tolerance_and_shapes():
    ref = torch.ones(2, 3)
    assert assert_rel_close(ref * (1 + 1e-4), ref, 1e-3, "dq") == pytest.approx(1e-4, rel=1e-3)
    with pytest.raises(AssertionError) as e:
        assert_rel_close(ref * 1.01, ref, 1e-3, "dq")
    msg = str(e.value)
    assert msg.startswith("dq: relative error 1.000e-02 > 1.0e-03")
    assert "shape (2, 3), reference (2, 3)" in msg
    with pytest.raises(AssertionError, match=r"dk: shape \(3, 2\), reference \(2, 3\) differ"):
        assert_rel_close(ref.T, ref, 1e-3, "dk")
    with pytest.raises(AssertionError, match="dv: non-finite values"):
        assert_rel_close(ref * math.nan, ref, 1e-3, "dv")
    with pytest.raises(AssertionError, match="ht: got None, expected a tensor"):
        assert_rel_close(None, ref, 1e-3, "ht")
    assert assert_rel_close(None, None, 1e-3) == 0.0


def test_a_reference_without_signal_is_refused_unless_zeros_are_expected():
    zeros = torch.zeros(4)
    with pytest.raises(AssertionError, match="nothing to compare"):
        assert_rel_close(zeros, zeros, 1e-3, "dg")
    assert assert_rel_close(zeros + 1e-9, zeros, 1e-3, "dg", zeros_atol=1e-8) == 0.0
    with pytest.raises(AssertionError, match=r"dg: expected zeros .* max \|x\| = 1.000e-06"):
        assert_rel_close(zeros + 1e-6, zeros, 1e-3, "dg", zeros_atol=1e-8)


def test_kda_reference_runs_each_packed_sequence_alone_and_assert_kda_close_checks_each():
    lengths = [3, 1, 6]
    offsets = [0, 3, 4, 10]
    inputs = kda_inputs(1, 10, 2, 4, 5, N=3, seed=1)
    gen = torch.Generator().manual_seed(2)
    do, dht = torch.randn(1, 10, 2, 5, generator=gen), torch.randn(3, 2, 4, 5, generator=gen)
    ref = kda_reference(inputs, do, dht, offsets)
    assert [None if t is None else t.dtype for t in ref] == [torch.float64] * len(KDA_NAMES)
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        piece = [x[:, bos:eos] for x in inputs[:5]] + [inputs[5][n : n + 1]]
        alone = kda_run(
            naive_recurrent_kda, [x.double() for x in piece], do[:, bos:eos], dht[n : n + 1]
        )
        torch.testing.assert_close(ref[0][:, bos:eos], alone[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(ref[1][n : n + 1], alone[1], rtol=0, atol=1e-12)
    assert sum(lengths) == ref[0].shape[1]
    worst = assert_kda_close(ref, ref, 1e-12, offsets)
    assert set(worst) == set(KDA_NAMES) and max(worst.values()) == 0.0
    # a wrong short sequence fails on its own, though it is a small part of the packed tensor
    bad = list(ref)
    bad[0] = ref[0].clone()
    bad[0][:, 3] += 0.02 * ref[0][:, 3]
    assert rel_error(bad[0], ref[0]) < 1e-2
    with pytest.raises(AssertionError, match=r"o \(sequence 1, tokens 3:4\): relative error"):
        assert_kda_close(bad, ref, 1e-2, offsets)
    # one tolerance per name, "*" for the others
    assert_kda_close(bad, ref, {"*": 1e-12, "o": 0.1}, offsets)
