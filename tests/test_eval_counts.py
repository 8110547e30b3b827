"""Evaluation drops nothing without a count: every result file records what was scored (images, texts, classes)
and what was left out (files of an unsupported type, samples skipped when shards were written); a class or person
folder with no image, or a caption line naming a missing image, fails suite validation naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_eval_analytic import CaptionModel, ClassModel, PersonModel, colour_png  # noqa: E402

from vlp.data import WriterOptions, write_shards
from vlp.data.sources import caption_file
from vlp.eval.features import FeatureOptions, FeatureStore
from vlp.eval.images import LoadOptions
from vlp.eval.report import write_results
from vlp.eval.suite import SuiteError, load_suite, run_suite

ZERO_SHOT = [{"dataset": "d", "task": "zeroshot_classification"}]
RETRIEVAL = [{"dataset": "d", "task": "zeroshot_retrieval", "options": {"recall_k": [1]}}]


def write_suite(root: Path, datasets: dict, tasks: list) -> Path:
    path = root / "suite.yaml"
    path.write_text(json.dumps({"name": "t", "data_root": str(root), "datasets": datasets, "tasks": tasks}))
    return path


def evaluate(root: Path, datasets: dict, tasks: list, model) -> tuple[dict, str]:
    """(the first result file, summary.md) of a suite run."""
    suite = load_suite(str(write_suite(root, datasets, tasks)))
    store = FeatureStore(model, FeatureOptions(load=LoadOptions(batch_size=4, workers=0), progress=False))
    written = write_results(suite, run_suite(suite, store), {"model": "fake"}, root / "out")
    first = next(p for name, p in written.items() if name.endswith(tasks[0]["task"]))
    return json.loads(first.read_text()), written["summary.md"].read_text()


def class_folder(root: Path, classes: int = 3, per_class: int = 2) -> dict:
    for c in range(classes):
        for j in range(per_class):
            colour_png(root / "folder" / f"class{c}" / f"{j}.png", (c, j, 0))
    return {"format": "folder", "path": "folder", "classnames": [f"class #{c}" for c in range(classes)],
            "templates": ["a {c}.", "the {c}."]}


def caption_set(root: Path, images: int = 4, extra_line: str | None = None) -> dict:
    lines = ["image,caption"]
    for i in range(images):
        colour_png(root / "flickr" / f"img{i}.png", (0, 0, i))
        lines += [f"img{i}.png,photo #{i}", f"img{i}.png,another photo #{i}"]
    if extra_line:
        lines.insert(2, extra_line)
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return {"format": "captions", "images": "flickr", "captions": "captions.txt"}


# -- what was scored -------------------------------------------------------------------------------------------
def test_results_record_images_texts_and_classes(tmp_path):
    result, _ = evaluate(tmp_path, {"d": class_folder(tmp_path)}, ZERO_SHOT, ClassModel())
    assert result["metrics"]["acc1"] == 1.0
    assert result["counts"] == {"images": 6, "texts": 3 * 2, "classes": 3}
    result, _ = evaluate(tmp_path, {"d": caption_set(tmp_path)}, RETRIEVAL, CaptionModel())
    assert result["counts"] == {"images": 4, "texts": 8}


def test_linear_probe_and_person_results_record_counts(tmp_path):
    for split, per_class in (("train", 3), ("test", 2)):
        for c in range(2):
            for j in range(per_class):
                colour_png(tmp_path / "folder" / split / f"class{c}" / f"{j}.png", (c, j, 1))
    spec = {"format": "folder", "path": "folder", "split": "test", "classnames": ["class #0", "class #1"]}
    probe = [{"dataset": "d", "task": "linear_probe", "options": {"weight_decays": [0.1], "val_proportion": 0.34}}]
    result, _ = evaluate(tmp_path, {"d": spec}, probe, ClassModel())
    assert result["counts"] == {"images": 4, "train_images": 6, "classes": 2}
    for p in range(3):
        colour_png(tmp_path / "people" / "query" / f"p{p}" / "01_1.png", (p, 1, 1))
        for view in (1, 2):
            colour_png(tmp_path / "people" / "gallery" / f"p{p}" / f"02_{view}.png", (p, 2, view))
    result, _ = evaluate(tmp_path, {"d": {"format": "identity", "path": "people"}},
                         [{"dataset": "d", "task": "person_retrieval"}], PersonModel())
    assert result["counts"] == {"images": 3 + 6, "texts": 0, "identities": 3}


# -- folders without an image ----------------------------------------------------------------------------------
def test_an_empty_class_folder_fails_validation(tmp_path):
    spec = class_folder(tmp_path)
    (tmp_path / "folder" / "class3").mkdir()
    spec["classnames"] = [f"class #{c}" for c in range(4)]
    with pytest.raises(SuiteError, match=r"datasets\.d.*class folder .*class3 is empty"):
        load_suite(str(write_suite(tmp_path, {"d": spec}, ZERO_SHOT)))


def test_a_class_folder_of_other_files_fails_validation(tmp_path):
    spec = class_folder(tmp_path)
    (tmp_path / "folder" / "class3").mkdir()
    (tmp_path / "folder" / "class3" / "notes.txt").write_text("no image here")
    spec["classnames"] = [f"class #{c}" for c in range(4)]
    with pytest.raises(SuiteError, match=r"class3 holds no file of a supported type \(\.txt 1"):
        load_suite(str(write_suite(tmp_path, {"d": spec}, ZERO_SHOT)))


def test_an_empty_person_folder_fails_validation(tmp_path):
    for part in ("query", "gallery"):
        for p in range(2):
            colour_png(tmp_path / "people" / part / f"p{p}" / "01_1.png", (p, 1, 1))
    (tmp_path / "people" / "gallery" / "p2").mkdir()
    tasks = [{"dataset": "d", "task": "person_retrieval"}]
    with pytest.raises(SuiteError, match=r"datasets\.d.*person folder .*gallery/p2 is empty"):
        load_suite(str(write_suite(tmp_path, {"d": {"format": "identity", "path": "people"}}, tasks)))


# -- file types ------------------------------------------------------------------------------------------------
def test_torchvision_image_types_are_read_and_other_files_counted(tmp_path):
    for c, suffix in enumerate((".pgm", ".ppm", ".tif", ".tiff", ".gif", ".bmp", ".webp")):
        folder = tmp_path / "folder" / f"class{c}"
        folder.mkdir(parents=True)
        image = Image.new("L" if suffix == ".pgm" else "RGB", (12, 12), c if suffix == ".pgm" else (c, c, c))
        image.save(folder / f"0{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    (tmp_path / "folder" / "class0" / "README.txt").write_text("about this class")
    (tmp_path / "folder" / "class1" / "labels.csv").write_text("0")
    (tmp_path / "folder" / "class1" / "more.txt").write_text("x")
    spec = {"format": "folder", "path": "folder", "classnames": [f"class #{c}" for c in range(7)],
            "templates": ["a {c}."]}
    result, summary = evaluate(tmp_path, {"d": spec}, ZERO_SHOT, ClassModel())
    assert result["counts"]["images"] == 7 and result["metrics"]["acc1"] == 1.0
    folder = str(tmp_path / "folder")
    assert result["dropped"]["unsupported_files"] == {folder: {".csv": 1, ".txt": 2}}
    assert f"d: 3 files of an unsupported type in {folder} (.csv 1, .txt 2)" in summary


# -- caption files ---------------------------------------------------------------------------------------------
def test_a_caption_line_naming_a_missing_image_fails_validation(tmp_path):
    spec = caption_set(tmp_path, extra_line="gone.png,a photo of nothing")
    with pytest.raises(SuiteError) as info:
        load_suite(str(write_suite(tmp_path, {"d": spec}, RETRIEVAL)))
    message = str(info.value)
    assert "datasets.d" in message and f"{tmp_path / 'captions.txt'}:3" in message and "gone.png" in message


# -- shards ----------------------------------------------------------------------------------------------------
def test_samples_skipped_when_shards_were_written_are_recorded(tmp_path):
    caption_set(tmp_path, extra_line="a line without a comma")
    write_shards(caption_file(tmp_path / "flickr", tmp_path / "captions.txt"), tmp_path / "shards",
                 WriterOptions(samples_per_shard=4), progress=False)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["skipped"] == {"no_comma": 1}
    result, summary = evaluate(tmp_path, {"d": {"format": "shards", "path": "shards"}}, RETRIEVAL, CaptionModel())
    assert result["counts"] == {"images": 4, "texts": 8}
    assert result["dropped"]["skipped_when_written"] == {"no_comma": 1}
    assert "d: 1 samples skipped when the shards were written (no_comma 1)" in summary


def test_image_extensions_are_torchvisions_and_gif():
    """The writer and the evaluators read the files torchvision's ImageFolder reads (and GIF): one list, restated
    in vlp.data.sources so that a shard writer needs no torchvision import."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from vlp.data.sources import IMAGE_EXTENSIONS

    assert set(IMAGE_EXTENSIONS) == set(IMG_EXTENSIONS) | {".gif"}
