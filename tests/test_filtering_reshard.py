"""Resharding a pool by a uid file: kept samples copied byte for byte, in pool order, the same for any number of
workers; what is absent, unreadable, repeated or damaged in the pool reported; the writer's output guarantees."""
from __future__ import annotations

import io
import json
import mmap
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import jpeg_bytes, make_sample, write_tar
from test_data_stream import damage_tar
from vlp.data import expand, iter_raw_samples, write_shards
from vlp.data.shards import check_complete, iter_sample_headers
from vlp.data.sources import Item
from vlp.data.writer import WriterOptions
from vlp.filtering.reshard import ReshardError, _plain_samples, format_report, member_header, reshard
from vlp.filtering.uids import write_uids

SIZES = [7, 7, 7]


def uid(i: int) -> str:
    return f"{i * 7919:032x}"  # not in pool order once sorted by value, unlike a plain index


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """3 shards x 7 samples written by vlp's writer, sample i with uid(i)."""
    root = tmp_path_factory.mktemp("pool")
    (root / "images").mkdir()
    items = []
    for i in range(sum(SIZES)):
        image = root / "images" / f"{i}.jpg"
        image.write_bytes(jpeg_bytes(i, size=24))
        items.append(Item(f"s{i:03d}", str(image), f"caption {i}", {"uid": uid(i), "n": i}))
    write_shards(items, root / "shards", WriterOptions(samples_per_shard=SIZES[0]), source="toy", progress=False)
    return root / "shards"


def samples(folder: Path) -> list[dict]:
    return [s for shard in expand(str(folder)) for s in iter_raw_samples(shard.url)]


def in_datacomp_uid_file(path: Path, uid_hex: str) -> bool:
    """The lookup of DataComp's resharder, restated: np.load, two uint64 halves, binary search."""
    array = np.load(path)
    assert array.dtype == np.dtype("u8,u8")
    key = np.array([(int(uid_hex[:16], 16), int(uid_hex[16:32], 16))], dtype="u8,u8")
    i = int(np.searchsorted(array, key)[0])
    return i < len(array) and array[i] == key[0]


def test_kept_samples_are_copied_byte_for_byte_in_pool_order_whatever_the_workers(pool, tmp_path):
    kept = [i for i in range(sum(SIZES)) if i % 3 != 1]  # 14 of 21, from every shard
    uid_file = tmp_path / "uids.npy"
    write_uids(uid_file, [uid(i) for i in kept])
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        manifest = reshard(str(pool / "{00000..00002}.tar"), uid_file, out, samples_per_shard=4, workers=workers,
                           progress=False)
        outputs[workers] = out
        assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 2]
        assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar",
                                                         "manifest.json"]
    names = sorted(p.name for p in outputs[1].glob("*.tar"))
    assert all((outputs[1] / n).read_bytes() == (outputs[2] / n).read_bytes() for n in names), "workers changed bytes"

    pool_samples = {s["__key__"]: s for s in samples(pool)}
    written = samples(outputs[1])
    assert [s["__key__"] for s in written] == [f"s{i:03d}" for i in kept], "pool order, each kept sample once"
    for s in written:
        original = pool_samples[s["__key__"]]
        assert {k: v for k, v in s.items() if not k.startswith("__")} == \
               {k: v for k, v in original.items() if not k.startswith("__")}
    for s in written:
        assert in_datacomp_uid_file(uid_file, json.loads(s["json"])["uid"])
    left_out = [s for s in pool_samples.values() if s["__key__"] not in {w["__key__"] for w in written}]
    assert len(left_out) == 7 and not any(in_datacomp_uid_file(uid_file, json.loads(s["json"])["uid"])
                                          for s in left_out)

    manifest = json.loads((outputs[1] / "manifest.json").read_text())
    assert manifest["format"] == "vlp-shards/1" and manifest["samples"] == len(written) == 14
    assert manifest["bytes"] == sum((outputs[1] / n).stat().st_size for n in names)
    r = manifest["reshard"]
    assert (r["uids_requested"], r["samples_kept"], r["pool_samples"], r["absent"]["count"]) == (14, 14, 21, 0)
    assert check_complete(outputs[1]) is None
    assert sum(s.samples for s in expand(str(outputs[1]))) == 14
    with tarfile.open(outputs[1] / "00000.tar") as tf:
        assert {(m.mtime, m.uname, m.gname) for m in tf.getmembers()} == {(0, "vlp", "vlp")}
    assert "kept 14 of 21 pool samples" in format_report(manifest, outputs[1])


