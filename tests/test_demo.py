"""The README's main job: `vlp demo` (quick variant here; the full run is measured in benchmarks/RESULTS.md)."""
from __future__ import annotations

import json

from vlp.demo import run_demo


def test_demo_trains_evaluates_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "cache"))
    assert run_demo(tmp_path / "demo", quick=True) == 0
    (result,) = (tmp_path / "demo" / "eval").glob("step-*/digits__zeroshot_classification.json")
    metrics = json.loads(result.read_text())["metrics"]
    assert 0.0 <= metrics["acc1"] <= 1.0 and metrics["acc5"] >= metrics["acc1"]
    assert (tmp_path / "demo" / "plots" / "loss.png").stat().st_size > 1000
    manifest = json.loads((tmp_path / "cache" / "builtin" / "digits" / "shards" / "manifest.json").read_text())
    assert manifest["samples"] == 1433 and manifest["skipped"] == {}
