"""Data-loader workers die with a trainer killed by ``kill -9``, those of the next epoch's lookahead included."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_shard_set

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads children from /proc")


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:  # the thread has ended
            pass
    return found


def start_time(pid: int) -> str | None:
    """The process's start time (so that a reused pid is not taken for it), or None once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]  # a zombie has exited; nobody may be left to reap it


def test_kill_9_of_the_trainer_leaves_no_loader_worker(tmp_path):
    # Captions of 8 kB make a batch of 8 larger than a pipe's 64 kB: the batches the killed trainer never read fill
    # the workers' result pipes, which is where a worker that only checks on its parent between batches gets stuck.
    # 48 samples are less than the lookahead window, so the next epoch's workers start with the first batch.
    make_shard_set(tmp_path / "shards", [24, 24], text="a photo " * 1000)
    config = tmp_path / "exp.json"
    config.write_text(json.dumps({"name": "orphans", "model": {"name": "vlp-tiny-32"},
                                  "data": {"train": [{"shards": str(tmp_path / "shards")}], "batch_size": 8,
                                           "workers": 2},
                                  "train": {"epochs": 1000, "log_every": 1}}))
    trainer = subprocess.Popen([sys.executable, "-m", "vlp", "train", str(config), "--run-dir", str(tmp_path / "run")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    workers: dict[int, str] = {}
    try:
        for line in trainer.stdout:
            if line.startswith("step 1/"):
                break
        deadline = time.time() + 10
        while len(workers) < 4 and time.time() < deadline:  # two of this epoch, two of the next
            workers.update({p: t for p in children(trainer.pid) if (t := start_time(p)) is not None})
            time.sleep(0.05)
        assert len(workers) == 4, f"expected this epoch's and the next epoch's 2 workers each, found {workers}"
        trainer.kill()
        trainer.wait()
        deadline = time.time() + 5
        while (alive := [p for p, t in workers.items() if start_time(p) == t]) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive, f"loader workers {alive} outlived their trainer"
    finally:
        trainer.kill()
        trainer.wait()
        for pid, started in workers.items():
            if start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)
