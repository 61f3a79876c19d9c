"""Command-line plumbing of the benchmark scripts: argument types, errors, number formats.

The scripts run as ``python -m benchmarks.<name>`` from the repository root. Their shared
helpers are split by job: this module (arguments, ``fail``, ``fmt_tokens`` / ``fmt_bytes``),
:mod:`benchmarks.hardware` (device, threads, memory), :mod:`benchmarks.timing` (timed calls,
interleaved rounds, bandwidth), :mod:`benchmarks.report` (tables and the result files) and
:mod:`benchmarks.workload` (the benchmarked model: preset arguments, weight and cache bytes,
synthetic cache fill).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where the help text does not already say the default and
    the default is a real value (not ``None`` or a ``store_true`` flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SystemExit(f"error: --dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code`` (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_main(main: Callable[[], int | None], oom_hint: str) -> NoReturn:
    """Run a script's ``main`` and exit with its code: 130 on Ctrl-C, and on a CUDA / CPU
    out-of-memory error (a last guard; the scripts size their runs before allocating) exit 3
    with ``out of memory (...); <oom_hint>``."""
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except torch.OutOfMemoryError as e:
        fail(f"out of memory ({e}); {oom_hint}", code=3)


def parse_size(text: str) -> int:
    """``"4096"``, ``"4K"`` (4096), ``"1M"`` (1048576) -> int; sizes are powers of two."""
    s = str(text).strip().lower()
    mult = 1
    if s and s[-1] in _SIZE_SUFFIXES:
        mult, s = _SIZE_SUFFIXES[s[-1]], s[:-1]
    try:
        return int(s) * mult
    except ValueError:
        raise ValueError(f"not an integer size: {text!r} (use e.g. 4096, 4K, 1M)") from None


def size_list(minimum: int = 1) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated sizes (``"4K,32K,1M"``), each ``>= minimum``."""
    import argparse

    def parse(text: str) -> list[int]:
        try:
            values = [parse_size(t) for t in text.split(",") if t.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of sizes, got {text!r}"
            )
        bad = [v for v in values if v < minimum]
        if bad:
            raise argparse.ArgumentTypeError(f"every value must be >= {minimum}, got {bad[0]}")
        return values

    return parse


def positive_int(text: str) -> int:
    """An argparse ``type``: an int > 0."""
    import argparse

    try:
        v = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0."""
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def fmt_tokens(n: int) -> str:
    """4096 -> ``"4K"``, 1048576 -> ``"1M"``; other values unchanged."""
    for suffix, mult in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def fmt_bytes(n: float | None) -> str:
    """Bytes in decimal units, as papers and vendors quote them (``"9.13 GB"``); ``None`` -> ``"-"``."""
    if n is None:
        return "-"
    for unit, mult in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= mult:
            return f"{n / mult:.3g} {unit}"
    return f"{int(n)} B"


def explicit_dests(parser: Any, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the options given explicitly in ``argv`` (``None``: ``sys.argv``),
    whatever their value: argparse sets a default only on a namespace that lacks the attribute,
    so parsing into a namespace pre-filled with a marker leaves the marker exactly where no
    option was given."""
    import argparse

    marker = object()
    ns = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != "help"})
    parser.parse_known_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not marker}


def apply_quick(args: Any, explicit: set[str], **values: Any) -> None:
    """``--quick`` sizes: set each ``args.<name>`` to ``values[name]`` unless the option was
    given explicitly (:func:`explicit_dests`): an explicit size is honoured, never silently
    replaced by the quick one."""
    for name, value in values.items():
        if name not in explicit:
            setattr(args, name, value)


def add_timed_run_args(parser: Any, quick_help: str, seed_help: str) -> None:
    """The run options shared by the timing scripts (decode.py, prefill.py): ``--dtype``,
    ``--device``, ``--threads``, ``--quick``, ``--out-dir``, ``--seed``, ``--no-progress``."""
    parser.add_argument(
        "--dtype", default=None, help="weights and cache dtype (default: CPU fp32, GPU bf16)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (default: torch's); 1 on a shared machine",
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--out-dir",
        default=None,
        help="output folder (default: benchmarks/results/<device>/, quick: .../<device>/quick/)",
    )
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
