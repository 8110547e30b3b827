"""The README's main job: `vlp demo` (quick variant here; the full run is measured in benchmarks/RESULTS.md), and
the builtin digits set it runs on, which any shard spec can name as ``builtin:digits``."""
from __future__ import annotations

import json

import pytest

from vlp.data import ShardSpecError, expand
from vlp.data.builtin import UnknownBuiltin, builtin_data
from vlp.demo import run_demo


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One builtin cache for the module: building the digits set is the slow part of the demo."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLP_CACHE", str(root))
        yield root


def test_demo_trains_evaluates_and_plots(cache, tmp_path):
    assert run_demo(tmp_path / "demo", quick=True) == 0
    (result,) = (tmp_path / "demo" / "eval").glob("step-*/digits__zeroshot_classification.json")
    metrics = json.loads(result.read_text())["metrics"]
    assert metrics["images"] == 1797 - 1433  # every held-out digit
    correct = metrics["acc1"] * metrics["images"]  # a count of images, as a fraction
    assert abs(correct - round(correct)) < 1e-6
    logged = [json.loads(line) for line in (tmp_path / "demo" / "log.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in logged if "eval" in r]  # the figure the run printed is the one in the result file
    assert evals and evals[-1]["digits/zeroshot_classification/acc1"] == metrics["acc1"]
    assert (tmp_path / "demo" / "plots" / "loss.png").stat().st_size > 1000
    manifest = json.loads((cache / "builtin" / "digits" / "shards" / "manifest.json").read_text())
    assert manifest["samples"] == 1433 and manifest["skipped"] == {}


def test_builtin_shard_spec(cache):
    shards = expand("builtin:digits")
    assert [s.url for s in shards] == sorted(str(p) for p in (cache / "builtin/digits/shards").glob("*.tar"))
    assert len(shards) == 6 and sum(s.samples for s in shards) == 1433  # counts from the manifest
    # a builtin set joins other specs like any folder
    assert expand(f"builtin:digits::{cache / 'builtin/digits/shards'}") == shards + shards


def test_unknown_builtin_names_the_known_ones(cache):
    with pytest.raises(ShardSpecError, match=r"'builtin:digitz'.*unknown builtin dataset 'digitz'.*builtin:digits"):
        expand("builtin:digitz")
    with pytest.raises(UnknownBuiltin, match="known: builtin:digits"):
        builtin_data("mnist")
    assert not (cache / "builtin" / "mnist").exists()
