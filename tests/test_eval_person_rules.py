"""Person retrieval's gallery rules: a query's own image is recognised by its pixels, whatever its encoding, and
an identity set whose file names carry no camera works unless the rule that needs cameras is chosen."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, require_shared_data
from PIL import Image

from vlp.eval.features import FeatureOptions, FeatureStore
from vlp.eval.images import SAME_PICTURE_MAX_DIFFERENCE, LoadOptions, picture_signature, same_picture
from vlp.eval.models import EvalModel, Preprocess
from vlp.eval.suite import SuiteError, load_suite, run_suite
from vlp.eval.tasks.person import ignore_mask

sys.path.insert(0, str(REPO / "benchmarks"))
from generated_images import encode, photo  # noqa: E402


class Flat(EvalModel):
    """Every image the same embedding: the figures do not matter here, only what is removed from the gallery."""

    def __init__(self):
        super().__init__(identity="flat", preprocess=Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))

    def encode_image(self, images):
        return torch.ones(len(images), 4)

    def encode_text(self, texts):
        return torch.ones(len(texts), 4)


def suite_file(root: Path, tasks: list[dict], **dataset) -> Path:
    path = root / "suite.yaml"
    path.write_text(json.dumps({"name": "t", "data_root": str(root), "tasks": tasks,
                                "datasets": {"people": {"format": "identity", "path": "people", **dataset}}}))
    return path


def person_task(rule: str = "same_image") -> list[dict]:
    return [{"dataset": "people", "task": "person_retrieval", "options": {"gallery_rule": rule}}]


def embedded_parts(path: Path):
    suite = load_suite(str(path))
    store = FeatureStore(Flat(), FeatureOptions(load=LoadOptions(batch_size=8, workers=0), progress=False))
    dataset = suite.datasets["people"]
    return store.images(dataset.image_set("query")), store.images(dataset.image_set("gallery"))


def copies_set(root: Path, query: Image.Image, other: Image.Image, stranger: Image.Image) -> None:
    """Person p0's query image, in p0's gallery as a JPEG (quality 90) and a PNG re-save, beside another image of
    p0; another person's image in the gallery."""
    (root / "people" / "query" / "p0").mkdir(parents=True)
    (root / "people" / "gallery" / "p0").mkdir(parents=True)
    (root / "people" / "gallery" / "p1").mkdir(parents=True)
    (root / "people" / "query" / "p0" / "01_1.png").write_bytes(encode(query, "PNG"))
    (root / "people" / "gallery" / "p0" / "01_1.jpg").write_bytes(encode(query, "JPEG", quality=90))
    (root / "people" / "gallery" / "p0" / "01_1_resaved.png").write_bytes(encode(query, "PNG", compress_level=1))
    (root / "people" / "gallery" / "p0" / "01_2.png").write_bytes(encode(other, "PNG"))
    (root / "people" / "gallery" / "p1" / "01_1.png").write_bytes(encode(stranger, "PNG"))


def dropped_from_gallery(root: Path) -> set[str]:
    query, gallery = embedded_parts(suite_file(root, person_task()))
    [row] = ignore_mask(query, gallery, "same_image").tolist()
    return {r["key"] for r, drop in zip(gallery.records, row) if drop}


def test_re_encoded_copies_of_the_query_are_its_own_image(tmp_path):
    """Generated 48x128 crops (the pedestrian size): the JPEG and PNG copies differ from the query's bytes. The
    generator's pictures differ by their noise only, which the thumbnail averages away: flips make others."""
    query, other, stranger = (Image.fromarray(photo(48, 128, 1)), Image.fromarray(photo(48, 128, 2)[::-1]),
                              Image.fromarray(photo(48, 128, 3)[:, ::-1]))
    copies_set(tmp_path, query, other, stranger)
    assert len({p.read_bytes() for p in (tmp_path / "people").glob("*/p0/01_1*")}) == 3  # three encodings
    assert dropped_from_gallery(tmp_path) == {"p0/01_1.jpg", "p0/01_1_resaved.png"}


