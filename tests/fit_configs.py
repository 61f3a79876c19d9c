"""Extra ``--config`` files that the command-line tests lay over ``configs/tiny.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def checkpoint_every_config(path: Path, steps: int, *others: dict[str, Any]) -> str:
    """Write a ``--config`` at ``path`` whose trainer callbacks replace tiny.yaml's: a *plain*
    Lightning ``ModelCheckpoint`` every ``steps`` steps (``last.ckpt`` plus every checkpoint
    kept; the CLI upgrades it) followed by ``others`` (``class_path`` / ``init_args`` dicts).
    Returns the path as a string, ready for the argument list."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": True, "every_n_train_steps": steps, "save_top_k": -1},
    }
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [checkpoint, *others]}}))
    return str(path)
