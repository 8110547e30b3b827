"""Evaluators end to end (files -> reader -> features -> evaluator) with analytic fake models whose correct
figures are known exactly: an oracle must score 1.0, a constant model chance under the stable tie rule, a model
that confuses every class must score 0. Every reader format is exercised."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data import WriterOptions, write_shards
from vlp.data.sources import caption_file
from vlp.eval import wds_layout
from vlp.eval.features import FeatureOptions, FeatureStore
from vlp.eval.images import LoadOptions
from vlp.eval.models import EvalModel, Preprocess
from vlp.eval.suite import load_suite, run_suite

CLASSES = 10
PER_CLASS = 6
IMAGES = 12  # retrieval images, 5 captions each
PEOPLE = 4


def colour_png(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), rgb).save(path)


def person_png(path: Path, rgb: tuple[int, int, int]) -> None:
    """``rgb`` at the pixel the fake models read, on noise seeded by it: two such images are different pictures
    for the own-image rule (flat colours one grey level apart would be the same picture re-encoded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(list(rgb)).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    pixels[6, 6] = rgb
    Image.fromarray(pixels).save(path)


class FakeModel(EvalModel):
    """Reads what the fabricated images encode in their colour (red, green, blue bytes) and embeds it as a
    (cos, sin) point or a one-hot vector, so the right answer is known exactly."""

    def __init__(self, identity: str = "fake", text_shift: int = 0, constant: bool = False):
        super().__init__(identity=identity, preprocess=Preprocess(12, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
        self.text_shift, self.constant = text_shift, constant
        self.image_batches = 0

    @staticmethod
    def colour(images: torch.Tensor) -> torch.Tensor:
        return (images[:, :, 6, 6] * 255).round().long()  # mean 0 / std 1: pixels come back exactly

    def embed(self, values: torch.Tensor, n: int) -> torch.Tensor:
        if self.constant:
            return torch.ones(len(values), n)
        return torch.nn.functional.one_hot(values % n, n).float()

    def encode_image(self, images):
        self.image_batches += 1
        return self.embed(self.image_value(self.colour(images)), 64)

    def encode_text(self, texts):
        return self.embed(torch.tensor([int(re.search(r"#(\d+)", t).group(1)) + self.text_shift for t in texts]), 64)

    def image_value(self, rgb):
        raise NotImplementedError


class ClassModel(FakeModel):
    """Class in the red byte; class names are ``class #c``. Embedding: big_vision's (cos, sin) of the label."""

    def embed(self, values, n):
        if self.constant:
            return torch.ones(len(values), 2)
        angle = 2 * math.pi * (values % CLASSES).double() / CLASSES
        return torch.stack([angle.cos(), angle.sin()], 1).float()

    def image_value(self, rgb):
        return rgb[:, 0]


class CaptionModel(FakeModel):
    """Image index in the green and blue bytes; captions ``photo #i ...``."""

    def image_value(self, rgb):
        return rgb[:, 1] * 256 + rgb[:, 2]

    def encode_text(self, texts):  # a shifted caption points at another image of the set (wrapping around)
        values = [(int(re.search(r"#(\d+)", t).group(1)) + self.text_shift) % IMAGES for t in texts]
        return self.embed(torch.tensor(values), 64)


class PersonModel(FakeModel):
    """Person in the red byte, camera in green; captions ``person #p ...``."""

    def image_value(self, rgb):
        return rgb[:, 0]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_analytic")
    for split in ("train", "test"):
        for c in range(CLASSES):
            for j in range(PER_CLASS):
                colour_png(root / "folder" / split / f"class{c:02d}" / f"{j}.png", (c, j, 1 if split == "train" else 2))
    (root / "classnames.txt").write_text("".join(f"class #{c}\n" for c in range(CLASSES)))
    lines = ["image,caption"]
    for i in range(IMAGES):
        colour_png(root / "flickr" / f"img{i:03d}.png", (0, i // 256, i % 256))
        lines += [f"img{i:03d}.png,photo #{i}, caption {j}" for j in range(5)]  # captions hold commas
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    (root / "split.txt").write_text("".join(f"img{i:03d}.png\n" for i in range(IMAGES)))
    # identities: 4 people x 2 cameras x 2 views in the gallery; the query has one image per person, the first
    # two being byte copies of gallery images (as in the shared pedestrian set)
    for p in range(PEOPLE):
        for cam in (1, 2):
            for view in (1, 2):
                person_png(root / "people" / "gallery" / f"p{p}" / f"0{cam}_{view}.png", (p, cam, view))
        if p < 2:
            (root / "people" / "query" / f"p{p}").mkdir(parents=True)
            shutil.copy(root / "people" / "gallery" / f"p{p}" / "01_1.png", root / "people" / "query" / f"p{p}")
        else:
            person_png(root / "people" / "query" / f"p{p}" / "02_9.png", (p, 2, 9))
    (root / "people_captions.txt").write_text("".join(f"p{p}/x.png,person #{p} walking\n" for p in range(PEOPLE)))
    # the same sets in CLIP_benchmark's wds layout and as vlp caption shards (one sample per caption)
    wds_layout.write_classification(root / "folder" / "test", root / "wds_cls", "test", progress=False,
                                    classnames=[f"class #{c}" for c in range(CLASSES)],
                                    templates=["a photo of a {c}.", "{c}"], samples_per_shard=25)
    wds_layout.write_retrieval(root / "flickr", root / "captions.txt", root / "wds_ret", "test",
                               split_file=root / "split.txt", samples_per_shard=5, progress=False)
    write_shards(caption_file(root / "flickr", root / "captions.txt", root / "split.txt"), root / "vlp_shards",
                 WriterOptions(samples_per_shard=16), progress=False)
    return root


def run(root: Path, datasets: dict, tasks: list, model: EvalModel, cache: Path | None = None) -> list[dict]:
    suite = root / f"suite_{len(list(root.glob('suite_*')))}.yaml"
    suite.write_text(json.dumps({"name": "t", "data_root": str(root), "datasets": datasets, "tasks": tasks}))
    store = FeatureStore(model, FeatureOptions(load=LoadOptions(batch_size=7, workers=0), cache_dir=cache,
                                               progress=False))
    return [r.metrics for r in run_suite(load_suite(str(suite)), store)]


FOLDER = {"format": "folder", "path": "folder", "split": "test", "classnames": "classnames.txt",
          "templates": ["a photo of a {c}.", "a blurry {c}."]}
WDS_CLS = {"format": "wds", "path": "wds_cls"}


@pytest.mark.parametrize("spec", [FOLDER, WDS_CLS], ids=["folder", "wds"])
def test_zero_shot_oracle_is_exactly_right(eval_data, spec):
    [m] = run(eval_data, {"d": spec}, [{"dataset": "d", "task": "zeroshot_classification"}], ClassModel())
    assert (m["acc1"], m["acc5"], m["mean_per_class_recall"]) == (1.0, 1.0, 1.0)
    assert m["images"] == CLASSES * PER_CLASS


def test_zero_shot_constant_model_scores_chance(eval_data):
    [m] = run(eval_data, {"d": FOLDER}, [{"dataset": "d", "task": "zeroshot_classification"}],
              ClassModel(constant=True))
    # every logit ties: class 0 comes first, classes 0..4 fill the top 5 (balanced set)
    assert m["acc1"] == 1 / CLASSES and m["acc5"] == 5 / CLASSES
    assert m["mean_per_class_recall"] == pytest.approx(1 / CLASSES, abs=1e-12)


def test_zero_shot_confused_model_scores_zero(eval_data):
    """Prompts of class c embed as class c+1: nothing is top-1, but the right class is always within 2 steps."""
    [m] = run(eval_data, {"d": FOLDER}, [{"dataset": "d", "task": "zeroshot_classification"}],
              ClassModel(text_shift=1))
    assert m["acc1"] == 0.0 and m["mean_per_class_recall"] == 0.0 and m["acc5"] == 1.0


RETRIEVAL = {
    "captions": {"format": "captions", "images": "flickr", "captions": "captions.txt", "split_file": "split.txt"},
    "wds": {"format": "wds", "path": "wds_ret"},
    "shards": {"format": "shards", "path": "vlp_shards"},
}


@pytest.mark.parametrize("fmt", sorted(RETRIEVAL))
def test_retrieval_oracle_and_constant(eval_data, fmt):
    task = [{"dataset": "d", "task": "zeroshot_retrieval", "options": {"recall_k": [1, 5, 10]}}]
    [m] = run(eval_data, {"d": RETRIEVAL[fmt]}, task, CaptionModel())
    assert (m["images"], m["texts"]) == (IMAGES, 5 * IMAGES)  # per-caption shards are merged to one per image
    assert all(m[f"{d}_retrieval_recall@{k}"] == 1.0 for d in ("image", "text") for k in (1, 5, 10))
    [m] = run(eval_data, {"d": RETRIEVAL[fmt]}, task, CaptionModel(constant=True))
    for k in (1, 5, 10):
        # all scores tie: text->image finds image i at position i; image->text sees captions in image order
        assert m[f"image_retrieval_recall@{k}"] == k / IMAGES
        assert m[f"text_retrieval_recall@{k}"] == math.ceil(k / 5) / IMAGES


def test_retrieval_confused_model_scores_zero(eval_data):
    task = [{"dataset": "d", "task": "zeroshot_retrieval", "options": {"recall_k": [1]}}]
    [m] = run(eval_data, {"d": RETRIEVAL["captions"]}, task, CaptionModel(text_shift=1))
    assert m["image_retrieval_recall@1"] == 0.0 and m["text_retrieval_recall@1"] == 0.0


PEOPLE_SET = {"format": "identity", "path": "people", "captions": "people_captions.txt"}


def test_person_retrieval_oracle(eval_data):
    tasks = [{"dataset": "d", "task": "person_retrieval", "options": {"gallery_rule": rule}}
             for rule in ("same_image", "same_camera")]
    same_image, same_camera = run(eval_data, {"d": PEOPLE_SET}, tasks, PersonModel())
    for m in (same_image, same_camera):
        for mode in ("image_to_image", "text_to_image"):
            assert (m[f"{mode}_rank@1"], m[f"{mode}_mAP"], m[f"{mode}_mINP"]) == (1.0, 1.0, 1.0)
        assert m["text_to_image_queries"] == PEOPLE and m["gallery"] == PEOPLE * 4
    assert same_image["image_to_image_queries"] == PEOPLE


def test_person_retrieval_drops_the_query_image(eval_data):
    """A model that sees every image as distinct (one-hot of the colour): the only gallery item equal to a query
    is its own copy, so with that copy dropped everything ties at 0 and the stable rule decides; the expected
    figures follow by hand. Without the drop, the two copied queries would sit at rank 1."""

    class PerImage(PersonModel):
        def image_value(self, rgb):
            return rgb[:, 0] * 16 + rgb[:, 1] * 4 + rgb[:, 2]

    [m] = run(eval_data, {"d": PEOPLE_SET}, [{"dataset": "d", "task": "person_retrieval",
                                             "options": {"text": False, "ranks": [1, 4]}}], PerImage())
    # gallery in key order: p0 (4 images), p1, p2, p3. Copied queries p0, p1 lose their own image; p2, p3 see
    # all 16. Positions of the first positive: p0 -> 0, p1 -> 3 (4 p0 images, minus 1 dropped... of p1's own
    # gallery, 3 remain after p0's 4), p2 -> 8, p3 -> 12.
    assert m["image_to_image_rank@1"] == 1 / 4  # only p0 (its remaining 3 images open the list)
    assert m["image_to_image_rank@4"] == 1 / 4
    ap_p0 = 1.0  # 3 positives at positions 1, 2, 3
    ap_p1 = (1 / 5 + 2 / 6 + 3 / 7) / 3  # p0's 4 images first, then p1's remaining 3
    ap_p2 = (1 / 9 + 2 / 10 + 3 / 11 + 4 / 12) / 4
    ap_p3 = (1 / 13 + 2 / 14 + 3 / 15 + 4 / 16) / 4
    assert m["image_to_image_mAP"] == pytest.approx((ap_p0 + ap_p1 + ap_p2 + ap_p3) / 4)
    assert m["image_to_image_mINP"] == pytest.approx((3 / 3 + 3 / 7 + 4 / 12 + 4 / 16) / 4)


def test_linear_probe_oracle_and_constant(eval_data):
    spec = {"format": "folder", "path": "folder", "split": "test", "classnames": "classnames.txt"}
    task = [{"dataset": "d", "task": "linear_probe", "options": {"val_proportion": 0.34, "weight_decays": [1e-4]}}]

    class OneHot(ClassModel):
        def embed(self, values, n):
            return torch.ones(len(values), CLASSES) if self.constant else \
                torch.nn.functional.one_hot(values % CLASSES, CLASSES).float()

    [m] = run(eval_data, {"d": spec}, task, OneHot())
    assert (m["acc1"], m["mean_per_class_recall"], m["val_acc1"]) == (1.0, 1.0, 1.0)
    assert m["train_images"] == CLASSES * PER_CLASS and m["test_images"] == CLASSES * PER_CLASS
    [m] = run(eval_data, {"d": spec}, task, OneHot(constant=True))
    # identical features: one class wins everywhere, whichever it is -> 1/C on a balanced test set
    assert m["acc1"] == pytest.approx(1 / CLASSES) and m["mean_per_class_recall"] == pytest.approx(1 / CLASSES)
    task[0]["options"]["fewshot_k"] = 2
    [m] = run(eval_data, {"d": spec}, task, OneHot())
    assert m["acc1"] == 1.0 and m["train_images"] == 2 * CLASSES


def test_embeddings_are_computed_once_and_cached_by_model_identity(eval_data, tmp_path):
    tasks = [{"dataset": "d", "task": "zeroshot_classification"}, {"dataset": "d", "task": "linear_probe",
                                                                  "options": {"weight_decays": [1e-3]}}]
    model = ClassModel(identity="A")
    run(eval_data, {"d": FOLDER}, tasks, model, cache=tmp_path)
    batches = model.image_batches
    assert batches == 2 * math.ceil(CLASSES * PER_CLASS / 7)  # test once (shared by both tasks) + train once
    again = ClassModel(identity="A")
    first = run(eval_data, {"d": FOLDER}, tasks, again, cache=tmp_path)
    assert again.image_batches == 0  # everything from the disk cache
    other = ClassModel(identity="B", text_shift=1)
    second = run(eval_data, {"d": FOLDER}, tasks, other, cache=tmp_path)
    assert other.image_batches == batches  # another model never reads A's features
    assert first[0]["acc1"] == 1.0 and second[0]["acc1"] == 0.0
