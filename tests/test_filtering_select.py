"""Selection by rules over a scores folder: the top-fraction cut against a full sort, thresholds, AND composition,
evaluation-set duplicates, the uid file read back the way DataComp's resharder reads it, and the report files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import jpeg_bytes
from vlp.filtering import quantile, select
from vlp.filtering.select import filter_scores, format_report, parse_rule
from vlp.filtering.table import FORMAT, SCHEMA

# ---------------------------------------------------------------------------------------------------------------
# scores folders written by hand, following vlp/filtering/table.py


def random_uids(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in rng.integers(0, 2**63, (n, 2), dtype=np.uint64)]


def shard_columns(rng: np.random.Generator, n: int, shard: str = "pool/00000.tar", **given) -> dict:
    """One table's columns: random plausible values, overridden by ``given``."""
    cols = {"uid": random_uids(rng, n), "key": [f"{i:09d}" for i in range(n)], "shard": [shard] * n,
            "index": list(range(n)), "score": rng.uniform(-0.1, 0.45, n).astype(np.float32).tolist(),
            "caption_chars": rng.integers(0, 60, n).tolist(), "caption_words": rng.integers(0, 10, n).tolist(),
            "width": rng.integers(50, 600, n).tolist(), "height": rng.integers(50, 600, n).tolist(),
            "error": [None] * n}
    cols.update(given)
    return cols


def write_scores(folder: Path, shards: list[dict], eval_sets: dict[str, np.ndarray] | None = None,
                 embeddings: list[np.ndarray | None] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, cols in enumerate(shards):
        stem = f"{i:05d}"
        table = pa.table({name: pa.array(cols[name], type=SCHEMA.field(name).type) for name in SCHEMA.names},
                         schema=SCHEMA)
        pq.write_table(table, folder / f"{stem}.parquet", row_group_size=700)
        image = None
        if embeddings is not None and embeddings[i] is not None:
            image = f"{stem}.image.npy"
            np.save(folder / image, embeddings[i].astype(np.float16))
        failed = {}
        for e in cols["error"]:
            if e is not None:
                failed[e] = failed.get(e, 0) + 1
        entries.append({"url": cols["shard"][0] if cols["shard"] else "", "table": f"{stem}.parquet",
                        "rows": table.num_rows, "scored": sum(s is not None for s in cols["score"]),
                        "failed": failed, "image_embeddings": image})
    sets = {}
    for name, emb in (eval_sets or {}).items():
        (folder / "eval").mkdir(exist_ok=True)
        np.save(folder / "eval" / f"{name}.npy", emb.astype(np.float16))
        sets[name] = {"file": f"eval/{name}.npy", "images": len(emb)}
    manifest = {"format": FORMAT, "pool": "pool/{00000..00002}.tar", "model": {"name": "hand-made"},
                "shards": entries, "eval_sets": sets}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def datacomp_lookup(path: Path, uids: list[str]) -> np.ndarray:
    """Whether each uid is in a uid file, written the way DataComp's resharder looks uids up."""
    array = np.load(path)
    query = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    where = np.searchsorted(array, query)
    return (where < len(array)) & (array[np.minimum(where, len(array) - 1)] == query)


def kept_set(path: Path) -> set[str]:
    array = np.load(path)
    assert array.dtype == np.dtype("u8,u8")
    hi, lo = array["f0"], array["f1"]
    assert np.all((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1])))  # sorted, distinct: searchable
    return {f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(array["f0"], array["f1"])}


def flat(shards: list[dict], name: str) -> list:
    return [v for cols in shards for v in cols[name]]


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    # tables of a few thousand rows then span several batches and several row groups, as real tables do
    monkeypatch.setattr(select, "BATCH_ROWS", 512)


def run(tmp_path: Path, shards: list[dict], rules: list[str], **kw) -> tuple[dict, Path]:
    scores = write_scores(tmp_path / "scores", shards, **{k: kw.pop(k) for k in ("eval_sets", "embeddings")
                                                          if k in kw})
    out = tmp_path / "selection"
    return filter_scores(scores, rules, out, samples=kw.pop("samples", 0), progress=False, **kw), out


