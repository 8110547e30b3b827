"""The dataset recipes in datasets/ on the real data in ../shared/data: exact counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter


from conftest import REPO, require_shared_data
from vlp.data import Loader, ShardStream, StreamOptions, expand, iter_raw_samples
from vlp.data.preprocess import ImageOptions


def run_recipe(name: str, out, splits: str) -> None:
    data = require_shared_data()
    env = {**os.environ, "PYTHON": sys.executable, "SPLITS": splits}
    subprocess.run(["bash", str(REPO / "datasets" / f"{name}.sh"), str(out), str(data)], check=True, env=env,
                   capture_output=True)


def metas(folder) -> list[dict]:
    return [json.loads(s["json"]) for shard in expand(str(folder)) for s in iter_raw_samples(shard.url)]


def test_flickr8k_train_split(tmp_path):
    require_shared_data("flickr8k")
    run_recipe("flickr8k", tmp_path, "train")
    manifest = json.loads((tmp_path / "flickr8k" / "train" / "manifest.json").read_text())
    assert manifest["samples"] == 30_000 and manifest["skipped"] == {}
    images = Counter(m["image"] for m in metas(tmp_path / "flickr8k" / "train"))
    assert len(images) == 6_000 and set(images.values()) == {5}


def test_cifar10_test_split(tmp_path):
    require_shared_data("cifar10")
    run_recipe("cifar10", tmp_path, "test")
    shards = str(tmp_path / "cifar10" / "test")
    assert sum(s.samples for s in expand(shards)) == 10_000
    per_class = Counter()
    stream = ShardStream(shards, StreamOptions(batch_size=500, shuffle_buffer=0, image=ImageOptions(size=32)))
    loader = Loader(stream, workers=2)
    for batch in loader:
        per_class.update(batch["label"].tolist())
    assert per_class == {label: 1_000 for label in range(10)} and not loader.skipped


def test_pedestrian_identities(tmp_path):
    require_shared_data("pedestrians")
    run_recipe("pedestrians", tmp_path, "")
    train = metas(tmp_path / "pedestrians" / "train")
    assert len(train) == 992 and len({m["identity"] for m in train}) == 62
    assert len(metas(tmp_path / "pedestrians" / "query")) == 28
    assert len(metas(tmp_path / "pedestrians" / "gallery")) == 181