def test_re_encoded_copies_of_a_real_pedestrian_are_its_own_image(tmp_path):
    person = require_shared_data("pedestrians", "val", "all_imgs")
    first, second = sorted(p for p in person.iterdir() if p.is_dir())[:2]
    query, other = (Image.open(p).convert("RGB") for p in sorted(first.glob("*.png"))[:2])
    stranger = Image.open(sorted(second.glob("*.png"))[0]).convert("RGB")
    copies_set(tmp_path, query, other, stranger)
    assert dropped_from_gallery(tmp_path) == {"p0/01_1.jpg", "p0/01_1_resaved.png"}


def test_the_same_picture_threshold_has_a_margin_on_the_pedestrians():
    """JPEG re-encodes (quality 75 and 90) stay far below the threshold, different images of one person (all 62
    people of train/, their pixel-identical duplicates aside) far above it."""
    root = require_shared_data("pedestrians", "train")
    copies, others = [], []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        images = [Image.open(p).convert("RGB") for p in sorted(person.glob("*.png"))]
        signatures = [picture_signature(encode(img, "PNG")) for img in images]
        for img, signature in zip(images, signatures):
            for quality in (75, 90):
                copies.append(distance(picture_signature(encode(img, "JPEG", quality=quality)), signature))
        others += [d for a, b in itertools.combinations(signatures, 2) if (d := distance(a, b)) > 0]
    assert len(copies) == 62 * 16 * 2
    assert max(copies) < SAME_PICTURE_MAX_DIFFERENCE / 2 < 2 * SAME_PICTURE_MAX_DIFFERENCE < min(others)


def distance(a: dict, b: dict) -> float:
    pixels = [np.frombuffer(bytes.fromhex(s["thumbnail"]), np.uint8).astype(float) for s in (a, b)]
    return float(np.abs(pixels[0] - pixels[1]).mean())


def test_same_picture_needs_the_same_stored_size():
    img = Image.fromarray(photo(48, 128, 4))
    a = picture_signature(encode(img, "PNG"))
    b = picture_signature(encode(img.resize((24, 64), Image.BOX), "PNG"))
    assert same_picture([a, None], [a, b, None]).tolist() == [[True, False, False], [False, False, False]]


# -- cameras ---------------------------------------------------------------------------------------------------
def no_camera_names(root: Path) -> None:
    seed = itertools.count()
    for part, names in (("query", ["img1.png"]), ("gallery", ["img2.png", "img3.png"])):
        for p in range(2):
            for name in names:
                path = root / "people" / part / f"p{p}" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(encode(Image.fromarray(photo(20, 40, seed=next(seed))), "PNG"))


def test_file_names_without_a_camera_need_no_setting(tmp_path):
    no_camera_names(tmp_path)
    suite = load_suite(str(suite_file(tmp_path, person_task())))
    store = FeatureStore(Flat(), FeatureOptions(load=LoadOptions(batch_size=8, workers=0), progress=False))
    [result] = run_suite(suite, store)
    assert result.metrics["image_to_image_queries"] == 2 and result.metrics["gallery"] == 4
    query, _ = embedded_parts(suite_file(tmp_path, person_task()))
    assert query.column("camera") == [None, None]


def test_same_camera_without_cameras_says_how_to_set_them(tmp_path):
    no_camera_names(tmp_path)
    with pytest.raises(SuiteError) as info:
        load_suite(str(suite_file(tmp_path, person_task("same_camera"))))
    message = str(info.value)
    assert "tasks[0]" in message and "datasets.people" in message
    assert str(tmp_path / "people" / "query" / "p0" / "img1.png") in message
    assert "camera:" in message and "gallery_rule: same_image" in message
    with pytest.raises(SuiteError, match=r"camera: is null.*gallery_rule: same_image"):
        load_suite(str(suite_file(tmp_path, person_task("same_camera"), camera=None)))


def test_a_pattern_that_matches_some_names_gives_unknown_cameras_for_the_rest(tmp_path):
    no_camera_names(tmp_path)
    (tmp_path / "people" / "gallery" / "p0" / "img2.png").rename(tmp_path / "people" / "gallery" / "p0" / "03_2.png")
    _, gallery = embedded_parts(suite_file(tmp_path, person_task()))
    assert {r["key"]: r["camera"] for r in gallery.records}["p0/03_2.png"] == "03"
    assert sorted(gallery.column("camera"), key=str) == ["03", None, None, None]
