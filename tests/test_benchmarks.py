"""The model-level benchmark scripts: --quick runs, their outputs, exact cache sizes, bad input.

The scripts live in the ``benchmarks`` package (run as ``python -m benchmarks.<name>`` from
the repository root). Each quick run
goes through a subprocess, as a user would run it; argument and memory errors are checked
in-process through each script's ``main(argv)`` (they exit before any work) plus one subprocess
that shows there is no traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: A script's quick mode on the CPU, one thread, no progress bar.
QUICK_ON_ONE_CPU_THREAD = ("--quick", "--device", "cpu", "--threads", "1", "--no-progress")


def _module(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def _run(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def _outputs(folder: Path, name: str) -> dict:
    for ext in ("json", "md", "png"):
        assert (folder / f"{name}.{ext}").is_file(), f"{name}.{ext} missing"
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert (folder / f"{name}.md").read_text().startswith("# ")
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["benchmark"] == name
    for key in ("device", "device_type", "torch", "python", "time_utc"):
        assert key in data["env"]
    for key in ("args", "config", "rows", "summary"):
        assert key in data, key
    return data


# ------------------------------------------------------------------------------ quick runs
def test_kv_cache_quick_run(tmp_path):
    res = _run("kv_cache.py", "--quick", "--no-progress", "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    data = _outputs(tmp_path, "kv_cache")
    assert data["args"]["preset"] == "kimi-linear-48b-a3b"
    assert [r["context"] for r in data["rows"]] == [1024, 2048, 4096]
    # the released layout: 7 MLA layers x (512 + 64) bf16 values per token; 20 KDA layers of a
    # 32 x 128 x 128 fp32 state and three conv tails of 3 tokens x 4096 bf16 values
    kda = 20 * (32 * 128 * 128 * 4 + 3 * 3 * 4096 * 2)
    for r in data["rows"]:
        ctx = r["context"]
        assert r["hybrid_analytic_bytes"] == 7 * 576 * 2 * ctx + kda
        assert r["all_mla_analytic_bytes"] == 27 * 576 * 2 * ctx
        assert r["gqa_analytic_bytes"] == 27 * 8 * (192 + 128) * 2 * ctx
        assert r["hybrid_measured_bytes"] == r["hybrid_analytic_bytes"]
        assert r["all_mla_measured_bytes"] == r["all_mla_analytic_bytes"]
    assert data["summary"]["measured_equals_analytic"] is True
    assert data["models"]["gqa"] == {
        "layers": 27,
        "kv_heads": 8,
        "k_head_dim": 192,
        "v_head_dim": 128,
        "values_per_token_layer": 2560,
    }
    floor = data["floor_rows"]
    assert {(r["context"], r["batch_size"]) for r in floor} == {
        (c, b) for c in (1024, 2048, 4096) for b in (1, 8, 64)
    }
    for r in floor:
        assert r["hybrid_step_bytes"] == pytest.approx(
            r["hybrid_weight_bytes"] + r["hybrid_cache_bytes"]
        )
        assert r["floor_ratio"] == pytest.approx(r["all_mla_step_bytes"] / r["hybrid_step_bytes"])
    # about 3B active parameters per token at batch 1, in bf16
    b1 = next(r for r in floor if r["batch_size"] == 1)
    assert 5e9 < b1["hybrid_weight_bytes"] < 7e9
    assert "wrote" in res.stdout


def test_decode_quick_run(tmp_path):
    res = _run("decode.py", *QUICK_ON_ONE_CPU_THREAD, "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    data = _outputs(tmp_path, "decode")
    rows = data["rows"]
    equal = [r for r in rows if r["figure"] == "equal_batch"]
    assert {(r["model"], r["context"], r["batch_size"]) for r in equal} == {
        (m, c, b) for m in ("hybrid", "all_mla") for c in (256, 1024) for b in (1, 2)
    }
    assert {r["model"] for r in rows if r["figure"] == "throughput"} == {"hybrid", "all_mla"}
    for r in rows:
        assert r["tpot_min_ms"] <= r["tpot_ms"] <= r["tpot_max_ms"]
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] / (r["tpot_ms"] / 1e3))
        assert r["floor_ms"] > 0 and r["measured_over_floor"] == pytest.approx(
            r["tpot_ms"] / r["floor_ms"]
        )
        assert r["step_bytes"] == pytest.approx(r["weight_bytes"] + r["cache_bytes"])
    assert data["bandwidth_bytes_per_s"] > 0
    assert set(data["summary"]["tpot_speedup"]) == {"1", "2"}


def test_prefill_quick_run(tmp_path):
    res = _run("prefill.py", *QUICK_ON_ONE_CPU_THREAD, "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    data = _outputs(tmp_path, "prefill")
    assert {(r["model"], r["length"]) for r in data["rows"]} == {
        (m, n) for m in ("hybrid", "all_mla") for n in (128, 512)
    }
    for r in data["rows"]:
        assert r["tokens_per_s"] == pytest.approx(r["length"] / r["seconds"])
    assert data["summary"]["length"] == 512 and data["summary"]["speedup"] > 0


# ------------------------------------------------------------------------------ exact cache bytes
@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_cache_bytes_equal_analytic(preset, dtype):
    from kimi_linear.config import KimiLinearConfig

    kv_cache = _module("kv_cache")
    cfg = KimiLinearConfig.from_preset(preset)
    for config in (cfg, cfg.all_mla_twin(), cfg.with_layer_kinds("kda")):
        for ctx, batch in ((1, 1), (300, 2), (2048, 3)):
            got = kv_cache.measure_cache(config, ctx, batch, dtype, torch.device("cpu"), seed=0)
            want = config.kv_cache_bytes(ctx, batch, cache_dtype_bytes=dtype.itemsize)["total"]
            assert got["nbytes"] == want, (config.name, ctx, batch)


def test_fill_cache_sets_lengths_and_values():
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    workload = _module("workload")
    cfg = KimiLinearConfig.from_preset("tiny")
    model = KimiLinearForCausalLM(cfg).eval()
    cache = model.new_cache(2, capacity=40)
    workload.fill_cache_(cache, 37, seed=1)
    assert cache.seq_len == 37
    for layer in cache.layers:
        if hasattr(layer, "length"):
            assert layer.length == 37
            assert layer.latent[:, :37].abs().sum(-1).gt(0).all()  # every slot written
            assert layer.latent[:, 37:].eq(0).all()
        else:
            assert layer.state.std() == pytest.approx(cfg.kda_head_dim**-0.5, rel=0.2)
    with torch.inference_mode():  # the model continues a synthetic cache
        logits = model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert logits.shape == (2, 1, cfg.vocab_size) and torch.isfinite(logits).all()
    assert cache.seq_len == 38
    workload.rewind_cache_(cache, 37)
    assert cache.seq_len == 37
    with pytest.raises(ValueError, match="capacity"):
        workload.fill_cache_(model.new_cache(1, capacity=8), 9)


def test_active_weight_bytes_counts_expected_experts():
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    workload = _module("workload")
    cfg = KimiLinearConfig.from_preset("tiny")
    model = KimiLinearForCausalLM(cfg)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    one = workload.active_weight_bytes(model, 1)
    many = workload.active_weight_bytes(model, 10_000)
    assert one["all_params"] == total
    assert one["total"] < many["total"] <= total
    assert workload.expected_distinct_experts(
        cfg.num_experts, cfg.num_experts_per_token, 1
    ) == pytest.approx(2)
    assert workload.expected_distinct_experts(4, 2, 10_000) == pytest.approx(4)
    expert_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in f".{n}")
    assert one["experts"] == pytest.approx(expert_bytes * 2 / 4)


# ------------------------------------------------------------------------------ bad input
SCRIPTS = ["kv_cache", "decode", "prefill"]
LENGTH_FLAG = {"kv_cache": "--contexts", "decode": "--contexts", "prefill": "--lengths"}


def _exit(capsys, script: str, argv: list[str]) -> tuple[int, str]:
    mod = _module(script)
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_preset(capsys, script):
    code, err = _exit(capsys, script, ["--preset", "kimi-9000b"])
    assert code == 2 and "--preset" in err and "kimi-9000b" in err


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("value", ["-4096", "0", "4x"])
def test_bad_length(capsys, script, value):
    code, err = _exit(capsys, script, [LENGTH_FLAG[script], f"1K,{value}"])
    assert code == 2 and LENGTH_FLAG[script] in err


def test_bad_model_override(capsys):
    code, err = _exit(capsys, "decode", ["--preset", "tiny", "--experts", "-3"])
    assert code == 2 and "--experts" in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_context_too_large_for_device(capsys, script):
    argv = [LENGTH_FLAG[script], "64G", "--preset", "tiny", "--device", "cpu", "--no-progress"]
    if script == "kv_cache":
        argv += ["--strict", "--no-floor"]
    code, err = _exit(capsys, script, argv)
    assert code == 3
    assert "free" in err and "GB" in err


def test_memory_budget_beyond_device(capsys):
    code, err = _exit(
        capsys, "decode", ["--preset", "tiny", "--device", "cpu", "--memory-budget-gb", "1e9"]
    )
    assert code == 3 and "--memory-budget-gb" in err


def test_errors_print_no_traceback():
    res = _run("decode.py", "--preset", "tiny", "--contexts", "64G", "--device", "cpu", timeout=120)
    assert res.returncode == 3
    assert res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr


# ------------------------------------------------------------------------ train_profile (H9)
@pytest.mark.slow
def test_train_profile_quick_run(tmp_path):
    res = _run(
        "train_profile.py", "--quick", "--models", "tiny,syn-hybrid", "--baseline", "HEAD",
        "--threads", "1", "--no-progress", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for ext in ("json", "md"):
        assert (tmp_path / f"train_profile.{ext}").is_file()
    data = json.loads((tmp_path / "train_profile.json").read_text())
    assert data["benchmark"] == "train_profile"
    assert set(data["models"]) == {"tiny", "syn-hybrid"}
    for m in data["models"].values():
        p = m["profile"]
        assert p["step_ms"] > 0
        assert {"kda_op/fwd", "kda_op/bwd", "mla/fwd", "mla/bwd", "optimizer", "other"} <= set(
            p["spans_ms"]
        )
        # the KDA op lies inside the KDA layers: the spans nest
        assert p["spans_ms"]["kda_op/fwd"] <= p["spans_ms"]["kda_layer/fwd"] + 1e-6
        C = m["kda_chunk_size"]  # the model's own (config default: torch_chunk_kda's, 32)
        assert set(m["steps_per_s"]) == {f"HEAD C={C}", f"now C={C}"}
    assert (tmp_path / "train_profile.md").read_text().startswith("# Where a CPU training step")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "tiny,gpt5"], "--models: unknown ['gpt5']"),
        (["--rounds", "-1"], "--rounds must be >= 0"),
        (["--warmup", "-2"], "--warmup must be >= 0"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_train_profile_bad_arguments(capsys, argv, message):
    mod = _module("train_profile")
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_train_profile_spans_nest_and_close():
    """The profiler spans open and close in pairs, forward and backward, on a tiny model."""
    mod = _module("train_profile")
    setup = mod.model_setup("syn-hybrid", 32, quick=True)
    trainee = mod.Trainee(setup, torch.device("cpu"), seed=0)
    out = mod.profile_steps(trainee, steps=1, warmup=0)
    assert not any(mod._OPEN.values())  # every range was closed
    spans = out["spans_ms"]
    assert spans["kda_layer/bwd"] > 0 and spans["kda_op/bwd"] > 0 and spans["mla/bwd"] > 0
    assert spans["kda_op/bwd"] <= spans["kda_layer/bwd"] + 1e-6


# ------------------------------------------------------------------------------ --quick
def test_quick_honours_explicitly_given_sizes():
    """``--quick`` fills tiny sizes only where none was given (issue 27.7): an explicit size,
    even one equal to the normal default, is kept."""
    ks = _module("kernel_speed")
    args = ks.parse_args(["--quick", "--heads", "4", "--head-dim", "128", "--tokens", "256"])
    assert (args.heads, args.head_dim, args.tokens) == (4, 128, 256)
    args = ks.parse_args(["--quick"])
    assert (args.heads, args.head_dim, args.tokens) == (1, 16, 64)
    cpu = _module("kda_cpu")
    args = cpu.parse_args(["--quick", "--heads", "8", "--reps", "3"])
    assert (args.heads, args.head_dim, args.reps) == (8, 16, 3)
    decode = _module("decode")
    args = decode.parse_args(["--quick", "--warmup", "3"])
    decode.resolve_defaults(args, torch.device("cpu"))
    assert args.warmup == 3
    args = decode.parse_args(["--quick"])
    decode.resolve_defaults(args, torch.device("cpu"))
    assert args.warmup == 1


def test_explicit_dests_sees_options_given_with_their_default_value():
    import argparse

    common = _module("common")
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true")
    assert common.explicit_dests(p, ["--heads", "16", "--quick"]) == {"heads", "quick"}
    assert common.explicit_dests(p, []) == set()


def test_kernel_speed_refuses_head_dims_the_kernels_cannot_run(capsys):
    """``--head-dim 300`` used to be accepted and end as error rows (or be dropped by
    ``--quick``): the KDA kernels take head dims up to 256, so it is a one-line error unless
    only providers without that limit run (issue 25.4)."""
    ks = _module("kernel_speed")
    with pytest.raises(SystemExit):
        ks.parse_args(["--head-dim", "300", "--quick"])
    assert "--head-dim 300 exceeds 256" in capsys.readouterr().err
    args = ks.parse_args(["--head-dim", "300", "--quick", "--providers", "torch,sdpa"])
    assert args.head_dim == 300


# ------------------------------------------------------------------ timing and memory helpers
class _FakeClock:
    """``perf_counter`` that only the timed functions advance (by their stated durations)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def work(self, seconds: float, calls: list[str], name: str):
        def fn() -> None:
            calls.append(name)
            self.now += seconds

        return fn


