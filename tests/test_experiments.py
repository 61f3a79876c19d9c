"""The synthetic-task study (``python -m experiments.synthetic_tasks``): protocol pieces,
resumability, arguments. The full study is far too long for a test; a toy-size run checks the pipeline."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from experiments import synthetic_report, synthetic_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    return importlib.import_module("experiments.synthetic_tasks")


def test_run_or_load_skips_saved_runs_and_reruns_changed_settings(tmp_path):
    calls = []

    def run():
        calls.append(1)
        return {"value": len(calls)}

    first, seconds = synthetic_runs.run_or_load(tmp_path, "k", {"a": 1}, run)
    assert first == {"value": 1} and seconds is not None
    again, seconds = synthetic_runs.run_or_load(tmp_path, "k", {"a": 1}, run)
    assert again == {"value": 1} and seconds is None and len(calls) == 1  # loaded, not rerun
    changed, _ = synthetic_runs.run_or_load(tmp_path, "k", {"a": 2}, run)
    assert changed == {"value": 2} and len(calls) == 2  # other settings: run again
    assert not list(tmp_path.glob("*.tmp"))


def test_progress_estimates_time_left_from_trained_runs():
    p = synthetic_runs.Progress(total=4, enabled=False)
    assert "not yet estimated" in p.update("saved run", None)
    line = p.update("trained", 60.0)
    assert "2/4 runs" in line and "~2.0 min left" in line


def _run(model, lr, seed, acc, steps=10, task="mqar", L=64):
    ev = {"acc": acc, "exact_match": acc / 2}
    return {"task": task, "train_length": L, "model": model, "lr": lr, "seed": seed,
            "steps": steps, "eval": {str(L): ev, str(2 * L): ev}}  # fmt: skip


def test_summary_sanity_gate_and_orderings():
    args = type("A", (), {"seeds": [0, 1], "train_lengths": [64]})()
    runs = [
        _run("mla", 1e-3, 0, 0.95), _run("mla", 1e-3, 1, 0.97),
        _run("kda", 1e-3, 0, 0.9, steps=100), _run("kda", 1e-3, 1, 0.8, steps=200),
        _run("gdn", 1e-3, 0, 0.5, steps=300), _run("gdn", 1e-3, 1, 0.6, steps=300),
        _run("kda", 3e-3, 0, 0.1),  # not the chosen lr: ignored
    ]  # fmt: skip
    chosen = {"mqar/mla": 1e-3, "mqar/kda": 1e-3, "mqar/gdn": 1e-3}
    s = synthetic_report.summarize(runs, chosen, args)
    assert s["sanity_gate"]["passed"] and s["sanity_gate"]["acc"] == pytest.approx(0.96)
    cell = s["cells"]["mqar/64/kda/64"]
    assert cell["acc"]["mean"] == pytest.approx(0.85) and cell["acc"]["n"] == 2
    claims = {(o["claim"], o["eval_length"]): o["verdict"] for o in s["orderings"]}
    assert claims[("KDA >= GDN-like (answer accuracy)", 64)] == "reproduced"
    assert claims[("KDA converges in no more steps than GDN-like", 64)] == "reproduced"
    # a difference within one standard deviation over seeds is a tie, either way round
    close = [*runs[:2], _run("kda", 1e-3, 0, 0.90), _run("kda", 1e-3, 1, 0.96),
             _run("gdn", 1e-3, 0, 0.94), _run("gdn", 1e-3, 1, 0.95)]  # fmt: skip
    verdicts = {
        o["claim"]: o["verdict"]
        for o in synthetic_report.summarize(close, chosen, args)["orderings"]
    }
    assert verdicts["KDA >= GDN-like (answer accuracy)"] == "tie"
    # runs stopped by the convergence rule: their accuracies at the training length only say
    # where each crossed the target, so any difference there is a tie; stack has no step claim
    stopped = [*runs[:2], *(dict(_run(m, 1e-3, sd, a, task="stack"), converged=True)
                            for m, sd, a in [("kda", 0, .990), ("kda", 1, .990),
                                             ("gdn", 0, .999), ("gdn", 1, .999)])]  # fmt: skip
    got = synthetic_report.summarize(
        stopped, {**chosen, "stack/kda": 1e-3, "stack/gdn": 1e-3}, args
    )
    stack = {(o["claim"], o["eval_length"]): o["verdict"] for o in got["orderings"]}
    assert stack[("KDA >= GDN-like (answer accuracy)", 64)] == "tie"
    assert stack[("KDA >= GDN-like (answer accuracy)", 128)] == "not reproduced"
    assert not any("converges" in claim for claim, _ in stack)
    failing = [_run("mla", 1e-3, 0, 0.5), _run("mla", 1e-3, 1, 0.6)]
    assert not synthetic_report.summarize(failing, {"mqar/mla": 1e-3}, args)["sanity_gate"][
        "passed"
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "1", "2"], "--seeds must include 0"),
        (["--target", "1.5"], "--target must be in (0, 1]"),
        (["--lrs", "0.001", "-1"], "--lrs must be positive"),
        (["--max-steps", "0"], "--max-steps must be >= 1"),
        (["--train-lengths", "0"], "--train-lengths must be positive"),
        (["--models", "rwkv"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_message(study, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        study.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_profile_defaults(study, monkeypatch):
    monkeypatch.setattr(study.torch.cuda, "is_available", lambda: True)
    args = study.parse_args(["--device", "cuda"])
    assert args.profile == "paper" and args.precision == "bf16-mixed"
    assert args.train_lengths == [256, 512, 1024, 2048] and args.lrs == [5e-5, 1e-4, 5e-4, 1e-3]
    assert args.max_steps == 20_000 and args.kda_backend == "auto"


@pytest.mark.slow
def test_quick_study_runs_and_resumes(study, tmp_path, monkeypatch):
    argv = ["--quick", "--models", "mla", "--no-progress", "--out-dir", str(tmp_path)]
    assert study.main(argv) == 0
    data = json.loads((tmp_path / "synthetic_tasks.json").read_text())
    assert len(data["runs"]) == 3  # 2 learning rates at seed 0, then seed 1 at the chosen one
    assert data["summary"]["sanity_gate"] is not None
    assert (tmp_path / "synthetic_tasks.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "synthetic_tasks.md").read_text()
    assert "## Sanity gate" in md and "## Protocol" in md
    assert len(list((tmp_path / "runs").glob("*.json"))) == 3

    def no_training(*a, **k):
        raise AssertionError("a saved run was trained again")

    monkeypatch.setattr(study, "run_one", no_training)
    assert study.main(argv) == 0  # every run loaded from runs/


@pytest.mark.slow
def test_report_only_trains_nothing_and_lists_missing_runs(study, tmp_path, monkeypatch):
    argv = ["--quick", "--models", "mla", "--no-progress", "--out-dir", str(tmp_path)]
    assert study.main(argv) == 0
    runs = sorted((tmp_path / "runs").glob("*.json"))
    seed1 = next(p for p in runs if p.name.endswith("seed1.json"))
    seed1.unlink()

    def no_training(*a, **k):
        raise AssertionError("--report-only trained a run")

    monkeypatch.setattr(study, "run_one", no_training)
    assert study.main([*argv, "--report-only"]) == 0
    data = json.loads((tmp_path / "synthetic_tasks.json").read_text())
    assert data["meta"]["missing_runs"] == [seed1.stem]
    cell = data["summary"]["cells"]["mqar/32/mla/32"]
    assert cell["acc"]["n"] == 1 and not cell["complete"]
    assert data["summary"]["sanity_gate"] is None  # a partial cell is not a result
    md = (tmp_path / "synthetic_tasks.md").read_text()
    assert "## Not yet run" in md and "| mqar | mla | 1 |" in md and "partial" in md
    assert not seed1.exists()


def _committed(folder: Path, pattern: str) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob(pattern)}


def test_committed_results_are_not_overwritten_without_asking(study, capsys):
    """The default output folder holds the committed study: a run (``--report-only`` too) that
    would rewrite it stops before any work, naming the file and the options (issue 24)."""
    results = ROOT / "experiments" / "results"
    before = _committed(results, "synthetic_tasks.*")
    assert before, "the committed study results are missing"
    assert study.main(["--report-only", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "synthetic_tasks.json exists (committed results)" in err
    assert "--overwrite" in err and "--out-dir" in err
    assert _committed(results, "synthetic_tasks.*") == before


def test_report_only_reads_runs_from_runs_dir_and_writes_out_dir(study, tmp_path, capsys):
    """``--report-only --out-dir X --runs-dir R`` reads R and writes X, with a progress line per
    run; an empty runs folder is a named error."""
    runs = tmp_path / "runs"
    argv = ["--report-only", "--quick", "--models", "mla", "--out-dir", str(tmp_path / "out")]
    assert study.main([*argv, "--runs-dir", str(tmp_path / "none")]) == 2
    assert "--report-only: no saved runs in" in capsys.readouterr().err
    runs.mkdir()
    assert study.main([*argv, "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert f"runs: {runs}" in out
    data = json.loads((tmp_path / "out" / "synthetic_tasks.json").read_text())
    assert data["meta"]["missing_runs"] and data["runs"] == []


def _bench(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def test_activation_memory_refuses_to_overwrite_and_has_a_quick_mode(tmp_path, capsys):
    """benchmarks/activation_memory.py: the committed results stay unless ``--overwrite``;
    ``--quick`` measures the tiny preset with progress lines (issue 24)."""
    bench = _bench("activation_memory")
    results = ROOT / "benchmarks" / "results" / "cpu"
    before = _committed(results, "activation_memory.*")
    assert before
    with pytest.raises(SystemExit) as exc:
        bench.main([])
    assert exc.value.code == 2
    assert "activation_memory.json exists (committed results)" in capsys.readouterr().err
    assert bench.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] T=64: measuring" in out and "[2/2] T=128" in out
    data = json.loads((tmp_path / "activation_memory.json").read_text())
    assert data["config"] == "tiny" and [r["seq_len"] for r in data["rows"]] == [64, 128]
    assert all(r["plain_bytes"] > r["checkpointed_bytes"] > 0 for r in data["rows"])
    assert _committed(results, "activation_memory.*") == before


def test_load_memory_refuses_to_overwrite(capsys, monkeypatch):
    bench = _bench("load_memory")
    results = ROOT / "benchmarks" / "results" / "cpu"
    before = _committed(results, "load_memory.*")
    assert before
    monkeypatch.setattr(sys, "argv", ["load_memory.py"])
    assert bench.main() == 2
    assert "load_memory.json exists (committed results)" in capsys.readouterr().err
    assert _committed(results, "load_memory.*") == before


@pytest.mark.slow
def test_load_memory_quick(tmp_path, capsys, monkeypatch):
    bench = _bench("load_memory")
    monkeypatch.setattr(sys, "argv", ["load_memory.py", "--quick", "--out-dir", str(tmp_path)])
    assert bench.main() == 0
    out = capsys.readouterr().out
    assert "[1/2] loading with from_pretrained" in out and "[2/2] loading with eager" in out
    data = json.loads((tmp_path / "load_memory.json").read_text())
    assert data["quick"] and data["peak_rss"] > data["baseline_rss"]
