"""Result files: the JSON of each part, its Markdown, and the summary with the verdict."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check.sizes import FLA_SLACK, PARTS, TOLERANCE


def jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return x


def write_atomic(path: Path, text: str) -> None:
    """Write atomically (a reader, or a run killed mid-write, never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return "" if v is None else str(v)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return ""
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_part_markdown(data: dict[str, Any]) -> str:
    env = data.get("env", {})
    out = [
        f"# GPU check: {data['part']}\n",
        f"{env.get('device', '?')}; torch {env.get('torch')}, triton {env.get('triton')}, "
        f"fla {env.get('fla')}; {env.get('time_utc', '')}"
        + (
            " (**dry run**: toy sizes on the CPU, Triton interpreter; says nothing about a GPU)"
            if data.get("dry_run")
            else ""
        )
        + f". Part status: **{data['status']}**.\n",
    ]
    fla = env.get("fla_backends") or {}
    comp = data.get("compile") or {}
    out.append(
        f"Autotune space of our kernels: {data.get('autotune_space', 'full')}. fla "
        f"{fla.get('version', env.get('fla'))} dispatch: "
        + (", ".join(data.get("fla_dispatch") or []) or "fla's default Triton kernels")
        + ". Compile seconds (cold binaries, this part): "
        + (
            ", ".join(f"{k} {v:g}" for k, v in comp.get("seconds", {}).items()) or "none"
            if comp.get("available")
            else "not recorded"
        )
        + ".\n"
    )
    if (env.get("auto_segment_chunks") or {}).get("summary"):
        out.append(f"In-device sequence splitting, {env['auto_segment_chunks']['summary']}.\n")
    if comp.get("per_kernel"):
        out.append(
            _table(
                [{"kernel": k, **v} for k, v in sorted(comp["per_kernel"].items())],
                ("kernel", "owner", "binaries", "seconds"),
            )
        )
    if data["part"] == "correctness":
        out.append(
            "Errors are norm-relative, ||x - ref|| / ||ref||, per tensor, against a float64 "
            "reference on the same (rounded) inputs; an item passes when every tensor is within "
            f"the tolerance (fp32 {TOLERANCE[torch.float32]:.0e}, "
            f"bf16 {TOLERANCE[torch.bfloat16]:.0e}) "
            f"or within {FLA_SLACK}x fla's own error.\n"
        )
    for item in data["items"]:
        out.append(f"## {item['name']}\n")
        meta = {k: v for k, v in item.items() if k not in ("name", "rows", "checks")}
        out.append("; ".join(f"{k}: {_fmt(v)}" for k, v in meta.items()) + "\n")
        if item.get("checks"):
            out.append(_table(item["checks"]))
        if item.get("rows"):
            out.append(_table(item["rows"]))
    return "\n".join(out)


def write_summary(folder: Path) -> dict[str, Any]:
    """Rebuild ``gpu_check.json`` / ``.md`` from every part file in ``folder``."""
    parts: dict[str, Any] = {}
    for part in PARTS:
        path = folder / f"gpu_check_{part}.json"
        if path.is_file():
            try:
                parts[part] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
    corr = parts.get("correctness")
    verdict: dict[str, Any] = {"kernels_validated": False}
    if corr is None:
        verdict["reason"] = "the correctness part has not run"
    else:
        bad = [i["name"] for i in corr["items"] if i["status"] not in ("pass", "ok")]
        verdict["arch"] = corr.get("env", {}).get("arch")
        verdict["device"] = corr.get("env", {}).get("device")
        if corr.get("dry_run"):
            verdict["reason"] = "dry run (CPU, interpreter): validates the script, not a GPU"
        elif bad:
            verdict["reason"] = f"{len(bad)} correctness item(s) did not pass: {bad}"
        else:
            verdict["kernels_validated"] = True
            verdict["reason"] = "every correctness item passed"
            cap = corr.get("env", {}).get("capability")
            if cap:
                verdict["next_step"] = (
                    f"add {tuple(cap)} to VALIDATED_TRITON_ARCHS in kimi_linear/backends.py "
                    "(kda_backend='auto' then picks our kernels there), with these results"
                )
    summary = {
        "verdict": verdict,
        "parts": {
            p: {
                "status": d["status"],
                "time_utc": d.get("env", {}).get("time_utc"),
                "items": [
                    {
                        k: i.get(k)
                        for k in ("name", "status", "seconds", "summary", "reason")
                        if k in i
                    }
                    for i in d["items"]
                ],
            }
            for p, d in parts.items()
        },
    }
    write_atomic(folder / "gpu_check.json", json.dumps(jsonable(summary), indent=2) + "\n")
    lines = [
        "# GPU check: summary\n",
        f"Kernels validated on this GPU: **{'yes' if verdict['kernels_validated'] else 'no'}** "
        f"({verdict.get('reason')}).\n",
    ]
    if verdict.get("next_step"):
        lines.append(f"Next step: {verdict['next_step']}.\n")
    for p, d in summary["parts"].items():
        lines.append(f"## {p} ({d['status']}, {d['time_utc']}; details in gpu_check_{p}.md)\n")
        lines.append(
            _table(
                [
                    {
                        "item": i["name"],
                        "status": i["status"],
                        "s": i.get("seconds"),
                        "result": i.get("summary") or i.get("reason"),
                    }
                    for i in d["items"]
                ]
            )
        )
    write_atomic(folder / "gpu_check.md", "\n".join(lines))
    return summary
