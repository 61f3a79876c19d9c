"""The CI script's own helpers (``.ci/run``): a failing step must fail the run.

``timed`` once returned the status of its closing ``echo``, so every test step "passed"
whatever pytest said; these tests run the helpers out of the script in ``bash``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "run"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _function(name: str) -> str:
    """The text of shell function ``name`` in ``.ci/run`` (from ``name() {`` to its ``}``)."""
    match = re.search(rf"^{name}\(\) \{{.*?^\}}$", SCRIPT.read_text(), re.MULTILINE | re.DOTALL)
    assert match, f"{name}() is missing from {SCRIPT}"
    return match.group(0)


def _bash(body: str) -> subprocess.CompletedProcess:
    code = "set -euo pipefail\n" + _function("timed") + "\n" + _function("pytest_ok") + "\n" + body
    return subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("status", [0, 1, 3])
def test_timed_returns_the_status_of_its_command(status: int) -> None:
    res = _bash(f'set +e; timed step bash -c "exit {status}"; rc=$?; set -e; echo "rc=$rc"')
    assert res.returncode == 0, res.stderr
    assert f"rc={status}" in res.stdout and "[ci] step:" in res.stdout


def test_a_failing_timed_step_stops_the_script() -> None:
    res = _bash('timed step false; echo "not reached"')
    assert res.returncode != 0 and "not reached" not in res.stdout


@pytest.mark.parametrize(
    "rc, may_be_empty, ok", [(0, "no", True), (1, "no", False), (5, "no", False), (5, "yes", True)]
)
def test_pytest_ok(rc: int, may_be_empty: str, ok: bool) -> None:
    res = _bash(f"pytest_ok {rc} {may_be_empty}")
    assert (res.returncode == 0) is ok, (res.stdout, res.stderr)
