"""Print the pip pins of the lowest-versions CI leg, read from pyproject.toml's lower bounds.

One source for the bounds: ``torch>=A``, ``triton>=B`` and ``flash-linear-attention>=C`` in
``[project].dependencies`` become ``torch==A triton==B flash-linear-attention==C fla-core==C``
(fla's kernels live in ``fla-core``, released in lockstep). A missing or non-``>=`` bound is an
error naming the package.

``EXTRA_PINS`` are not bounds of ours but what the lowest versions need beside them: triton 3.6's
interpreter (CPU tests) converts one-element arrays to Python ints, which numpy 2.4 (what pip
picks today) refuses; numpy 2.2 only warns.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PINNED = ("torch", "triton", "flash-linear-attention")
EXTRA_PINS = ("numpy<2.3",)


def lowest_pins(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for name in PINNED:
        spec = next((d for d in deps if re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] == name), None)
        m = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec or "")
        if m is None:
            raise SystemExit(
                f"pyproject.toml: expected a '>=' lower bound for {name}, got {spec!r}"
            )
        pins.append(f"{name}=={m.group(1)}")
        if name == "flash-linear-attention":
            pins.append(f"fla-core=={m.group(1)}")
    return pins + [f"'{p}'" for p in EXTRA_PINS]


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    print(" ".join(lowest_pins(root / "pyproject.toml")))
    sys.exit(0)
