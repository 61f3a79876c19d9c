"""``python -m benchmarks.gpu_check``: run the GPU suite (see :mod:`benchmarks.gpu_check`)."""

from benchmarks.gpu_check.cli import main

if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