def test_keeping_everything_gives_back_the_bytes_of_vlps_writer(pool, tmp_path):
    write_uids(tmp_path / "all.npy", [uid(i) for i in range(sum(SIZES))])
    reshard(str(pool), tmp_path / "all.npy", tmp_path / "out", samples_per_shard=SIZES[0], progress=False)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "out" / name).read_bytes() == (pool / name).read_bytes(), name


def test_absent_unreadable_repeated_and_damaged_are_reported(tmp_path):
    """A foreign pool: a sample without json, one with a bad uid, one with bad json, a uid twice, an unknown member,
    and a shard cut inside its 7th sample."""
    root = tmp_path / "pool"
    root.mkdir()
    a = [make_sample(f"a{i}", i) for i in range(5)]
    del a[1]["json"]
    a[2]["json"] = json.dumps({"uid": "not-hex"}).encode()
    a[3]["json"] = b"{not json"
    a[4]["xyz"] = b"\x00\x01 an extension nobody knows"
    write_tar(root / "00000.tar", a)
    write_tar(root / "00001.tar", [make_sample(f"b{i}", 10 + i) for i in range(10)])
    damage_tar(root / "00001.tar", "cut", sample=6)  # b0..b5 readable
    write_tar(root / "00002.tar", [make_sample("c0", 4), make_sample("c1", 11)])  # uids of a4 and b1 again

    wanted = [f"{4:032x}", f"{11:032x}", f"{15:032x}", f"{16:032x}", "ab" * 16]  # 16: cut; "ab"*16: nowhere
    write_uids(tmp_path / "uids.npy", wanted)
    manifest = reshard(str(root), tmp_path / "uids.npy", tmp_path / "out", samples_per_shard=2, workers=2,
                       progress=False)
    assert [s["__key__"] for s in samples(tmp_path / "out")] == ["a4", "b1", "b5"], "first occurrence kept"
    a4 = samples(tmp_path / "out")[0]
    assert a4["xyz"] == a[4]["xyz"] and a4["jpg"] == a[4]["jpg"], "every member, any extension"
    r = manifest["reshard"]
    assert r["pool_samples"] == 5 + 6 + 2 and r["samples_kept"] == manifest["samples"] == 3
    assert r["absent"]["count"] == 2 and set(r["absent"]["examples"]) == {f"{16:032x}", "ab" * 16}
    assert r["no_uid"]["count"] == 3 and r["no_uid"]["reasons"] == {"bad_json": 1, "bad_uid": 1, "no_json": 1}
    assert any(e["where"].endswith("00000.tar: sample a1") for e in r["no_uid"]["examples"])
    assert (r["duplicates"]["count"], r["duplicates"]["uids"]) == (2, 2)
    assert manifest["skipped"] == {"truncated_tar": 1}
    assert "00001.tar after sample 5" in manifest["skipped_items"][0]["where"]
    report = format_report(manifest, tmp_path / "out")
    assert "not in the pool: 2" in report and "without a readable uid: 3" in report and "truncated_tar 1" in report


def test_a_uid_array_and_a_list_of_specs_are_accepted(pool, tmp_path):
    from vlp.filtering.uids import to_array

    spec = [str(pool / "00002.tar"), str(pool / "00000.tar")]  # the order given is the pool order
    manifest = reshard(spec, to_array([uid(i) for i in (0, 15, 20)]), tmp_path / "out", progress=False)
    assert [s["__key__"] for s in samples(tmp_path / "out")] == ["s015", "s020", "s000"]
    assert manifest["reshard"]["uid_file"] is None