def _fake_timing(monkeypatch):
    import types

    timing = _module("timing")
    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    return timing, clock


def test_bench_interleaved_on_cpu_times_each_call_with_torch_utils_benchmark(monkeypatch):
    """CPU timing through ``torch.utils.benchmark``: per call seconds exactly as spent (fake
    clock: 2 s and 6 s a call, so the ratio 3 comes from one interleaved run), rounds
    alternating between the implementations, one untimed call before each timed one,
    ``cpu_min_run_time`` adding blocks, and the caller's thread count kept (the Timer's default
    would time at one thread)."""
    timing, clock = _fake_timing(monkeypatch)
    calls: list[str] = []
    threads: list[int] = []
    fns = {"a": clock.work(2.0, calls, "a"), "b": clock.work(6.0, calls, "b")}
    fns["c"] = lambda: threads.append(torch.get_num_threads())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = timing.bench_interleaved(fns, torch.device("cpu"), rounds=3)
    finally:
        torch.set_num_threads(before)
    assert calls == ["a", "a", "b", "b"] * 3
    assert set(threads) == {2}
    assert (t["a"]["n"], t["a"]["median"], t["a"]["min"], t["a"]["max"]) == (3, 2.0, 2.0, 2.0)
    assert t["b"]["median"] / t["a"]["median"] == 3.0
    calls.clear()
    t = timing.bench_interleaved(
        {"a": fns["a"]}, torch.device("cpu"), rounds=2, cpu_min_run_time=5.0
    )
    assert t["a"]["n"] == 6 and t["a"]["median"] == 2.0  # 3 timed calls (6 s >= 5 s) a round
    assert len(calls) == 8
    for bad, match in [
        (dict(rounds=0), "rounds must be a positive int"),
        (dict(cpu_reps=0), "cpu_reps must be a positive int"),
        (dict(cpu_min_run_time=-1.0), "cpu_min_run_time must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            timing.bench_interleaved({"a": fns["a"]}, torch.device("cpu"), **bad)


def test_timeit_on_cpu_uses_torch_utils_benchmark(monkeypatch):
    timing, clock = _fake_timing(monkeypatch)
    calls: list[str] = []
    t = timing.timeit(clock.work(0.5, calls, "f"), torch.device("cpu"), warmup=2, reps=4)
    assert t == {"median": 0.5, "min": 0.5, "max": 0.5, "stdev": 0.0}
    assert len(calls) == 2 + 2 * 4  # the warm-up, then an untimed call before each timed one


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux /proc only")
def test_memory_helpers_agree_with_proc(monkeypatch):
    """psutil's RSS and available memory equal what /proc says (the hand-written readers'
    source): RSS within 4 MiB of ``/proc/self/statm``, available memory within 5% of
    ``MemAvailable`` (other processes allocate meanwhile), the cgroup limit still applied."""
    import os

    hardware = _module("hardware")
    with open("/proc/self/statm") as f:
        statm = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(hardware.process_resident_bytes() - statm) <= 4 << 20
    with open("/proc/meminfo") as f:
        meminfo = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    monkeypatch.setattr(hardware, "_read_int", lambda path: None)  # no cgroup limit
    assert hardware.available_memory(torch.device("cpu")) == pytest.approx(meminfo, rel=0.05)
    limits = {"/sys/fs/cgroup/memory.max": 96 << 20, "/sys/fs/cgroup/memory.current": 32 << 20}
    monkeypatch.setattr(hardware, "_read_int", limits.get)
    assert meminfo > 64 << 20
    assert hardware.available_memory(torch.device("cpu")) == 64 << 20  # the cgroup's allowance


def test_isolation_cpu_quick_run(tmp_path):
    """The NaN-isolation cost benchmark times every case with isolation on and off, interleaved,
    and writes JSON + Markdown."""
    res = _run("isolation_cpu.py", "--quick", "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "isolation_cpu.json").read_text())
    assert (tmp_path / "isolation_cpu.md").is_file()
    seen = {(r["case"], r["pass"], r["isolation"]) for r in data["rows"]}
    for case, step, _ in list(seen):
        assert {(case, step, True), (case, step, False)} <= seen, (case, step)
    assert {c for c, _, _ in seen} >= {"torch_chunk_kda", "mla_prefill", "mla_block"}
