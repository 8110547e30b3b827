"""A foreign shard set with a damaged tar trains, from the CLI, on what is readable, and says what was damaged."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, make_shard_set
from test_data_stream import damage_tar


def test_vlp_train_runs_epochs_of_what_a_damaged_shard_set_holds_and_reports_the_damage(tmp_path):
    shards = tmp_path / "shards"
    make_shard_set(shards, [21, 19, 12], manifest=False)  # no manifest: counted from the tar headers
    damage_tar(shards / "00001.tar", "cut", sample=6)  # 21 + 6 + 12 = 39 readable samples
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({"name": "damaged", "model": {"name": "vlp-tiny-32"},
                                  "data": {"train": [{"shards": str(shards)}], "batch_size": 8, "workers": 2,
                                           "shuffle_buffer": 16},
                                  "train": {"epochs": 2, "log_every": 1}}))
    proc = subprocess.run([sys.executable, "-m", "vlp", "train", str(config), "--run-dir", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    damage = [line for line in proc.stderr.splitlines() if str(shards / "00001.tar") in line]
    assert len(damage) == 1 and "truncated_tar" in damage[0] and "6 readable samples" in damage[0], proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # 2 workers read 19 and 20 samples, in batches of 8, 8, 3 and 8, 8, 4: 6 steps an epoch
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["skipped"] == {"truncated_tar": 2}, "the damage counts once per epoch"
