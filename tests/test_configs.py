"""Every shipped config parses: class paths resolve and every key is an argument of its class
(LightningCLI's ``--print_config`` checks both without building anything)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kimi_linear.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_found() -> None:
    assert len(CONFIGS) >= 7, CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        rc = main(["fit", "--config", str(config), "--print_config"])
    except SystemExit as e:  # LightningCLI exits after printing
        rc = e.code or 0
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    printed = yaml.safe_load(out.out)
    assert printed["model"] and printed["data"] and printed["trainer"], printed.keys()
    loggers = printed["trainer"].get("logger") or []
    names = [lg["class_path"] for lg in (loggers if isinstance(loggers, list) else [loggers])]
    assert all(n == "kimi_linear.lightning.logs.RunLogger" for n in names), names