# ---------------------------------------------------------------------------------------------------------------
# the top-fraction cut


def exact_top(scores: list, fraction: float) -> float:
    """DataComp's get_threshold on the scored rows: sort descending, take position int(f * n)."""
    values = np.array([s for s in scores if s is not None and np.isfinite(s)], dtype=np.float32)
    position = min(int(len(values) * fraction), len(values) - 1)
    return float(-np.sort(-values)[position])


def test_radix_selection_equals_a_full_sort_at_every_rank():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.2, 0.1, 20_000), rng.choice([-0.0, 0.0, 1.0, -1.0, 0.25], 3000),
                             [np.float32(1e-42), -np.float32(1e-42), 3e38, -3e38, 7.5]]).astype(np.float32)
    rng.shuffle(values)
    batches = np.array_split(values, 13)
    high = quantile.count_high(batches)
    ranks = sorted(set(rng.integers(0, len(values), 300).tolist()) | {0, len(values) - 1})
    expected = np.sort(values)[ranks]
    got = np.array(quantile.values_at(batches, high, ranks), dtype=np.float32)
    assert np.array_equal(got, expected)
    for key_value in (-0.0, 0.0):  # the two zeros are one value
        assert quantile.sort_keys(np.array([key_value], np.float32))[0] == quantile.sort_keys(np.zeros(1))[0]


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.5, 0.9999, 1.0])
def test_top_fraction_equals_exact_sort_on_random_scores_across_files(tmp_path, fraction):
    rng = np.random.default_rng(7)
    shards = [shard_columns(rng, n, shard=f"pool/{i:05d}.tar") for i, n in enumerate([1500, 1, 2200])]
    for cols in shards:  # some rows without a score: they are outside the fraction's count and never kept
        for j in rng.choice(len(cols["score"]), len(cols["score"]) // 20, replace=False):
            cols["score"][j], cols["error"][j] = None, "decode_error"
    report, out = run(tmp_path, shards, [f"score_top={fraction}"])
    cut = exact_top(flat(shards, "score"), fraction)
    expected = {u for u, s in zip(flat(shards, "uid"), flat(shards, "score")) if s is not None and s >= cut}
    assert report["per_rule"][0]["cut"] == cut
    assert kept_set(out / "uids.npy") == expected
    assert report["kept"] == len(expected)
    scored = report["scored_rows"]
    assert scored == sum(s is not None for s in flat(shards, "score"))
    assert len(expected) >= min(int(scored * fraction) + 1, scored)


def test_top_fraction_keeps_every_row_tied_at_the_cut(tmp_path):
    # 1000 rows on 11 distinct scores, so the cut falls inside a run of equal scores
    rng = np.random.default_rng(3)
    levels = np.round(np.linspace(0.1, 0.35, 11), 2).astype(np.float32)
    shards = [shard_columns(rng, 400, score=rng.choice(levels, 400).tolist()),
              shard_columns(rng, 600, score=rng.choice(levels, 600).tolist())]
    report, out = run(tmp_path, shards, ["score_top=0.3"])
    scores = np.array(flat(shards, "score"), dtype=np.float32)
    cut = exact_top(scores.tolist(), 0.3)
    assert report["per_rule"][0]["cut"] == cut
    assert report["per_rule"][0]["position"] == 300
    assert report["kept"] == int((scores >= cut).sum()) > 301  # every tie passes: more than the 301 asked for
    assert kept_set(out / "uids.npy") == {u for u, s in zip(flat(shards, "uid"), scores) if s >= cut}


def test_all_scores_equal_keeps_everything_scored(tmp_path):
    rng = np.random.default_rng(4)
    shards = [shard_columns(rng, 50, score=[0.25] * 49 + [None], error=[None] * 49 + ["no_caption"])]
    report, _ = run(tmp_path, shards, ["score_top=0.1"])
    assert report["kept"] == 49 and report["not_scored"] == {"no_caption": 1}


# ---------------------------------------------------------------------------------------------------------------
# thresholds and composition


def test_thresholds_and_their_and_composition_in_order(tmp_path):
    rng = np.random.default_rng(11)
    shards = [shard_columns(rng, 900), shard_columns(rng, 700)]
    shards[0]["caption_words"][:5] = [None] * 5  # no caption: fails caption rules
    shards[1]["width"][:3] = [0, None, 10]
    rules = ["score>=0.28", "caption_words>=2", "caption_chars>5", "min_side>=200", "aspect<=3", "width<590",
             "height>=60"]
    report, out = run(tmp_path, shards, rules)

    def col(name):
        return np.array([np.nan if v is None else v for v in flat(shards, name)], dtype=np.float64)

    w, h = col("width"), col("height")
    with np.errstate(divide="ignore", invalid="ignore"):
        tests = [col("score") >= 0.28, col("caption_words") >= 2, col("caption_chars") > 5,
                 np.minimum(w, h) >= 200, np.maximum(w, h) / np.minimum(w, h) <= 3, w < 590, h >= 60]
    alive = np.ones(len(w), dtype=bool)
    for entry, test in zip(report["per_rule"], tests):
        assert entry["alone_keeps"] == int(test.sum())
        assert entry["dropped_in_sequence"] == int((alive & ~test).sum())
        alive &= test
    assert report["kept"] == int(alive.sum()) > 0
    uids = flat(shards, "uid")
    assert kept_set(out / "uids.npy") == {u for u, a in zip(uids, alive) if a}
    assert report["rules"] == rules


def test_score_threshold_compares_the_stored_float32_exactly(tmp_path):
    rng = np.random.default_rng(2)
    below = float(np.nextafter(np.float32(0.3), np.float32(0)))
    shards = [shard_columns(rng, 4, score=[float(np.float32(0.3)), below, 0.5, -0.5])]
    report, _ = run(tmp_path, shards, ["score>=0.3"])
    assert report["kept"] == int(np.float32(0.3) >= 0.3) + 1  # float32(0.3) is 0.30000001: it passes


def test_uid_file_holds_exactly_the_kept_uids_read_datacomps_way(tmp_path):
    rng = np.random.default_rng(5)
    shards = [shard_columns(rng, 800), shard_columns(rng, 300)]
    shards[1]["uid"][:4] = [u.upper() for u in shards[1]["uid"][:4]]  # hex digits of either case are one uid
    report, out = run(tmp_path, shards, ["score_top=0.4", "caption_words>=2"])
    scores, words = np.array(flat(shards, "score")), np.array(flat(shards, "caption_words"))
    kept = (scores >= exact_top(scores.tolist(), 0.4)) & (words >= 2)
    found = datacomp_lookup(out / "uids.npy", flat(shards, "uid"))
    assert np.array_equal(found, kept)
    assert report["uids_written"] == report["kept"] == int(kept.sum())


def test_rows_without_a_score_are_never_kept_and_counted_per_reason(tmp_path):
    rng = np.random.default_rng(6)
    n = 40
    score = [0.9] * n
    error = [None] * n
    for j, reason in enumerate(["decode_error"] * 3 + ["no_caption"] * 2):
        score[j], error[j] = None, reason
    score[10] = None  # null score and no error
    score[11] = float("nan")
    error[12] = "decode_error"  # a score, but an error: not a scored row either
    shards = [shard_columns(rng, n, score=score, error=error, caption_words=[5] * n)]
    report, out = run(tmp_path, shards, ["score>=-1", "caption_words>=0"])
    assert report["not_scored"] == {"decode_error": 4, "no_caption": 2, "no_score": 1, "nan_score": 1}
    assert report["scored_rows"] == report["kept"] == n - 8
    unscored = [0, 1, 2, 3, 4, 10, 11, 12]
    found = datacomp_lookup(out / "uids.npy", shards[0]["uid"])
    assert not found[unscored].any() and found.sum() == n - len(unscored)


# ---------------------------------------------------------------------------------------------------------------
# evaluation-set duplicates


def test_eval_dup_removes_exactly_the_images_at_or_above_the_cosine(tmp_path):
    dim = 8
    basis = np.eye(dim, dtype=np.float32)
    eval_sets = {"cifar10": basis[[0, 1]], "imagenet": basis[[2]]}
    # pool image j: cos(angle) with one evaluation image, the rest orthogonal to every evaluation image
    cosines = np.array([0.99, 0.951, 0.94, 0.5, 0.999, 0.2, 0.97, 0.0, 0.96, 0.93])
    partner = [0, 1, 1, 2, 2, 0, 2, 1, 0, 2]
    pool = np.zeros((len(cosines), dim), dtype=np.float32)
    pool[np.arange(len(cosines)), partner] = cosines
    pool[:, 7] = np.sqrt(1 - cosines ** 2)
    # the stored float16 values decide; check the chosen cosines stay on their side of 0.95 after rounding
    stored = pool.astype(np.float16).astype(np.float32)
    best = {name: (stored @ emb.astype(np.float16).astype(np.float32).T).max(axis=1) for name, emb in eval_sets.items()}
    rng = np.random.default_rng(8)
    n = len(cosines)
    shards = [shard_columns(rng, 6, score=[0.3] * 6), shard_columns(rng, 4, score=[0.3, 0.3, 0.1, None],
                                                                    error=[None] * 3 + ["decode_error"])]
    pool[9] = np.nan  # the unscored row's embedding
    embeddings = [pool[:6], pool[6:]]
    report, out = run(tmp_path, shards, ["score>=0.2", "eval_dup<0.95"], eval_sets=eval_sets, embeddings=embeddings)

    scored = np.array([True] * 9 + [False])
    dup = {name: scored & (b >= 0.95) for name, b in best.items()}
    assert dup["cifar10"].tolist() == [True, True, False, False, False, False, False, False, True, False]
    assert dup["imagenet"].tolist() == [False, False, False, False, True, False, True, False, False, False]
    passed_score = scored & (np.array(flat(shards, "score"), dtype=float) >= 0.2)
    kept = passed_score & ~dup["cifar10"] & ~dup["imagenet"]
    # row 8 is a cifar10 duplicate that the score rule dropped first: reported as a duplicate, not as removed
    assert report["eval_sets"]["cifar10"] == {"images": 2, "duplicates": 3, "removed": 2}
    assert report["eval_sets"]["imagenet"] == {"images": 1, "duplicates": 2, "removed": 2}
    assert report["per_rule"][1]["alone_keeps"] == int((scored & ~dup["cifar10"] & ~dup["imagenet"]).sum())
    assert report["per_rule"][1]["dropped_in_sequence"] == 4
    assert np.array_equal(datacomp_lookup(out / "uids.npy", flat(shards, "uid")), kept)
    assert report["kept"] == int(kept.sum()) == n - 1 - 1 - 4


def test_eval_dup_without_embeddings_names_the_table(tmp_path):
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match=r"00000\.parquet: eval_dup needs image embeddings"):
        run(tmp_path, [shard_columns(rng, 5)], ["eval_dup<0.9"], eval_sets={"x": np.eye(4, dtype=np.float32)})


