"""What the run records about its environment: Triton compiles and autotuning per kernel, fla's
backends and what its dispatch chose."""

from __future__ import annotations

import importlib
import sys
from typing import Any


class CompileLog:
    """Triton compiles of this process (ours and fla's), timed per kernel, through Triton's
    compilation and autotuning listeners (``triton.knobs``; absent in old Triton releases,
    where the log stays empty and says so)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.tunings: list[dict[str, Any]] = []
        self._previous: tuple[Any, Any] | None = None

    def install(self) -> None:
        knobs = getattr(importlib.import_module("triton"), "knobs", None)
        if knobs is None or not hasattr(getattr(knobs, "compilation", None), "listener"):
            return
        tuning = getattr(knobs, "autotuning", None)
        self._previous = (knobs.compilation.listener, getattr(tuning, "listener", None))

        def on_compile(*, src: Any, metadata: Any, times: Any, cache_hit: bool, **_: Any) -> None:
            fn = getattr(src, "fn", None)
            name = getattr(fn, "__name__", None) or str(getattr(src, "name", "?"))
            module = getattr(getattr(fn, "fn", fn), "__module__", "") or ""
            total_us = getattr(times, "ir_initialization", 0) + sum(
                t for _, t in getattr(times, "lowering_stages", [])
            )
            self.events.append(
                {
                    "kernel": name,
                    "owner": "fla"
                    if module.startswith("fla")
                    else "ours"
                    if "kimi_linear" in module or module.startswith("kernels")
                    else module.split(".")[0] or "?",
                    "seconds": total_us / 1e6,
                    "cache_hit": bool(cache_hit),
                }
            )

        def on_tune(
            *, fn: Any, key: Any, best_config: Any, duration: Any, cache_hit: bool, **_: Any
        ):
            self.tunings.append(
                {
                    "kernel": getattr(fn, "__name__", "?"),
                    "key": str(key),
                    "best": str(best_config),
                    "seconds": duration,
                    "cache_hit": bool(cache_hit),
                }
            )

        knobs.compilation.listener = on_compile
        if tuning is not None and hasattr(tuning, "listener"):
            tuning.listener = on_tune

    def uninstall(self) -> None:
        if self._previous is None:
            return
        knobs = importlib.import_module("triton").knobs
        knobs.compilation.listener = self._previous[0]
        if hasattr(knobs, "autotuning"):
            knobs.autotuning.listener = self._previous[1]
        self._previous = None

    def mark(self) -> tuple[int, int]:
        return len(self.events), len(self.tunings)

    def since(self, mark: tuple[int, int]) -> dict[str, Any]:
        """Compile seconds per kernel (binaries built, not cache hits) and autotuning since
        ``mark``."""
        if self._previous is None:
            return {"available": False, "reason": "this Triton has no compilation listener"}
        per: dict[str, dict[str, Any]] = {}
        for e in self.events[mark[0] :]:
            if e["cache_hit"]:
                continue
            row = per.setdefault(e["kernel"], {"owner": e["owner"], "binaries": 0, "seconds": 0.0})
            row["binaries"] += 1
            row["seconds"] = round(row["seconds"] + e["seconds"], 3)
        tuned = [t for t in self.tunings[mark[1] :] if not t["cache_hit"]]
        return {
            "available": True,
            "per_kernel": per,
            "seconds": {
                o: round(sum(r["seconds"] for r in per.values() if r["owner"] == o), 2)
                for o in sorted({r["owner"] for r in per.values()})
            },
            "autotuning": tuned,
        }


def fla_backends() -> dict[str, Any]:
    """fla's version and the KDA backends it could dispatch to here (availability, switch)."""
    out: dict[str, Any] = {}
    try:
        fla = importlib.import_module("fla")
        out["version"] = getattr(fla, "__version__", None)
        importlib.import_module("fla.ops.kda")
        backends = importlib.import_module("fla.backends")
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return out
    regs = list(getattr(backends, "_function_registries", {}).values())
    regs += list(getattr(backends, "_operation_registries", {}).values())
    avail = {}
    for reg in regs:
        for b in getattr(reg, "_backends", {}).values():
            try:
                avail[f"{reg.operation_name}:{b.backend_type}"] = {
                    "available": bool(b.is_available()),
                    "enabled": bool(b.is_enabled()),
                }
            except Exception as e:  # noqa: BLE001
                avail[f"{reg.operation_name}:{b.backend_type}"] = {"error": type(e).__name__}
    # the KDA op's own backends and those of the shared ops it calls
    out["registered"] = {k: v for k, v in avail.items() if "kda" in k or k.startswith("common:")}
    out["default"] = "Triton (fla's own kernels) unless a backend above is available and enabled"
    return out


def fla_dispatch() -> list[str]:
    """What fla's backend dispatch chose so far in this process (``"op.function -> backend"``;
    empty: every fla call ran fla's default Triton kernels), from its registries' log keys."""
    mod = sys.modules.get("fla.backends")
    if mod is None:
        return []
    regs = list(getattr(mod, "_function_registries", {}).values())
    regs += list(getattr(mod, "_operation_registries", {}).values())
    out = set()
    for reg in regs:
        for key in getattr(reg, "_logged", ()):
            parts = str(key).split(":")
            if len(parts) >= 3:
                out.add(
                    f"{parts[0]}.{parts[1]} -> {parts[2]}"
                    + (" (rejected)" if parts[-1] == "fail" else "")
                )
    return sorted(out)