def test_a_finished_output_is_kept_and_an_unfinished_one_is_finished(pool, tmp_path):
    write_uids(tmp_path / "uids.npy", [uid(i) for i in range(0, 21, 2)])
    out = tmp_path / "out"
    reshard(str(pool), tmp_path / "uids.npy", out, samples_per_shard=3, progress=False)
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    with pytest.raises(FileExistsError, match=str(out)):
        reshard(str(pool), tmp_path / "uids.npy", out, samples_per_shard=3, progress=False)

    # what a killed run leaves: some shards, one cut short under its partial name, no manifest
    (out / "manifest.json").unlink()
    (out / "00003.tar").unlink()
    (out / ".00003.tar.partial").write_bytes(first["00003.tar"][:700])
    assert check_complete(out) is not None
    reshard(str(pool), tmp_path / "uids.npy", out, samples_per_shard=3, progress=False)
    assert check_complete(out) is None
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first, "the same command, the same bytes"

    reshard(str(pool), tmp_path / "uids.npy", out, samples_per_shard=100, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]


def test_refuses_to_write_into_the_pool_or_to_merge_samples_of_one_key(pool, tmp_path):
    write_uids(tmp_path / "uids.npy", [uid(0)])
    with pytest.raises(ValueError, match="holds pool shards"):
        reshard(str(pool), tmp_path / "uids.npy", pool, overwrite=True, progress=False)
    assert check_complete(pool) is None

    other = tmp_path / "other"
    other.mkdir()
    write_tar(other / "00000.tar", [make_sample("s000", 99)])  # the key of the pool's first sample, another uid
    write_uids(tmp_path / "two.npy", [uid(0), f"{99:032x}"])
    with pytest.raises(ReshardError, match="s000"):
        reshard(f"{pool}::{other}", tmp_path / "two.npy", tmp_path / "out", progress=False)


@pytest.mark.parametrize("name", ["a.jpg", "k" * 95 + ".json", "k" * 96 + ".json", "dir/sub/x.txt", "é.txt"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 123_456_789])
def test_headers_are_the_ones_tarfile_writes_for_vlps_writer(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "vlp", "vlp"
    assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_direct_header_parsing_agrees_with_tarfile_and_hands_over_what_it_cannot_read(pool, tmp_path):
    """vlp's shards, foreign ones (tarfile's own headers), and pax headers (long and non-ASCII names), which the
    direct parser leaves to tarfile: the same samples, members and offsets either way, and the same copies."""
    foreign = tmp_path / "foreign.tar"
    write_tar(foreign, [make_sample(f"f{i}", 30 + i) for i in range(3)])
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tf:
        for key, seed in (("x" * 120, 40), ("é", 41)):
            for ext, data in make_sample(key, seed).items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    for path, direct in ((pool / "00001.tar", True), (foreign, True), (pax, False)):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            parsed = _plain_samples(mm)
        assert (parsed is not None) == direct, path
        by_tarfile = [(key, [(m.name, m.offset_data, m.size) for m in members])
                      for key, members in iter_sample_headers(str(path))]
        if direct:
            assert [(s[0], s[1]) for s in parsed] == by_tarfile
            assert all(s[4] for s in parsed) == (path.parent == pool), "only vlp's headers are copied as they are"
    write_uids(tmp_path / "uids.npy", [f"{i:032x}" for i in (30, 32, 40, 41)])
    reshard(f"{foreign}::{pax}", tmp_path / "uids.npy", tmp_path / "out", progress=False)
    written = samples(tmp_path / "out")
    assert [s["__key__"] for s in written] == ["f0", "f2", "x" * 120, "é"]
    originals = {s["__key__"]: s for url in (foreign, pax) for s in iter_raw_samples(str(url))}
    for s in written:
        assert {k: v for k, v in s.items() if not k.startswith("__")} == \
               {k: v for k, v in originals[s["__key__"]].items() if not k.startswith("__")}
