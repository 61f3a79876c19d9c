"""``python -m benchmarks.gpu_check``: arguments, budget, result files, and a whole dry run.

The dry run (every part at toy sizes on the CPU, kernels under the Triton interpreter) goes
through a subprocess, as CI would run it, and is marked slow; the rest runs in-process in
well under a second each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import kernel_speed, timing
from benchmarks.gpu_check import cli, correctness, kda, plan, results, sizes, speed, splitting
from benchmarks.gpu_check import run as gpu_run
from kimi_linear.ops import naive_recurrent_kda
from kimi_linear.testing import KDA_NAMES, per_sequence, rel_error

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "0"], "--budget: must be a finite number of minutes > 0"),
        (["--budget", "-1"], "--budget: must be a finite number of minutes > 0"),
        (["--budget", "nan"], "--budget: must be a finite number of minutes > 0"),
        (["--budget", "soon"], "--budget: expected minutes as a number"),
        (["--parts", "speed,kernels"], "--parts: expected a comma-separated subset"),
        (["--parts", ","], "--parts: expected a comma-separated subset"),
        (["--seed", "x"], "--seed: invalid int value"),
    ],
)
def test_bad_arguments_exit_2_with_the_argument_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("")
    assert cli.main(["--dry-run", "--out-dir", str(target)]) == 2
    assert "--out-dir" in capsys.readouterr().err


def test_parts_keep_the_value_order():
    args = cli.parse_args(["--parts", "model,correctness"])
    assert args.parts == ("correctness", "model")
    assert cli.parse_args([]).parts == sizes.DEFAULT_PARTS
    assert cli.parse_args([]).budget == sizes.DEFAULT_BUDGET_MIN == 8.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_it_points_to_dry_run(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err


def test_dry_run_refuses_an_already_imported_triton_without_the_interpreter(monkeypatch):
    import triton  # noqa: F401  (imported: the interpreter can no longer be chosen)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        cli._prepare_triton(True)
    cli._prepare_triton(False)  # a GPU run needs nothing


# ------------------------------------------------------------------------------ errors
def test_rel_error_is_norm_relative_and_inf_for_non_finite():
    ref = torch.tensor([3.0, 4.0])
    assert rel_error(ref, ref) == 0.0
    assert rel_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_error(torch.tensor([float("nan"), 4.0]), ref) == math.inf
    assert rel_error(None, ref) == math.inf
    # an all-zero reference: any difference is infinitely wrong, none is exact
    assert rel_error(torch.tensor([0.5]), torch.tensor([0.0])) == math.inf
    assert rel_error(torch.tensor([0.0]), torch.tensor([0.0])) == 0.0


def test_compare_tolerance_and_fla_slack():
    ref = {"o": torch.ones(100, dtype=torch.float64)}
    tol = sizes.TOLERANCE[torch.bfloat16]
    within = {"o": ref["o"] * (1 + tol / 2)}
    outside = {"o": ref["o"] * (1 + 2 * tol)}
    rows, ok = correctness.compare(within, ref, None, torch.bfloat16)
    assert ok and rows[0]["pass"] and rows[0]["err_vs_fp64"] == pytest.approx(tol / 2)
    _, ok = correctness.compare(outside, ref, None, torch.bfloat16)
    assert not ok
    # beyond the tolerance, but no worse than FLA_SLACK x fla's own error: passes
    fla = {"o": ref["o"] * (1 + 1.9 * tol)}
    rows, ok = correctness.compare(outside, ref, fla, torch.bfloat16)
    assert ok and rows[0]["fla_err_vs_fp64"] == pytest.approx(1.9 * tol)
    _, ok = correctness.compare({"o": ref["o"] * float("nan")}, ref, fla, torch.bfloat16)
    assert not ok


def test_per_sequence_runs_each_packed_sequence_alone():
    lengths = [3, 5]
    cu = torch.tensor([0, 3, 8])
    x = kda.kda_inputs(1, 8, 2, 4, 4, torch.float64, torch.device("cpu"), 0, N=2)
    packed = per_sequence(naive_recurrent_kda)
    o, ht = packed(*(x[n] for n in ("q", "k", "v", "g", "beta")), x["h0"], True, cu_seqlens=cu)
    start = 0
    for i, n in enumerate(lengths):
        oi, hi = naive_recurrent_kda(
            *(x[k][:, start : start + n] for k in ("q", "k", "v", "g", "beta")),
            initial_state=x["h0"][i : i + 1],
            output_final_state=True,
        )
        torch.testing.assert_close(o[:, start : start + n], oi, rtol=0, atol=0)
        torch.testing.assert_close(ht[i : i + 1], hi, rtol=0, atol=0)
        start += n


def test_a_broken_fla_import_is_contained_by_the_guard(tmp_path, monkeypatch):
    """_fla_ops runs inside _try_fla: a broken fla install is recorded, the item goes on."""
    run = _run(tmp_path, 60)
    run.fla_second_opinion = "always"
    record: dict = {}
    ctx = gpu_run.ItemContext(record, gpu_run.PartReport("correctness", tmp_path, {}), run)

    def broken(device):
        raise ImportError("fla is broken")

    monkeypatch.setattr(correctness, "fla_ops", broken)
    x = kda.kda_inputs(1, 8, 1, 4, 4, torch.float32, torch.device("cpu"), 0)
    ours = {"o": x["v"]}
    out = correctness._second_opinion(
        ctx, ours, ours, torch.float32, lambda: correctness.fla_ops(run.device)
    )
    assert out is None and record["fla_error"] == "ImportError: fla is broken"
    assert correctness._fla_name(ctx, "chunk").startswith("fla unavailable")
    # on a GPU run fla is asked only when ours misses the tolerance
    run.fla_second_opinion = "on miss"
    record.clear()
    assert correctness._second_opinion(ctx, ours, ours, torch.float32, broken) is None
    assert record == {"fla_run": "no: every tensor within the tolerance"}


def test_a_failing_fla_is_recorded_and_the_item_goes_on(tmp_path):
    run = _run(tmp_path, 60)
    record: dict = {}
    ctx = gpu_run.ItemContext(record, gpu_run.PartReport("speed", tmp_path, {}), run)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this dtype")

    assert kda.try_fla(ctx, broken, 1, x=2) is None
    assert record["fla_error"] == "RuntimeError: no kernel for this dtype"
    assert speed.probe_fla(ctx, lambda: None) is True
    assert speed.probe_fla(ctx, broken) is False


def test_bench_interleaved_alternates_and_resets_grads():
    calls: list[str] = []
    w = torch.ones(2, requires_grad=True)

    def a():
        assert w.grad is None  # reset before every timed call
        (w * 2).sum().backward()
        calls.append("a")

    t = timing.bench_interleaved(
        {"a": a, "b": lambda: calls.append("b")},
        torch.device("cpu"),
        rounds=2,
        cpu_reps=2,
        grad_to_none={"a": [w]},
    )
    # torch.utils.benchmark: every timed call after an untimed one (its block-size estimate),
    # cpu_reps of them per round, alternating by round
    assert calls == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4
    assert t["a"]["n"] == t["b"]["n"] == 4
    assert 0 <= t["a"]["min"] <= t["a"]["median"] <= t["a"]["max"]
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        timing.bench_interleaved({"a": a}, torch.device("cpu"), rounds=0)


def test_decode_step_bytes():
    x = kda.kda_inputs(3, 1, 2, 8, 16, torch.bfloat16, torch.device("cpu"), 0)
    state, io = kernel_speed.decode_step_bytes(*(x[n] for n in ("q", "k", "v", "g", "beta")))
    assert state == 3 * 2 * 8 * 16 * 4  # fp32 state
    # q, k (bf16), v (bf16), g (fp32), beta (bf16), and the output o like v
    assert io == 2 * (3 * 2 * 8 * 2) + 3 * 2 * 16 * 2 + 3 * 2 * 8 * 4 + 3 * 2 * 2 + 3 * 2 * 16 * 2


# ------------------------------------------------------------------------------ budget
def _run(tmp_path: Path, seconds: float, both_dtypes: bool = False) -> gpu_run.Run:
    return gpu_run.Run(
        device=torch.device("cpu"),
        dtypes=(torch.bfloat16, torch.float32) if both_dtypes else (torch.float32,),
        sizes=sizes.dry_run_sizes(),
        budget=gpu_run.Budget(seconds),
        folder=tmp_path,
        dry_run=True,
        seed=0,
        header={"env": {"device": "test"}, "dry_run": True},
    )


def test_the_timer_cuts_off_the_item_in_flight_and_later_items_are_skipped(tmp_path):
    run = _run(tmp_path, 0.3)

    def forever(ctx):
        ctx.add_row({"i": 0})
        while True:
            time.sleep(0.01)

    def never(ctx):  # pragma: no cover - must be skipped
        raise AssertionError("ran after the budget ran out")

    run.budget.start_timer()
    try:
        report = gpu_run.run_part(
            run, "speed", [gpu_run.Item("a", "x", forever), gpu_run.Item("b", "x", never)]
        )
    finally:
        run.budget.stop_timer()
    first, second = report.items
    assert first["status"] == "cut off" and "budget ran out" in first["reason"]
    assert first["rows"] == [{"i": 0}]  # what the item measured before is kept
    assert second["status"] == "skipped" and "budget left" in second["reason"]
    saved = json.loads((tmp_path / "gpu_check_speed.json").read_text())
    assert [i["status"] for i in saved["items"]] == ["cut off", "skipped"]
    assert saved["status"] == "incomplete"


def test_an_item_error_is_recorded_and_the_part_goes_on(tmp_path):
    run = _run(tmp_path, 60)

    def broken(ctx):
        raise ValueError("bad shape")

    def fine(ctx):
        ctx.record["status"] = "pass"

    report = gpu_run.run_part(
        run, "correctness", [gpu_run.Item("a", "x", broken), gpu_run.Item("b", "x", fine)]
    )
    assert report.items[0]["status"] == "error"
    assert report.items[0]["reason"] == "ValueError: bad shape"
    assert report.items[1]["status"] == "pass"
    assert report.data["status"] == "failed"
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["verdict"]["kernels_validated"] is False


def test_a_spent_budget_skips_every_item_with_its_reason(tmp_path, capsys):
    # exit 1: not every item passed (they were skipped), so a script cannot take it for a pass
    assert cli.main(["--dry-run", "--budget", "1e-6", "--out-dir", str(tmp_path)]) == 1
    assert "did not pass" in capsys.readouterr().err
    for part in sizes.DEFAULT_PARTS:
        data = json.loads((tmp_path / f"gpu_check_{part}.json").read_text())
        assert data["dry_run"] is True and data["items"]
        for item in data["items"]:
            assert item["status"] == "skipped", item
            assert "of the budget left" in item["reason"]
        assert (tmp_path / f"gpu_check_{part}.md").read_text().startswith(f"# GPU check: {part}")
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["verdict"]["kernels_validated"] is False
    assert set(summary["parts"]) == set(sizes.DEFAULT_PARTS)


def test_exit_code_is_1_when_a_correctness_item_fails(tmp_path, monkeypatch, capsys):
    def failing(run):
        def fail(ctx):
            ctx.record["status"] = "fail"

        return [gpu_run.Item("a failing check", "reference", fail)]

    monkeypatch.setattr(correctness, "correctness_items", failing)
    argv = ["--dry-run", "--parts", "correctness", "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 1
    assert "correctness: a failing check (fail)" in capsys.readouterr().err

    def passing(run):
        def ok(ctx):
            ctx.record["status"] = "pass"

        return [gpu_run.Item("a passing check", "reference", ok)]

    monkeypatch.setattr(correctness, "correctness_items", passing)
    assert cli.main(argv) == 0


# ------------------------------------------------------------------------------ plan
def _gpu_run(tmp_path: Path) -> gpu_run.Run:
    return gpu_run.Run(
        device=torch.device("cpu"),
        dtypes=(torch.bfloat16, torch.float32),
        sizes=sizes.gpu_sizes(),
        budget=gpu_run.Budget(480),
        folder=tmp_path,
        dry_run=False,
        seed=0,
        header={},
    )


def test_planned_compile_and_run_fit_the_default_budget(tmp_path):
    rows = plan.plan(_gpu_run(tmp_path))
    total = sizes.STARTUP_S + sum(r["compile_s"] + r["run_s"] for r in rows)
    assert total <= sizes.DEFAULT_BUDGET_MIN * 60, plan.budget_markdown(rows)
    # every cost key has an estimate, and every compiled set a compile time
    gpu = sizes.gpu_sizes()
    assert all(r["cost"] in gpu.costs for r in rows)
    assert {k for c in gpu.costs.values() for k in c.compiles} <= set(gpu.compile_s)
    # each kernel set's compile is charged once, to its first item
    charged = [k for r in rows for k in r["compiles"]]
    assert len(charged) == len(set(charged))


def test_dry_run_plans_the_same_items_in_the_same_order(tmp_path):
    gpu = [(r["part"], r["cost"]) for r in plan.plan(_gpu_run(tmp_path))]
    dry = [(r["part"], r["cost"]) for r in plan.plan(_run(tmp_path, 60, both_dtypes=True))]
    assert dry == gpu
    assert any(key.startswith("safe gate") for _, key in gpu)  # the safe-gate path is checked
    assert any(key.startswith("grid") for _, key in gpu)
    assert ("speed", "step latency") in gpu


def test_readme_budget_table_is_the_plan(tmp_path):
    text = (ROOT / "benchmarks" / "README.md").read_text()
    start, end = "<!-- gpu-budget -->\n", "<!-- /gpu-budget -->"
    assert start in text and end in text
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == plan.budget_markdown(plan.plan(_gpu_run(tmp_path)))


def test_run_cost_charges_a_kernel_set_once(tmp_path):
    run = _gpu_run(tmp_path)
    cost = run.sizes.costs["chunk bf16"]
    assert "ours chunk bf16 K=V=128" in cost.compiles
    first = run.cost("chunk bf16")
    assert first == cost.run_s + sum(sizes.COMPILE_S[k] for k in cost.compiles)
    run.mark_compiled("chunk bf16")
    assert run.cost("chunk bf16") == cost.run_s


def test_summary_verdict_needs_every_correctness_item_passed_on_a_gpu(tmp_path):
    part = {
        "part": "correctness",
        "env": {
            "arch": "sm_90",
            "capability": [9, 0],
            "device": "NVIDIA H100 80GB HBM3",
            "time_utc": "t",
        },
        "dry_run": False,
        "status": "complete",
        "items": [{"name": "a", "status": "pass"}, {"name": "b", "status": "pass"}],
    }
    (tmp_path / "gpu_check_correctness.json").write_text(json.dumps(part))
    verdict = results.write_summary(tmp_path)["verdict"]
    assert verdict["kernels_validated"] is True and verdict["arch"] == "sm_90"
    assert "add (9, 0) to VALIDATED_TRITON_ARCHS" in verdict["next_step"]
    assert "Next step: add (9, 0)" in (tmp_path / "gpu_check.md").read_text()
    part["items"][1]["status"] = "skipped"
    (tmp_path / "gpu_check_correctness.json").write_text(json.dumps(part))
    verdict = results.write_summary(tmp_path)["verdict"]
    assert verdict["kernels_validated"] is False and "['b']" in verdict["reason"]
    assert "**no**" in (tmp_path / "gpu_check.md").read_text()


# ------------------------------------------------------------------------------ dry run
@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # the entry point sets it itself
    res = subprocess.run(
        # the budget is a GPU run's; toy sizes under the interpreter take minutes on a CPU
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--dry-run",
            "--budget",
            "60",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verdict: kernels validated on this GPU: no (dry run" in res.stdout
    corr = json.loads((tmp_path / "gpu_check_correctness.json").read_text())
    assert corr["env"]["fla_backends"]["version"] and corr["autotune_space"] == "first"
    assert "compile" in corr and "fla_dispatch" in corr
    for part in sizes.DEFAULT_PARTS:
        data = json.loads((tmp_path / f"gpu_check_{part}.json").read_text())
        assert data["status"] == "complete", data
        assert data["env"]["arch"].startswith("cpu")
        for item in data["items"]:
            assert item["status"] in ("pass", "ok"), item
        md = (tmp_path / f"gpu_check_{part}.md").read_text()
        assert md.startswith(f"# GPU check: {part}") and "dry run" in md
    corr = json.loads((tmp_path / "gpu_check_correctness.json").read_text())
    checked = {r["tensor"] for i in corr["items"] for r in i.get("checks", [])}
    grid = {"o (short sequence)", "ht (short sequence)", "o (long sequence) finite"}
    assert checked == set(KDA_NAMES) | grid  # every tensor, and the grid-limit item's
    speed = json.loads((tmp_path / "gpu_check_speed.json").read_text())
    modes = [r["mode"] for i in speed["items"] for r in i.get("rows", []) if "mode" in r]
    assert modes.count("fwd") == modes.count("fwd+bwd") == 2  # the two anchors
    timed = [r for i in speed["items"] for r in i.get("rows", []) if "mode" in r]
    assert all(r["safe_gate_speedup"] > 0 for r in timed[:2])  # the safe gate, first anchor
    assert all(r["unsplit_over_ours_split1"] > 0 for r in timed[2:])  # a split, the second
    step = next(i for i in speed["items"] if i["name"].startswith("state pass time"))
    assert step["model_step_latency_us"] > 0 and "fwd (whole forward)" in step["step_us"]
    # the split paths ran beside the unsplit ones, each against the reference
    paths = {r.get("path") for i in corr["items"] for r in i.get("checks", [])}
    assert {"unsplit", "forced: split, 1 chunks/segment, 3 segments"} <= paths, paths
    assert corr["env"]["auto_segment_chunks"]["anchors"][0]["segment_chunks"] == 0  # CPU
    model = json.loads((tmp_path / "gpu_check_model.json").read_text())
    decode = [r for i in model["items"] if i["name"].startswith("decode") for r in i["rows"]]
    assert {r["batch"] for r in decode} >= {1} and all(r["floor_ms"] > 0 for r in decode)
    train = [i for i in model["items"] if i["name"].startswith("train")]
    assert all(i["tokens_per_s"] > 0 for i in train)
    summary = (tmp_path / "gpu_check.md").read_text()
    assert summary.startswith("# GPU check: summary") and "**no**" in summary


# ------------------------------------------------------------------------------ splitting
def test_describe_path_names_the_split_a_call_takes():
    cpu = torch.device("cpu")
    assert splitting.describe_path([0, 300], 2, 16, cpu, 0) == "unsplit"
    assert splitting.describe_path([0, 300], 2, 16, cpu, None) == "auto: unsplit"  # CPU
    assert (
        splitting.describe_path([0, 300], 2, 16, cpu, 2)
        == "forced: split, 2 chunks/segment, 3 segments"
    )
    # nothing to split: every sequence fits one segment
    assert splitting.describe_path([0, 64, 100], 2, 16, cpu, 1) == "forced: unsplit"


def test_auto_choices_cover_the_anchors():
    choices = splitting.auto_choices(torch.device("cpu"))
    assert [a["shape"] for a in choices["anchors"]] == [
        kda.shape_str(*s) for s in splitting.SPLIT_ANCHORS
    ]
    assert all(a["segment_chunks"] == 0 and a["segments"] == 1 for a in choices["anchors"])
    assert "CPU: never splits" in choices["summary"]


def test_model_step_latency_keeps_the_interpreter_setting(monkeypatch):
    """benchmarks.kernel_cost sets TRITON_INTERPRET=1 when imported; a GPU run must not
    inherit it (kernels defined later would run under the interpreter)."""
    monkeypatch.delitem(sys.modules, "benchmarks.kernel_cost", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert splitting.model_step_latency_s() > 0
    assert "TRITON_INTERPRET" not in os.environ
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delitem(sys.modules, "benchmarks.kernel_cost", raising=False)
    splitting.model_step_latency_s()
    assert os.environ["TRITON_INTERPRET"] == "0"


def test_split_item_checks_every_path_against_the_reference(tmp_path):
    """The dense correctness item at the dry-run size runs unsplit and a forced split, each
    with its own rows, and passes; a split that went wrong would fail the item."""
    run = _run(tmp_path, 600)
    record: dict = {}
    ctx = gpu_run.ItemContext(record, gpu_run.PartReport("correctness", tmp_path, {}), run)
    shape = run.sizes.chunk_shapes[0]
    correctness._chunk_item(shape, torch.float32, paths=(0, 1))(ctx)
    assert record["status"] == "pass", record
    assert record["paths"] == ["unsplit", "forced: split, 1 chunks/segment, 2 segments"]
    assert [r["path"] for r in record["checks"]] == [p for p in record["paths"] for _ in KDA_NAMES]
