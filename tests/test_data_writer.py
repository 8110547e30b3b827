"""Shard writing from real input layouts: counts, bad input, atomicity, reproducibility."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, jpeg_bytes, make_shard_set
from vlp.cli import main as cli
from vlp.data import WriterOptions, expand, iter_raw_samples, sources, write_shards
from vlp.data import writer as writer_module
from vlp.data.shards import check_complete


def read_samples(folder: Path) -> list[dict]:
    return [s for shard in expand(str(folder)) for s in iter_raw_samples(shard.url)]


@pytest.fixture
def caption_input(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"img{i}.jpg").write_bytes(jpeg_bytes(i))
    (images / "broken.jpg").write_bytes(jpeg_bytes(9)[:300])
    lines = ["image,caption",
             "img0.jpg,A dog, a ball, and a park.",
             "img0.jpg,second caption of img0",
             "img1.jpg,a cat",
             "img2.jpg,   ",
             "img2.jpg,a bird",
             "a line without any comma",
             "img3.jpg,a fish",
             "missing.jpg,an image that is not there",
             "broken.jpg,a truncated jpeg",
             "img4.jpg,a horse"]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_caption_file_keeps_commas_and_reports_bad_lines(caption_input, tmp_path):
    out = tmp_path / "shards"
    items = sources.caption_file(caption_input / "images", caption_input / "captions.txt", source="toy")
    manifest = write_shards(items, out, WriterOptions(samples_per_shard=3), source="toy", progress=False)
    samples = read_samples(out)
    texts = {s["__key__"]: s["txt"].decode() for s in samples}
    assert texts["img0_0"] == "A dog, a ball, and a park."  # everything after the FIRST comma
    assert manifest["samples"] == len(samples) == 6
    assert [s["samples"] for s in manifest["shards"]] == [3, 2, 1]  # images that fail are left out of their shard
    assert manifest["skipped"] == {"bad_image": 1, "empty_caption": 1, "missing_image": 1, "no_comma": 1}
    where = {e["reason"]: e["where"] for e in manifest["skipped_items"]}
    assert where["no_comma"].endswith("captions.txt:7") and where["empty_caption"].endswith("captions.txt:5")
    captions, images = caption_input / "captions.txt", caption_input / "images"
    assert where["missing_image"] == f"{captions}:9: {images / 'missing.jpg'}"  # the caption line, then the image
    assert where["bad_image"].startswith(f"{captions}:10: {images / 'broken.jpg'}: ")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no partial file is left behind"
    meta = json.loads(next(s for s in samples if s["__key__"] == "img0_1")["json"])
    assert re.fullmatch(r"[0-9a-f]{32}", meta["uid"])
    assert meta["captions"] == ["A dog, a ball, and a park.", "second caption of img0"]
    assert meta["kind"] == "caption" and meta["source"] == "toy" and meta["caption_index"] == 1
    stored = next(s for s in samples if s["__key__"] == "img1_0")["jpg"]
    assert stored == (caption_input / "images" / "img1.jpg").read_bytes(), "image bytes are kept as read"


def test_split_file_and_per_image_mode(caption_input, tmp_path):
    (tmp_path / "split.txt").write_text("img0.jpg\nimg3.jpg\n")
    items = list(sources.caption_file(caption_input / "images", caption_input / "captions.txt",
                                      tmp_path / "split.txt", per_caption=False))
    kept = [(i.key, i.text) for i in items if isinstance(i, sources.Item)]
    assert kept == [("img0", "A dog, a ball, and a park."), ("img3", "a fish")]


def test_shards_are_reproducible_and_parallel_writing_matches(caption_input, tmp_path):
    def write(name, workers):
        items = sources.caption_file(caption_input / "images", caption_input / "captions.txt")
        write_shards(items, tmp_path / name, WriterOptions(samples_per_shard=2, workers=workers), progress=False)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.tar"))}

    serial, parallel = write("a", 1), write("b", 2)
    assert len(serial) == 4 and serial == parallel


def test_existing_shard_set_is_not_overwritten(caption_input, tmp_path):
    out = tmp_path / "shards"
    items = lambda: sources.caption_file(caption_input / "images", caption_input / "captions.txt")  # noqa: E731
    write_shards(items(), out, progress=False)
    before = (out / "00000.tar").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(items(), out, progress=False)
    assert (out / "00000.tar").read_bytes() == before
    write_shards(items(), out, WriterOptions(overwrite=True), progress=False)


def test_the_same_command_finishes_a_set_whose_writer_stopped(caption_input, tmp_path):
    """A killed writer leaves finished shards, a .partial and no manifest: the same command writes the set again
    (it is deterministic) instead of refusing; a finished set is still never overwritten unasked."""
    items = lambda: sources.caption_file(caption_input / "images", caption_input / "captions.txt")  # noqa: E731
    options = WriterOptions(samples_per_shard=2)
    write_shards(items(), tmp_path / "clean", options, progress=False)
    out = tmp_path / "stopped"
    write_shards(items(), out, options, progress=False)
    (out / "manifest.json").unlink()
    (out / "00003.tar").unlink()
    (out / ".00003.tar.partial").write_bytes(b"half a shard")
    assert check_complete(out) is not None
    write_shards(items(), out, options, progress=False)
    assert check_complete(out) is None
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    for shard in sorted((tmp_path / "clean").glob("*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):  # finished now: protected again
        write_shards(items(), out, options, progress=False)


def test_a_crash_mid_shard_leaves_no_shard_under_its_final_name(caption_input, tmp_path, monkeypatch):
    real = writer_module._encode_image
    calls = {"n": 0}

    def dying(path, opts):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a kill in the middle of the second shard
        return real(path, opts)

    monkeypatch.setattr(writer_module, "_encode_image", dying)
    out = tmp_path / "shards"
    items = sources.caption_file(caption_input / "images", caption_input / "captions.txt")
    with pytest.raises(KeyboardInterrupt):
        write_shards(items, out, WriterOptions(samples_per_shard=3), progress=False)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["00000.tar"]
    assert not (out / "manifest.json").exists(), "a manifest only exists for a complete shard set"
    assert len(read_samples(out)) == 3


def test_labelled_and_identity_folders(tmp_path):
    for cls in ("cat", "airplane"):
        (tmp_path / "labels" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "labels" / cls / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    write_shards(sources.labelled_folder(tmp_path / "labels", "toy"), tmp_path / "s1", progress=False)
    samples = read_samples(tmp_path / "s1")
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["airplane_0"]["cls"] == b"0" and by_key["cat_1"]["cls"] == b"1"
    assert json.loads(by_key["cat_1"]["json"])["class_name"] == "cat" and by_key["cat_1"]["txt"] == b"cat"

    for person in ("0007", "0042"):
        (tmp_path / "people" / person).mkdir(parents=True)
        buf = io.BytesIO()
        Image.fromarray(np.zeros((128, 48, 3), np.uint8)).save(buf, "PNG")
        (tmp_path / "people" / person / "01_1.png").write_bytes(buf.getvalue())
    write_shards(sources.identity_folders(tmp_path / "people"), tmp_path / "s2", progress=False)
    metas = [json.loads(s["json"]) for s in read_samples(tmp_path / "s2")]
    assert [(m["identity"], m["person"]) for m in metas] == [(0, "0007"), (1, "0042")]
    assert all("txt" not in s and "png" in s for s in read_samples(tmp_path / "s2"))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_lists_put_extra_columns_into_json(tmp_path, fmt):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(1))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(2))
    rows = [{"image": "a.jpg", "caption": "first", "label": "3", "url": "http://x/a"},
            {"image": "b.jpg", "caption": "", "label": "4", "url": "http://x/b"},
            {"image": str(tmp_path / "b.jpg"), "caption": "absolute path", "label": "5", "url": ""}]
    if fmt == "csv":
        import csv

        with open(tmp_path / "list.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
    manifest = write_shards(sources.table(tmp_path / f"list.{fmt}"), tmp_path / "out", progress=False)
    metas = [json.loads(s["json"]) for s in read_samples(tmp_path / "out")]
    assert [(m["label"], m.get("url")) for m in metas] == [(3, "http://x/a"), (5, None)]
    assert manifest["skipped"] == {"empty_caption": 1}
    assert manifest["skipped_items"][0]["where"].endswith(("line 3", "row 2"))
    with pytest.raises(ValueError, match="no column 'text'"):
        list(sources.table(tmp_path / f"list.{fmt}", caption_column="text"))


def test_resize_shrinks_and_reencodes(tmp_path):
    (tmp_path / "c" / "x").mkdir(parents=True)
    Image.fromarray(np.full((100, 200, 3), 128, np.uint8)).save(tmp_path / "c" / "x" / "big.jpg", quality=95)
    write_shards(sources.labelled_folder(tmp_path / "c"), tmp_path / "out", WriterOptions(resize=50), progress=False)
    (sample,) = read_samples(tmp_path / "out")
    assert Image.open(io.BytesIO(sample["jpg"])).size == (100, 50)


def test_cli_writes_shards_and_reports_skips(caption_input, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(["shards", "captions", "--images", str(caption_input / "images"), "--captions",
                str(caption_input / "captions.txt"), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 6 samples in 1 shards" in printed and "no_comma 1" in printed and "captions.txt:7" in printed
    assert cli(["shards", "info", str(out)]) == 0
    assert "1 shards, 6 samples" in capsys.readouterr().out
    assert cli(["shards", "folder", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    with tarfile.open(out / "00000.tar") as tf:
        assert all(m.mtime == 0 for m in tf.getmembers())


def test_bytes_that_are_not_utf8_skip_their_line_only(caption_input, tmp_path, capsys):
    raw = (caption_input / "captions.txt").read_bytes().replace(b"a cat", b"caf\xe9 cat")  # latin-1, line 4
    (caption_input / "latin1.txt").write_bytes(b"\xef\xbb\xbf" + raw)  # and a byte-order mark, ignored
    out = tmp_path / "captions"
    assert cli(["shards", "captions", "--images", str(caption_input / "images"), "--captions",
                str(caption_input / "latin1.txt"), "--out", str(out), "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 5 and manifest["skipped"]["not_utf8"] == 1
    assert {"reason": "not_utf8", "where": f"{caption_input / 'latin1.txt'}:4: byte 0xe9 at column 13"} \
        in manifest["skipped_items"]
    assert "img1_0" not in {s["__key__"] for s in read_samples(out)}

    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(1))
    (tmp_path / "list.csv").write_bytes(b"image,caption,note\na.jpg,first,ok\na.jpg,second,\xff\na.jpg,third,ok\n")
    assert cli(["shards", "table", "--list", str(tmp_path / "list.csv"), "--out", str(tmp_path / "table"),
                "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "table" / "manifest.json").read_text())
    assert [s["txt"] for s in read_samples(tmp_path / "table")] == [b"first", b"third"]
    assert manifest["skipped_items"] == [
        {"reason": "not_utf8", "where": f"{tmp_path / 'list.csv'}:line 3: cell 3: byte 0xff at column 1"}]
    assert "not_utf8 1" in capsys.readouterr().out

    (tmp_path / "bad_header.csv").write_bytes(b"image,capti\xf3n\na.jpg,x\n")
    assert cli(["shards", "table", "--list", str(tmp_path / "bad_header.csv"), "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path / 'bad_header.csv'}:line 1: column 2 of the header is not UTF-8" in capsys.readouterr().err


def test_image_failures_name_the_input_row_and_no_memory_address(tmp_path):
    (tmp_path / "good.jpg").write_bytes(jpeg_bytes(1))
    (tmp_path / "text.jpg").write_bytes(b"this is not an image at all")
    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes(2)[:200])
    (tmp_path / "list.csv").write_text("image,caption\ngood.jpg,a\ntext.jpg,b\ncut.jpg,c\n")
    manifest = write_shards(sources.table(tmp_path / "list.csv"), tmp_path / "out", progress=False)
    assert manifest["samples"] == 1 and manifest["skipped"] == {"bad_image": 2}
    where = [e["where"] for e in manifest["skipped_items"]]
    assert where[0] == f"{tmp_path / 'list.csv'}:line 3: {tmp_path / 'text.jpg'}: not an image format PIL can read"
    assert where[1].startswith(f"{tmp_path / 'list.csv'}:line 4: {tmp_path / 'cut.jpg'}: ")
    assert not any(re.search(r"0x[0-9a-fA-F]{6,}", w) for w in where)
    image = Image.new("RGB", (4, 4))
    assert re.search(r"at 0x[0-9a-fA-F]+", repr(image))
    reason = writer_module._image_error(ValueError(f"cannot use {image!r}"))
    assert reason == "ValueError: cannot use <PIL.Image.Image image mode=RGB size=4x4>"


def test_csv_rows_with_more_cells_than_the_header_are_skipped(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(1))
    (tmp_path / "list.csv").write_text("image,caption,label\na.jpg,one,1\na.jpg,two,2,stray,cells\na.jpg,three,3\n")
    manifest = write_shards(sources.table(tmp_path / "list.csv"), tmp_path / "out", progress=False)
    metas = [json.loads(s["json"]) for s in read_samples(tmp_path / "out")]
    assert [m["label"] for m in metas] == [1, 3] and not any("null" in m or None in m for m in metas)
    assert manifest["skipped_items"] == [
        {"reason": "extra_cells", "where": f"{tmp_path / 'list.csv'}:line 3: 5 cells, the header has 3"}]


def test_info_says_when_a_shard_set_is_incomplete(caption_input, tmp_path, capsys):
    out = tmp_path / "shards"
    write_shards(sources.caption_file(caption_input / "images", caption_input / "captions.txt"), out,
                 WriterOptions(samples_per_shard=2), progress=False)
    assert check_complete(out) is None and check_complete(f"{out}/{{00000..00001}}.tar") is None
    (out / "00001.tar").rename(tmp_path / "elsewhere.tar")
    assert check_complete(out) == f"{out}: manifest.json lists shards that are absent (00001.tar)"

    (out / "manifest.json").unlink()  # as a writer killed mid-run leaves it: no manifest, a partial shard
    (out / ".00001.tar.partial").write_bytes(b"\0" * 512)
    reason = check_complete(out)
    assert ".00001.tar.partial" in reason and "no manifest.json" in reason
    assert cli(["shards", "info", str(out)]) == 0, "inspecting an incomplete set is not an error"
    printed = capsys.readouterr()
    assert "3 shards, 4 samples (INCOMPLETE set" in printed.out
    assert f"warning: incomplete shard set: {reason}" in printed.err

    make_shard_set(tmp_path / "other", [2], manifest=False)  # another tool's shards: no manifest to expect
    assert check_complete(tmp_path / "other") is None


def _children(pid: int) -> dict[int, str]:
    """Child pids of ``pid`` with their start times (so a reused pid is not mistaken for a survivor)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found[int(child)] = _start_time(int(child))
    return found


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    state, *rest = stat.rsplit(")", 1)[1].split()
    return None if state == "Z" else rest[18]  # field 22, starttime; a zombie has stopped for good


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from Linux's /proc")
def test_writer_processes_die_with_a_killed_writer(tmp_path):
    ramp = np.linspace(0, 255, 2000).astype(np.uint8)
    (tmp_path / "images").mkdir()
    Image.fromarray(np.dstack([*np.meshgrid(ramp, ramp), np.zeros((2000, 2000), np.uint8)])).save(
        tmp_path / "images" / "big.jpg", quality=80)  # decoding and resizing it takes ~50 ms a sample
    lines = "".join(f"big.jpg,caption {i}\n" for i in range(100))
    (tmp_path / "captions.txt").write_text("image,caption\n" + lines)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlp.cli", "shards", "captions", "--images", str(tmp_path / "images"),
         "--captions", str(tmp_path / "captions.txt"), "--out", str(out), "--workers", "2",
         "--samples-per-shard", "2", "--resize", "32"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "00000.tar").exists():
            assert proc.poll() is None and time.time() < deadline, "the writer ended before its first shard"
            time.sleep(0.02)
        children = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert len(children) == 2, f"expected the 2 pool processes, found {children}"
    time.sleep(0.2)  # a rename already inside the kernel when the kill landed may still complete
    at_kill = sorted(p.name for p in out.glob("*.tar"))
    deadline = time.time() + 5
    while any(_start_time(pid) == start for pid, start in children.items()) and time.time() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid, start in children.items() if _start_time(pid) == start]
    for pid in survivors:  # so a failure leaves no orphan behind
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"pool processes {survivors} outlived the killed writer"
    time.sleep(1.0)
    assert sorted(p.name for p in out.glob("*.tar")) == at_kill, "shards kept appearing after the kill"
    assert len(at_kill) < 50 and not (out / "manifest.json").exists()
