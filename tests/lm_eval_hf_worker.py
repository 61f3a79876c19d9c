"""``lm_eval --model hf`` on an exported folder, for ``tests/test_evaluate.py``.

Runs in its own process (``python tests/lm_eval_hf_worker.py FOLDER TASK_DIR OUT.json TASK...``):
``fla`` is made unimportable before transformers is imported, so transformers' KimiLinear binds
its pure-PyTorch KDA (fla's kernels need a GPU), as in ``tests/hf_parity_worker.py``.  Writes
lm-eval's per-task metrics and, per task and document, the raw responses.
"""

from __future__ import annotations

import json
import sys

sys.modules["fla"] = None  # type: ignore[assignment]  # transformers: use the torch fallbacks


def main(folder: str, task_dir: str, out: str, *tasks: str) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32,device=cpu",
        tasks=list(tasks),
        batch_size=3,
        task_manager=TaskManager(include_path=task_dir, include_defaults=False),
        log_samples=True,
    )
    samples = {
        task: [[r for r in s["resps"]] for s in sorted(rows, key=lambda s: s["doc_id"])]
        for task, rows in results["samples"].items()
    }
    with open(out, "w") as f:
        json.dump({"results": results["results"], "samples": samples}, f, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:])
