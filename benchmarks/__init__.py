"""Benchmark scripts of the kit: each module is a command, run from the repository root.

Run one as a module, never by path (the scripts import their siblings as ``benchmarks.*``)::

    python -m benchmarks.decode --quick            # any script: --help, --quick, --out-dir
    python -m benchmarks.kernel_speed --quick --device cpu

Shared helpers: ``benchmarks.common`` (arguments, results files, tables). Results go under
``benchmarks/results/<device>/`` (a ``--quick`` run under ``results/<device>/quick/``);
``benchmarks/README.md`` explains every figure and the command that produced it.
"""
