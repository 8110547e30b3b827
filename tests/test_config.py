"""Experiment configs: typed loading, errors that name the key, overrides, and every shipped config in smoke mode."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from vlp.cli import main as cli
from vlp.config import ConfigError, SourceConfig, experiment_from_dict, load_experiment, to_yaml
from vlp.train import checkpoint

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_types_defaults_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": [{"shards": "a/{0..3}.tar", "weight": 2}]},
                                    "optim": {"lr": 1}}))
    exp = load_experiment(path, ["optim.betas=[0.9, 0.95]", "train.max_steps=7", "model.name=vlp-tiny-64",
                                 "optim.eps=1e-8"])  # YAML 1.1 reads 1e-8 (no dot) as a string
    assert exp.name == "exp" and exp.optim.lr == 1.0 and isinstance(exp.optim.lr, float)
    assert exp.optim.eps == 1e-8
    assert exp.optim.betas == (0.9, 0.95) and exp.train.max_steps == 7 and exp.model.name == "vlp-tiny-64"
    assert exp.data.train[0].weight == 2.0 and exp.objectives[0].name == "clip"
    again = experiment_from_dict(yaml.safe_load(to_yaml(exp)))
    assert again == exp, "the resolved config saved in the run folder reproduces the experiment"


def test_a_field_of_two_types_takes_either():
    assert experiment_from_dict({"name": "x", "model": {"compile": True}}).model.compile is True
    assert experiment_from_dict({"name": "x"}, ["model.compile=visual"]).model.compile == "visual"


@pytest.mark.parametrize("data, overrides, message", [
    ({"optim": {"learning_rate": 1}}, [], r"exp.yaml: optim.learning_rate: unknown key"),
    ({"train": {"epochs": "three"}}, [], r"train.epochs: expected int, got 'three'"),
    ({"optim": {"lr": "1e-3x"}}, [], r"optim.lr: expected float, got '1e-3x'"),
    ({"data": {"train": [{"weight": 1}]}}, [], r"data.train\[0\].shards: required key is missing"),
    ({"optim": {"betas": [0.9]}}, [], r"optim.betas: expected 2 values"),
    ({"model": {"compile": 3}}, [], r"model.compile: expected str, got 3"),
    ({}, ["train.epocs=3"], r"train.epocs: unknown key"),
    ({}, ["nonsense"], r"expected key=value"),
    ({}, ["train.precision=bf16", "--smoke"], r"no 'smoke' section"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, data, overrides, message):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    smoke = "--smoke" in overrides
    with pytest.raises(ConfigError, match=message):
        load_experiment(path, [o for o in overrides if o != "--smoke"], smoke=smoke)


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  momentum: 0.9\n")
    assert cli(["train", str(path)]) == 2
    assert "optim.momentum: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_runs_in_smoke_mode(config, tmp_path):
    """Each config in configs/ loads, and its smoke variant trains a few steps from the CLI and checkpoints."""
    text = config.read_text()
    assert text.startswith("#") and "vlp train" in text.split("\n\n")[0], "the launch command heads the file"
    load_experiment(config)  # the full experiment is valid too
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "vlp", "train", str(config), "--smoke", "--run-dir", str(run)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**__import__("os").environ, "VLP_CACHE": str(Path(tmp_path).parent / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])["final"]
    smoke = load_experiment(config, smoke=True)
    steps = smoke.train.max_steps
    assert steps and steps <= 10, "the smoke section bounds the run to a few steps"
    logged = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == [s for s in range(1, steps + 1)
                                           if s % smoke.train.log_every == 0 or s == steps]
    assert final["loss"] == logged[-1]["loss"], "the CLI's last line reports the last step"
    if [o.name for o in smoke.objectives] == ["clip"]:
        # a few steps from random weights leave InfoNCE near chance, ln(batch): far off means a broken loss
        assert all(abs(r["loss"] - math.log(smoke.data.batch_size)) < 1.0 for r in logged), logged
    assert checkpoint.latest(run) == run / "checkpoints" / f"step-{steps:07d}"
    if smoke.filtering.pool is not None:  # the run trains on the pool's kept samples, and its config says so
        kept = [SourceConfig(shards=str(run / "filtering" / "kept"))]
        smoke = dataclasses.replace(smoke, data=dataclasses.replace(smoke.data, train=kept))
    assert load_experiment(run / "config.yaml") == smoke, "the run folder holds the resolved experiment"
