"""The suite catches the bugs of ``tests/mutants.py``: each mutant, planted in a fresh pytest
process, must make its target tests fail (slow: one pytest run per mutant)."""

from __future__ import annotations

import functools

import pytest
from mutants import MUTANTS, main, missing_pattern, plant, run_tests


@functools.cache
def _baseline(tests: tuple[str, ...]) -> int:
    """Exit code of the target tests without a mutant (a failure there would fake a catch)."""
    return run_tests(tests, None)


def test_unknown_mutant_is_refused(capsys):
    with pytest.raises(ValueError, match="unknown mutant 'nope'"):
        plant("nope")
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2 and "unknown mutant 'nope'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(name):
    mutant = MUTANTS[name]
    if mutant.edits and (old := missing_pattern(name)) is not None:
        pytest.xfail(f"kernels/kda/chunk_bwd.py changed, update mutant {name}'s pattern: {old!r}")
    baseline = _baseline(mutant.tests)
    assert baseline == 0, f"{' '.join(mutant.tests)} fail without a mutant (exit {baseline})"
    rc = run_tests(mutant.tests, name)
    # 1: tests failed; a negative code or > 128: the process crashed (out-of-bounds writes)
    assert rc == 1 or rc < 0 or rc > 128, f"{name} ({mutant.doc}): pytest exit {rc}"
