"""The ``kimi-linear`` console script.

``kimi-linear info ...`` reports parameter counts, layer types and cache sizes of a preset
(:mod:`kimi_linear.info`); every other subcommand (``fit``, ``validate``, ``test``, ``predict``,
``generate``, ``export``) goes to the Lightning CLI (:mod:`kimi_linear.lightning.cli`).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "info":
        from kimi_linear.info import info_main

        return info_main(argv[1:])
    from kimi_linear.lightning.cli import lightning_main

    return lightning_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
