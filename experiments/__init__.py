"""Experiments of the kit (the QK-Clip study, the synthetic-task study), run from the repository
root as modules::

    python -m experiments.qk_clip --quick
    python -m experiments.synthetic_tasks --quick

Results go under ``experiments/results/``.
"""
