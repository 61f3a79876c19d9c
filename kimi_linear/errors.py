"""User-facing errors shared by the whole package: :class:`UsageError` and :func:`did_you_mean`.

Every "unknown name" message of the kit (a preset, a config field, a task, a subcommand, a
tokenizer kind, a command-line key) builds its hint with :func:`did_you_mean`, so the rule for
suggesting a name lives in one place.  This module imports nothing heavy (no torch, no
Lightning), so the command line can use it before anything else is loaded.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: The console script's name, in usage lines and error messages of every subcommand.
PROG = "kimi-linear"


class UsageError(ValueError):
    """A bad user setting (config value, path, task name, flag) found before any work starts.

    The ``kimi-linear`` command prints these as one ``kimi-linear: error: ...`` line with exit
    status 2 instead of a traceback.  It is a :class:`ValueError`, so library callers can catch
    either.
    """


def did_you_mean(name: object, choices: Iterable[object], cutoff: float = 0.6) -> str:
    """The hint ``" (did you mean 'x'?)"`` for the choice closest to ``name``, or ``""``.

    ``choices`` may be any iterable of names (a dict gives its keys); names are compared as
    strings with :func:`difflib.get_close_matches` at similarity ``cutoff`` in ``[0, 1]``.  No
    hint is given when ``name`` itself is one of the choices.

    Example::

        raise UsageError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}")
    """
    if not 0.0 <= cutoff <= 1.0:
        raise ValueError(f"cutoff must be in [0, 1], got {cutoff!r}")
    options = [str(c) for c in choices]
    text = str(name)
    if text in options:
        return ""
    close = difflib.get_close_matches(text, options, n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def import_failure(
    error: ImportError, package: str, install: str, requires: tuple[str, ...] = ()
) -> str:
    """Why ``package`` failed to import, in words that point at the fix.

    A :class:`ModuleNotFoundError` for ``package`` itself means it is not installed (``install``
    says how to get it), and so does one for a package named in ``requires``. Anything else is a broken environment: a dependency of ``package``
    missing or incompatible, or a module of the working directory shadowing one (Python puts
    the working directory or the script's folder first on ``sys.path``); the message then names
    the module and the file that were found instead of suggesting a reinstall that changes
    nothing.
    """
    top = package.split(".")[0]
    missing = getattr(error, "name", None)
    if isinstance(error, ModuleNotFoundError) and missing in (top, package, *requires):
        return f"{missing} is not installed ({install})"
    where = getattr(error, "path", None)
    found = f" (found {where})" if where else ""
    return (
        f"{package} is installed but failed to import: {type(error).__name__}: {error}{found}; "
        "a module of the working directory or the script's folder may shadow one of its "
        "dependencies, or a dependency's version may not fit"
    )


__all__ = ["UsageError", "did_you_mean", "import_failure"]
