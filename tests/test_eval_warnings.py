"""What a run says about its own figures and failures: a linear probe whose weight decay sits at the edge of its
grid, and an image set that gives no image (none of a supported type, or none that decodes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import jpeg_bytes, write_tar
from test_eval_analytic import ClassModel, colour_png

from vlp.eval.features import FeatureOptions, FeatureStore
from vlp.eval.images import FileImages, LoadOptions, ShardImages
from vlp.eval.report import write_results
from vlp.eval.suite import load_suite, run_suite


# -- linear probe grid -----------------------------------------------------------------------------------------
def probe(root: Path, weight_decays: list[float]) -> tuple[dict, str]:
    """(result file, summary.md) of a linear probe on 3 separable classes (9, 3 and 3 training images, 2 test
    images each)."""
    for split, per_class in (("train", (9, 3, 3)), ("test", (2, 2, 2))):
        for c in range(3):
            for j in range(per_class[c]):
                colour_png(root / "folder" / split / f"class{c}" / f"{j}.png", (c, j, 1))
    suite = root / "suite.yaml"
    suite.write_text(json.dumps({"name": "t", "data_root": str(root), "datasets": {"d": {
        "format": "folder", "path": "folder", "split": "test", "classnames": ["class #0", "class #1", "class #2"]}},
        "tasks": [{"dataset": "d", "task": "linear_probe", "options": {"weight_decays": weight_decays,
                                                                      "val_proportion": 0.34}}]}))
    loaded = load_suite(str(suite))
    store = FeatureStore(ClassModel(), FeatureOptions(load=LoadOptions(batch_size=8, workers=0), progress=False))
    out = root / f"out{len(weight_decays)}_{weight_decays[0]:g}"
    written = write_results(loaded, run_suite(loaded, store), {"model": "fake"}, out)
    return json.loads(written["d__linear_probe"].read_text()), written["summary.md"].read_text()


def test_a_weight_decay_at_the_grid_edge_is_recorded_and_warned_about(tmp_path, caplog):
    # Separable classes: every small weight decay scores 1.0 on validation and the larger of equals is kept; a
    # huge one leaves only the (unpenalised) intercept, which predicts the largest class everywhere.
    result, summary = probe(tmp_path, [1e-4, 1e4])
    assert result["metrics"]["weight_decay"] == 1e-4
    assert result["metrics"]["weight_decay_at_grid_edge"] == "smallest"
    [warning] = result["warnings"]
    assert "smallest" in warning and "add smaller values" in warning
    assert "Warnings:" in summary and "add smaller values" in summary
    assert any("add smaller values" in r.getMessage() for r in caplog.records)

    result, summary = probe(tmp_path, [1e-4, 1e-3])
    assert result["metrics"]["weight_decay"] == 1e-3
    assert result["metrics"]["weight_decay_at_grid_edge"] == "largest"
    assert "add larger values" in result["warnings"][0]


def test_a_weight_decay_inside_the_grid_or_a_single_value_gives_no_warning(tmp_path):
    for grid, chosen in (([1e-4, 1e-2, 1e4], 1e-2), ([1e-3], 1e-3)):
        result, summary = probe(tmp_path, grid)
        assert result["metrics"]["weight_decay"] == chosen
        assert result["metrics"]["weight_decay_at_grid_edge"] is None
        assert result["warnings"] == [] and "Warnings:" not in summary


# -- image sets that give no image -----------------------------------------------------------------------------
def embed(images) -> None:
    store = FeatureStore(ClassModel(), FeatureOptions(load=LoadOptions(batch_size=4, workers=0), progress=False))
    store.images(images)


def shard_set(path: Path, samples: list[dict]) -> ShardImages:
    write_tar(path, samples)
    return ShardImages("broken/test", str(path), lambda batch, i: {"key": batch["key"][i]})


def test_a_set_with_no_image_file_says_so(tmp_path):
    images = shard_set(tmp_path / "0.tar", [{"__key__": f"s{i}", "txt": b"a caption", "bmp": b"BM"}
                                            for i in range(3)])
    with pytest.raises(ValueError) as info:
        embed(images)
    message = str(info.value)
    assert message.startswith("broken/test: no image could be read: 3 samples hold no file of a supported type")
    assert "failed to decode" not in message
    assert f"{tmp_path / '0.tar'}: sample s0 has no image member of a supported type" in message
    assert "it has: bmp, txt" in message
    with pytest.raises(ValueError, match=r"^empty: no image could be read: it holds no file of a supported type$"):
        embed(FileImages("empty", [], []))


def test_a_set_whose_images_fail_to_decode_names_the_first(tmp_path):
    images = shard_set(tmp_path / "0.tar", [{"__key__": "s0", "txt": b"no image here"}]
                       + [{"__key__": f"s{i}", "jpg": b"not a jpeg " * i} for i in range(1, 4)])
    with pytest.raises(ValueError) as info:
        embed(images)
    message = str(info.value)
    assert message.startswith("broken/test: no image could be read: 1 samples hold no file of a supported type; "
                              "3 samples hold an image that failed to decode")
    assert f"the first: {tmp_path / '0.tar'}: sample s0 has no image member" in message  # in shard order


def test_a_partly_unreadable_set_names_its_first_failure(tmp_path):
    images = shard_set(tmp_path / "0.tar", [{"__key__": "s0", "jpg": jpeg_bytes(0)},
                                            {"__key__": "s1", "jpg": b"\xff\xd8 truncated"}])
    with pytest.raises(ValueError) as info:
        embed(images)
    message = str(info.value)
    assert "1 samples could not be read ({'image_decode': 1})" in message
    assert f"the first: {tmp_path / '0.tar'}: sample s1 (jpg): image_decode: UnidentifiedImageError" in message
