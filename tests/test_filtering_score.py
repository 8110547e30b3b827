"""``vlp score``: a row for every pool sample, scores equal to open_clip's own computation, bad samples with reasons,
restarts without duplicates, split over ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, jpeg_bytes, make_sample, make_shard_set, write_tar
from vlp.eval.models import load_model
from vlp.filtering import score
from vlp.filtering.table import read_manifest, tables

MODEL = "vlp-tiny-32"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(MODEL)


def rows(folder: Path) -> list[dict]:
    return [r for path in tables(folder) for r in pq.read_table(path).to_pylist()]


def run(model, pool, out, **kw) -> dict:
    opts = score.ScoreOptions(batch_size=kw.pop("batch_size", 4), workers=kw.pop("workers", 0), progress=False, **kw)
    score.score_pool(model, pool, out, opts, rank=0, world_size=1)
    return score.finish(pool, out, model.describe, opts)


def test_scores_equal_open_clip_and_every_sample_has_a_row(model, tmp_path):
    import open_clip
    from PIL import Image
    import io

    uids = make_shard_set(tmp_path / "pool", [5, 3])
    manifest = run(model, str(tmp_path / "pool"), tmp_path / "scores", fast_decode=False, embeddings=True)
    got = rows(tmp_path / "scores")
    assert [r["uid"] for r in got] == uids and manifest["rows"] == manifest["scored"] == 8
    assert [r["index"] for r in got] == [0, 1, 2, 3, 4, 0, 1, 2]
    # the reference: open_clip's preprocess and towers, padded text, one sample at a time
    clip = model.model.clip
    _, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    tokenizer = open_clip.get_tokenizer(MODEL)
    for r in got:
        sample = make_sample(r["key"], int(r["uid"], 16))
        image = preprocess(Image.open(io.BytesIO(sample["jpg"]))).unsqueeze(0)
        with torch.no_grad():
            i = clip.encode_image(image, normalize=True)
            t = clip.encode_text(tokenizer([sample["txt"].decode()]), normalize=True)
        assert r["score"] == pytest.approx(float((i * t).sum()), abs=1e-4)
        assert (r["width"], r["height"], r["caption_words"], r["caption_chars"]) == (48, 48, 2, 15)
    emb = np.load(tmp_path / "scores" / "00000.image.npy")
    assert emb.shape == (5, 64 if clip.visual.output_dim == 64 else clip.visual.output_dim) and emb.dtype == np.float16
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)


def test_bad_samples_get_rows_with_reasons(model, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    good = make_sample("a", 1)
    broken = {**make_sample("b", 2), "jpg": jpeg_bytes(2)[:200]}
    no_text = {k: v for k, v in make_sample("c", 3).items() if k != "txt"}
    no_uid = {**make_sample("d", 4), "json": b"{}"}
    bad_json = {**make_sample("e", 5), "json": b"{not json"}
    no_image = {k: v for k, v in make_sample("f", 6).items() if k != "jpg"}
    write_tar(pool / "00000.tar", [good, broken, no_text, no_uid, bad_json, no_image])
    manifest = run(model, str(pool / "00000.tar"), tmp_path / "scores", embeddings=True)
    got = {r["key"]: r for r in rows(tmp_path / "scores")}
    assert len(got) == 6 and got["a"]["score"] is not None and got["a"]["error"] is None
    assert got["b"]["error"].startswith("bad_image") and got["b"]["score"] is None
    assert got["c"]["error"] == "no_caption" and got["c"]["caption_words"] is None
    assert got["d"]["error"] == "no_uid"
    assert got["e"]["error"] == "bad_json"
    assert got["f"]["error"] == "no_image" and got["f"]["width"] is None
    assert manifest["failed"] == {"bad_image": 1, "bad_json": 1, "no_caption": 1, "no_image": 1, "no_uid": 1}
    emb = np.load(tmp_path / "scores" / "00000.image.npy").astype(np.float32)
    assert np.isfinite(emb[0]).all() and np.isnan(emb[1:]).all()


def test_a_damaged_shard_keeps_its_readable_rows_and_says_so(model, tmp_path):
    make_shard_set(tmp_path / "pool", [6])
    path = tmp_path / "pool" / "00000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    manifest = run(model, str(path), tmp_path / "scores")
    kept = rows(tmp_path / "scores")
    assert 0 < len(kept) < 6 and all(r["score"] is not None for r in kept)
    assert manifest["failed"] == {"truncated_tar": 1} and manifest["shards"][0]["damage"]


KILLED_MID_SHARD = """
import os, sys, torch
from vlp.eval.models import load_model
from vlp.filtering import score
write = score._write_shard
calls = []
def dying(*args, **kw):  # dies while scoring the second shard (after its first chunks), as a kill -9 would
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)
    return write(*args, **kw)
score._write_shard = dying
torch.manual_seed(0)
score.score_pool(load_model("vlp-tiny-32"), sys.argv[1], sys.argv[2],
                 score.ScoreOptions(batch_size=2, workers=0, progress=False), 0, 1)
"""


def test_restart_after_a_kill_scores_each_sample_once(model, tmp_path):
    uids = make_shard_set(tmp_path / "pool", [5, 5, 5])
    pool, out = str(tmp_path / "pool"), tmp_path / "scores"
    child = subprocess.run([sys.executable, "-c", KILLED_MID_SHARD, pool, str(out)], cwd=REPO, timeout=120,
                           capture_output=True, text=True)
    assert child.returncode == 9, child.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet"]
    assert not list(out.glob("*.partial")) or all(p.name.startswith(".") for p in out.glob("*.partial"))
    with pytest.raises(RuntimeError, match="2 pool shards have no table"):
        score.finish(pool, out, {}, score.ScoreOptions())
    first = (out / "00000.parquet").stat().st_mtime_ns
    manifest = run(model, pool, out, batch_size=2)
    got = [r["uid"] for r in rows(out)]
    assert got == uids and len(set(got)) == 15 and manifest["rows"] == 15
    assert (out / "00000.parquet").stat().st_mtime_ns == first  # finished shards are not scored again


def test_ranks_split_whole_shards(model, tmp_path):
    uids = make_shard_set(tmp_path / "pool", [3, 2, 4, 1, 2])
    pool, out = str(tmp_path / "pool"), tmp_path / "scores"
    opts = score.ScoreOptions(batch_size=8, workers=0, progress=False)
    done = [score.score_pool(model, pool, out, opts, rank=r, world_size=2) for r in (1, 0)]
    assert [d["shards"] for d in done] == [2, 3] and [d["rows"] for d in done] == [3, 9]
    manifest = score.finish(pool, out, model.describe, opts)
    assert [r["uid"] for r in rows(out)] == uids and read_manifest(out)["rows"] == manifest["rows"] == 12


def test_shards_with_one_name_are_refused(model, tmp_path):
    make_shard_set(tmp_path / "a", [1])
    make_shard_set(tmp_path / "b", [1])
    with pytest.raises(ValueError, match="would share the table 00000.parquet"):
        run(model, f"{tmp_path / 'a'}::{tmp_path / 'b'}", tmp_path / "scores")


@pytest.mark.slow
def test_torchrun_two_processes_and_loader_workers(tmp_path):
    uids = make_shard_set(tmp_path / "pool", [4, 4, 4])
    out = tmp_path / "scores"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29561",
           "-m", "vlp", "score", "--model", MODEL, "--pool", str(tmp_path / "pool"), "--out", str(out),
           "--workers", "1", "--device", "cpu", "--batch-size", "3"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == manifest["scored"] == 12
    assert [r["uid"] for r in rows(out)] == uids
