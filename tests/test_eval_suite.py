"""Suites and ``vlp eval``: bad input is reported naming the file or entry before any model work; model specs
load; the shipped suites validate and the smoke suite runs from the CLI on the real data."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import vlp.eval.models
import vlp.models  # noqa: F401 - registers vlp-tiny-32
from vlp.eval import prompts, wds_layout
from vlp.eval.cli import main
from vlp.eval.models import ModelSpecError, load_model
from vlp.eval.suite import SuiteError, load_suite

from conftest import REPO  # noqa: E402
from conftest import require_shared_data as shared_data  # noqa: E402


@pytest.fixture
def eval_tiny_set(tmp_path) -> Path:
    """Three classes of two images, as a folder and in CLIP_benchmark's wds layout."""
    for c, name in enumerate(("cat", "dog", "owl")):
        for j in range(2):
            (tmp_path / "folder" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (c * 80, j, 0)).save(tmp_path / "folder" / name / f"{j}.png")
    wds_layout.write_classification(tmp_path / "folder", tmp_path / "wds", templates=["a {c}."], progress=False)
    return tmp_path


def write_suite(root: Path, datasets: dict, tasks: list) -> Path:
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "data_root": str(root), "datasets": datasets, "tasks": tasks}))
    return path


@pytest.fixture
def eval_no_model(monkeypatch):
    """Fail loudly if anything tries to build a model: errors must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("model work started before the suite was validated")
    monkeypatch.setattr(vlp.eval.models, "load_model", forbidden)


FOLDER = {"format": "folder", "path": "folder", "templates": ["a photo of a {c}."]}
ZERO_SHOT = {"dataset": "pets", "task": "zeroshot_classification"}


def expect_error(suite: Path, *fragments: str) -> str:
    with pytest.raises(SuiteError) as info:
        main(["--model", "vlp-tiny-32", "--suite", str(suite), "--no-cache"])
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_dataset_path_is_named(eval_tiny_set, eval_no_model):
    suite = write_suite(eval_tiny_set, {"pets": {**FOLDER, "path": "nowhere"}}, [ZERO_SHOT])
    expect_error(suite, str(suite), "datasets.pets", str(eval_tiny_set / "nowhere"), "does not exist")


def test_unknown_task_is_named(eval_tiny_set, eval_no_model):
    suite = write_suite(eval_tiny_set, {"pets": FOLDER},
                        [ZERO_SHOT, {"dataset": "pets", "task": "zeroshot_clasification"}])
    expect_error(suite, "tasks[1]", "unknown task 'zeroshot_clasification'", "zeroshot_classification")


def test_unknown_dataset_and_option_are_named(eval_tiny_set, eval_no_model):
    suite = write_suite(eval_tiny_set, {"pets": FOLDER}, [{"dataset": "cars", "task": "zeroshot_classification"}])
    expect_error(suite, "tasks[0]", "unknown dataset 'cars'")
    suite = write_suite(eval_tiny_set, {"pets": FOLDER},
                        [{"dataset": "pets", "task": "zeroshot_retrieval", "options": {"recall": [1]}}])
    expect_error(suite, "tasks[0]", "unknown option(s) ['recall']", "recall_k")
    suite = write_suite(eval_tiny_set, {"pets": {**FOLDER, "max_per_class": "ten"}}, [ZERO_SHOT])
    expect_error(suite, "datasets.pets.max_per_class")


def test_folder_classnames_that_do_not_match_the_labels(eval_tiny_set, eval_no_model):
    (eval_tiny_set / "names.txt").write_text("cat\ndog\n")
    suite = write_suite(eval_tiny_set, {"pets": {**FOLDER, "classnames": "names.txt"}}, [ZERO_SHOT])
    expect_error(suite, str(eval_tiny_set / "names.txt"), "2 class names", "3 class folders")


def test_folder_classnames_in_another_order(eval_tiny_set, eval_no_model):
    suite = write_suite(eval_tiny_set, {"pets": {**FOLDER, "classnames": ["dog", "cat", "owl"]}}, [ZERO_SHOT])
    expect_error(suite, "datasets.pets.classnames", "another order")


def test_an_unreadable_image_is_named(eval_tiny_set):
    (eval_tiny_set / "folder" / "dog" / "1.png").write_bytes(b"not a png")
    suite = write_suite(eval_tiny_set, {"pets": FOLDER}, [ZERO_SHOT])
    with pytest.raises(ValueError, match=r"dog/1\.png"):
        main(["--model", "vlp-tiny-32", "--suite", str(suite), "--no-cache", "--workers", "0",
              "--out", str(eval_tiny_set / "out")])


def test_wds_classnames_that_do_not_match_the_labels(eval_tiny_set, eval_no_model):
    (eval_tiny_set / "wds" / "classnames.txt").write_text("cat\ndog\n")
    suite = write_suite(eval_tiny_set, {"pets": {"format": "wds", "path": "wds"}}, [ZERO_SHOT])
    expect_error(suite, str(eval_tiny_set / "wds" / "classnames.txt"), "labels", "run from 0 to 2")


def test_wds_missing_shard_count_and_task_kind(eval_tiny_set, eval_no_model):
    suite = write_suite(eval_tiny_set, {"pets": {"format": "wds", "path": "wds", "split": "train"}}, [ZERO_SHOT])
    expect_error(suite, str(eval_tiny_set / "wds" / "train" / "nshards.txt"))
    suite = write_suite(eval_tiny_set, {"pets": {"format": "wds", "path": "wds"}},
                        [{"dataset": "pets", "task": "zeroshot_retrieval"}])
    expect_error(suite, "tasks[0]", "needs a retrieval dataset")


def test_templates_without_placeholder_and_missing_templates(eval_tiny_set, eval_no_model):
    suite = write_suite(eval_tiny_set, {"pets": {**FOLDER, "templates": ["a photo."]}}, [ZERO_SHOT])
    expect_error(suite, "datasets.pets.templates", "no {c} placeholder")
    suite = write_suite(eval_tiny_set, {"pets": {"format": "folder", "path": "folder"}}, [ZERO_SHOT])
    expect_error(suite, "tasks[0]", "no prompt templates")


def test_unknown_suite_name():
    with pytest.raises(SuiteError, match="no suite 'nope'"):
        load_suite("nope")


def test_registry():
    assert len(prompts.registry_list("imagenet1k", "classnames")) == 1000
    templates = prompts.registry_list("imagenet1k", "templates")
    assert len(templates) == 80 and templates[0] == "a bad photo of a {c}."
    cifar100 = prompts.registry_list("cifar100", "classnames")
    assert len(cifar100) == 100 == len(set(cifar100)) and cifar100 == sorted(cifar100)
    assert prompts.registry_list("cifar100", "templates") == prompts.registry_list("cifar10", "templates")
    assert len(prompts.registry_list("cifar10", "templates")) == 18
    assert prompts.registry_list("mnist", "classnames") == [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def eval_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval_weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model("vlp-tiny-32").state_dict().items()}, path)
    return path


def test_model_specs(eval_weights, tmp_path):
    by_spec = load_model(f"vlp-tiny-32:{eval_weights}")
    by_file = load_model(str(eval_weights), model_name="vlp-tiny-32")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000010").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\nmodel:\n  name: vlp-tiny-32\n")
    (run / "checkpoints" / "step-0000010" / "model.safetensors").write_bytes(eval_weights.read_bytes())
    (run / "checkpoints" / "latest").write_text("step-0000010\n")
    by_run = load_model(str(run))
    assert by_spec.identity == by_file.identity == by_run.identity
    assert by_spec.preprocess.size == 32
    texts = ["a photo of a cat.", "a dog"]
    assert torch.equal(by_spec.encode_text(texts), by_run.encode_text(texts))
    other = load_model("vlp-tiny-32")  # random weights: another identity, so no cached feature is reused
    assert other.identity != by_spec.identity
    with pytest.raises(ModelSpecError, match="--model-name"):
        load_model(str(eval_weights))
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model("vlp-tiny-32:/nowhere/model.safetensors")
    with pytest.raises(ModelSpecError, match="vlp-tiny-64"):
        load_model(str(eval_weights), model_name="vlp-tiny-64")
    junk = tmp_path / "junk.pt"  # not a torch file: an error that names it, not a hint to unpickle it unsafely
    junk.write_text("not a checkpoint")
    with pytest.raises(ModelSpecError, match="junk.pt"):
        load_model(f"vlp-tiny-32:{junk}")


@pytest.mark.parametrize("suite", sorted(p.stem for p in (REPO / "eval" / "suites").glob("*.yaml")))
def test_every_shipped_suite_validates(suite):
    """Architecture guard: every suite in eval/suites loads and passes validation (no model involved)."""
    text = (REPO / "eval" / "suites" / f"{suite}.yaml").read_text()
    if "shared/data" in text:
        shared_data()
    loaded = load_suite(suite)
    assert loaded.entries and all(e.dataset.kind in e.evaluator.needs for e in loaded.entries)


def test_shipped_suites_cover_every_task():
    shared_data()
    for name in ("shared", "smoke"):
        suite = load_suite(name)
        assert {e.evaluator.task for e in suite.entries} == {"zeroshot_classification", "zeroshot_retrieval",
                                                             "person_retrieval", "linear_probe"}
    shared = load_suite("shared")
    assert shared.datasets["cifar10"].classnames == prompts.registry_list("cifar10", "classnames")


def test_smoke_suite_from_the_cli(eval_weights, tmp_path):
    shared_data()
    out = tmp_path / "out"
    args = ["--model", f"vlp-tiny-32:{eval_weights}", "--suite", "smoke", "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--batch-size", "128", "--workers", "0", "--plot"]
    assert main(args) == 0
    cifar = json.loads((out / "cifar10__zeroshot_classification.json").read_text())
    assert cifar["dataset"] == "cifar10" and cifar["task"] == "zeroshot_classification"
    assert cifar["model"] == "vlp-tiny-32" and cifar["pretrained"] == str(eval_weights.resolve())
    assert set(cifar["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall"} and cifar["metrics"]["images"] == 200
    flickr = json.loads((out / "flickr8k__zeroshot_retrieval.json").read_text())["metrics"]
    assert (flickr["images"], flickr["texts"]) == (100, 500)
    assert {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} <= set(flickr)
    person = json.loads((out / "pedestrians__person_retrieval.json").read_text())
    assert person["metrics"]["gallery"] == 181 and person["metrics"]["image_to_image_queries"] == 28
    assert "own image" in person["protocol"]
    probe = json.loads((out / "cifar10__linear_probe.json").read_text())["metrics"]
    assert probe["train_images"] == 200 and probe["test_images"] == 200
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["dataset"] for r in rows] == ["cifar10", "flickr8k", "pedestrians", "cifar10", "average"]
    mains = [float(r["value"]) for r in rows[:-1]]
    assert math.isclose(float(rows[-1]["value"]), sum(mains) / len(mains))
    assert "average" in (out / "summary.md").read_text() and (out / "summary.png").stat().st_size > 1000
    # a second run reads every embedding from the cache and gives the same figures
    assert main([*args[:-1], "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "cifar10__zeroshot_classification.json").read_text())
    assert again["metrics"] == cifar["metrics"]