# ---------------------------------------------------------------------------------------------------------------
# rules


def test_rule_forms_parse():
    assert parse_rule("score_top=0.3").value == 0.3
    assert parse_rule(" caption_words >= 2 ") == select.Rule(" caption_words >= 2 ", "caption_words", ">=", 2.0)
    assert parse_rule("aspect<=3").op == "<="
    assert parse_rule("score>-.5").value == -0.5
    assert parse_rule("eval_dup<0.95").name == "eval_dup"


@pytest.mark.parametrize("text, why", [
    ("score_top>0.3", "score_top takes '='"),
    ("score_top=0", "score_top takes '='"),
    ("score_top=1.5", "score_top takes '='"),
    ("clip_score>=0.3", "unknown name 'clip_score'"),
    ("score=>0.3", "not of the form"),
    ("caption_words>=two", "not of the form"),
    ("eval_dup>0.9", "eval_dup takes"),
    ("", "not of the form"),
])
def test_bad_rules_name_the_rule_and_list_the_forms(text, why):
    with pytest.raises(ValueError) as caught:
        parse_rule(text)
    message = str(caught.value)
    assert f"rule {text!r}" in message and why in message
    assert "score_top=F" in message and "min_side" in message and "eval_dup<X" in message


def test_bad_rule_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown name 'words'"):
        filter_scores(tmp_path / "nowhere", ["score_top=0.3", "words>=2"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# the report, on a real pool written by vlp


@pytest.fixture
def real_pool(tmp_path):
    from vlp.data import WriterOptions, iter_raw_samples, write_shards
    from vlp.data.sources import Item

    images = tmp_path / "images"
    images.mkdir()
    items = []
    for i in range(10):
        path = images / f"img{i}.jpg"
        path.write_bytes(jpeg_bytes(i, size=64 + 16 * i))
        items.append(Item(key=f"s{i:03d}", image=str(path), text=f"a photo | number {i}",
                          meta={"uid": f"{i:032x}"}))
    pool = tmp_path / "pool"
    write_shards(items, pool, WriterOptions(samples_per_shard=4), progress=False)
    shards = []
    rng = np.random.default_rng(0)
    for tar in sorted(pool.glob("*.tar")):
        samples = list(iter_raw_samples(str(tar)))
        n = len(samples)
        cols = shard_columns(rng, n, shard=str(tar), uid=[json.loads(s["json"])["uid"] for s in samples],
                             key=[s["__key__"] for s in samples], index=list(range(n)),
                             score=[0.1 + 0.03 * int(s["__key__"][1:]) for s in samples])
        shards.append(cols)
    shards[1]["score"][0], shards[1]["error"][0] = None, "decode_error"
    return shards


def test_report_files_histogram_and_samples_page(tmp_path, real_pool):
    report, out = run(tmp_path, real_pool, ["score_top=0.5", "caption_words>=0"], samples=3, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "samples", "samples.md",
                                                     "scores.png", "uids.npy"]
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "score_top=0.5" in (out / "report.md").read_text()
    page = (out / "samples.md").read_text()
    thumbs = [line.split("](", 1)[1].split(")", 1)[0] for line in page.splitlines() if "![" in line]
    assert len(thumbs) == 6 and report["samples"] == {"requested": 3, "seed": 1, "kept": 3, "dropped": 3,
                                                      "unreadable": 0}
    from PIL import Image
    for thumb in thumbs:
        with Image.open(out / thumb) as img:
            assert max(img.size) <= 96
    assert "a photo \\| number" in page  # captions read from the pool shards, table pipes escaped
    text = format_report(report)
    assert "kept 5 of 9 scored rows" in text and "decode_error 1" in text


def test_samples_page_says_when_the_pool_is_gone(tmp_path, real_pool):
    for cols in real_pool:
        Path(cols["shard"][0]).unlink()
    report, out = run(tmp_path, real_pool, ["score>=0"], samples=2)
    page = (out / "samples.md").read_text()
    assert page.count("pool shard not readable") == report["samples"]["unreadable"] == 2
    assert (out / "report.json").exists()


def test_a_second_selection_into_the_same_folder_replaces_the_first(tmp_path):
    rng = np.random.default_rng(10)
    shards = [shard_columns(rng, 300)]
    run(tmp_path, shards, ["score_top=0.5"], samples=2)
    out = tmp_path / "selection"
    second = filter_scores(tmp_path / "scores", ["score_top=0.1"], out, samples=1, progress=False)
    assert len(kept_set(out / "uids.npy")) == second["kept"]
    assert json.loads((out / "report.json").read_text())["rules"] == ["score_top=0.1"]
    assert len(list((out / "samples").iterdir())) == 0  # the pool tars of this table do not exist


def test_eval_dup_refuses_a_scored_row_without_an_embedding(tmp_path):
    rng = np.random.default_rng(12)
    embeddings = np.eye(4, dtype=np.float32)[[1, 2, 3]]
    embeddings[2] = np.nan
    with pytest.raises(ValueError, match=r"00000\.image\.npy: row 2 has a score but a NaN embedding"):
        run(tmp_path, [shard_columns(rng, 3)], ["eval_dup<0.9"], eval_sets={"x": np.eye(4, dtype=np.float32)[:1]},
            embeddings=[embeddings])
