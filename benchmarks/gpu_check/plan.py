"""The plan of a run: each part's items in order with their compile and run seconds (the budget
table of benchmarks/README.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.gpu_check import correctness, model, speed
from benchmarks.gpu_check.run import Item, Run
from benchmarks.gpu_check.sizes import DEFAULT_BUDGET_MIN, DEFAULT_PARTS, STARTUP_S, Cost


def part_items(run: Run, part: str) -> list[Item]:
    """The items of ``part`` in order (builders looked up at call time)."""
    builders = {
        "correctness": correctness.correctness_items,
        "speed": speed.speed_items,
        "model": model.model_items,
        "extra": model.extra_items,
    }
    return builders[part](run)


def plan(run: Run, parts: Sequence[str] = DEFAULT_PARTS) -> list[dict[str, Any]]:
    """The items ``parts`` run, in order, each with its estimated compile and run seconds (a
    kernel set's compile charged to its first item): the budget table of the README."""
    seen: set[str] = set()
    rows = []
    for part in parts:
        for item in part_items(run, part):
            c = run.sizes.costs.get(item.cost, Cost(30.0))
            new = [k for k in c.compiles if k not in seen]
            seen.update(new)
            rows.append(
                {
                    "part": part,
                    "item": item.name,
                    "cost": item.cost,
                    "compile_s": sum(run.sizes.compile_s.get(k, 0.0) for k in new),
                    "compiles": new,
                    "run_s": c.run_s,
                }
            )
    return rows


def budget_markdown(rows: Sequence[dict[str, Any]], budget_min: float = DEFAULT_BUDGET_MIN) -> str:
    """The budget table (Markdown) of :func:`plan` rows, with its total against ``budget_min``."""
    lines = ["| part | item | compile s | run s |", "|---|---|---|---|"]
    lines.append(f"| - | start-up: imports, CUDA context | 0 | {STARTUP_S:g} |")
    for r in rows:
        lines.append(f"| {r['part']} | {r['item']} | {r['compile_s']:g} | {r['run_s']:g} |")
    comp = sum(r["compile_s"] for r in rows)
    work = sum(r["run_s"] for r in rows) + STARTUP_S
    lines.append(f"| **total** | {len(rows)} items | {comp:g} | {work:g} |")
    lines.append("")
    lines.append(
        f"Planned: {comp + work:g} s of the {budget_min * 60:g} s default budget "
        f"({comp:g} s compiling from a cold Triton cache, {work:g} s of work)."
    )
    return "\n".join(lines) + "\n"
