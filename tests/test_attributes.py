"""Colour attributes and pseudo-captions of pedestrian crops (vlp.data.attributes), and the identity shards that
``vlp shards identities --captions attributes`` writes with them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import require_shared_data
from vlp.cli import main
from vlp.data import iter_raw_samples
from vlp.data.attributes import COLORS, REGIONS, SLOTS, attribute_captions, caption_image, read_attributes
from vlp.data.shards import expand


def crop(upper: tuple[int, int, int], lower: tuple[int, int, int], background=(128, 128, 128)) -> np.ndarray:
    """A 48x128 crop: background everywhere, a body-wide block of ``upper`` over the torso rows and of ``lower``
    over the leg rows (wider than the boxes the reader looks at, as a real body is)."""
    image = np.full((128, 48, 3), background, dtype=np.uint8)
    image[int(0.18 * 128):int(0.52 * 128), 8:40] = upper
    image[int(0.55 * 128):int(0.9 * 128), 10:38] = lower
    return image


def test_vocabulary_is_fixed_and_regions_cover_every_slot():
    assert COLORS == ("black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple", "pink",
                      "brown")
    assert SLOTS == ("upper_color", "lower_color") and set(REGIONS) == set(SLOTS)


def test_red_top_blue_bottom():
    assert read_attributes(crop((200, 30, 30), (30, 50, 190))) == {"upper_color": "red", "lower_color": "blue"}


def test_uniform_grey_black_and_white():
    for value, name in ((128, "grey"), (10, "black"), (245, "white")):
        image = np.full((128, 48, 3), value, dtype=np.uint8)
        assert read_attributes(image) == {"upper_color": name, "lower_color": name}


def test_black_top_white_bottom_on_a_green_background():
    image = crop((15, 15, 15), (240, 240, 240), background=(60, 140, 50))
    assert read_attributes(Image.fromarray(image)) == {"upper_color": "black", "lower_color": "white"}


def test_captions_name_both_colours_and_start_with_a_stable_per_key_template():
    captions = attribute_captions({"upper_color": "orange", "lower_color": "black"}, "001_01_1")
    assert len(captions) == len(set(captions)) > 1
    assert all("orange" in c and "black" in c for c in captions)
    assert all(" a orange" not in c for c in captions)  # the article follows the colour name
    assert captions == attribute_captions({"upper_color": "orange", "lower_color": "black"}, "001_01_1")
    firsts = {attribute_captions({"upper_color": "red", "lower_color": "blue"}, f"k{i}")[0] for i in range(40)}
    assert len(firsts) > 1  # txt varies across images, not only json["captions"]


def test_cli_writes_attribute_captions_that_the_reader_sees(tmp_path: Path):
    root = tmp_path / "people"
    colours = {"a": ((200, 30, 30), (30, 50, 190)), "b": ((245, 245, 245), (10, 10, 10))}
    for person, (upper, lower) in colours.items():
        (root / person).mkdir(parents=True)
        for view in ("01_1", "02_1"):
            Image.fromarray(crop(upper, lower)).save(root / person / f"{view}.png")
    (root / "b" / "02_2.png").write_bytes(b"not an image")
    out = tmp_path / "shards"
    assert main(["shards", "identities", "--root", str(root), "--captions", "attributes", "--out", str(out),
                 "--workers", "1"]) == 0
    samples = [s for shard in expand(str(out)) for s in iter_raw_samples(shard.url)]
    assert len(samples) == 4
    expected = {"a": {"upper_color": "red", "lower_color": "blue"},
                "b": {"upper_color": "white", "lower_color": "black"}}
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["kind"] == "identity" and meta["attributes"] == expected[meta["person"]]
        text = sample["txt"].decode()
        assert text == meta["captions"][0] and all(name in text for name in meta["attributes"].values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"bad_image": 1}

    plain = tmp_path / "plain"
    assert main(["shards", "identities", "--root", str(root), "--out", str(plain), "--workers", "1"]) == 0
    for shard in expand(str(plain)):
        for sample in iter_raw_samples(shard.url):
            assert "txt" not in sample and "attributes" not in json.loads(sample["json"])


def test_real_crop_reads_a_name_from_the_vocabulary():
    person = require_shared_data("pedestrians", "train") / "001"
    path = sorted(person.glob("*.png"))[0]
    captions, attributes = caption_image(path, "001_01_1")
    assert set(attributes) == set(SLOTS) and set(attributes.values()) <= set(COLORS)
    assert all(attributes["upper_color"] in c for c in captions)


@pytest.mark.parametrize("bad", [np.zeros((128, 48)), np.zeros((128, 48, 4))])
def test_non_rgb_arrays_are_refused(bad):
    with pytest.raises(ValueError, match="RGB"):
        read_attributes(bad)
