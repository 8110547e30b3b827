"""Parity with CLIP_benchmark: on the same embeddings vlp's figures equal clip_benchmark's to 1e-6.

clip-benchmark 1.6.2 is installed (without its dependencies) with numpy < 2.4 and requests (which its dataset
builder imports) into ``.cache/clip_benchmark`` (git-ignored): its ``accuracy()`` fails on numpy 2.4 (``float()`` of
a 1-element array), so it runs in a subprocess with that folder first on PYTHONPATH, and the main environment keeps
its numpy. pip takes them from its configured index (a local one works offline); where none answers the tests skip
and say so.

Two levels are compared:
- metric functions on the same logits / scores (random cases, several class counts, unbalanced labels);
- whole evaluators: vlp reads fabricated image files whose colour encodes an index, a lookup model maps the index
  (and every prompt or caption) to a fixed random embedding, and clip_benchmark's own ``evaluate`` gets the same
  embeddings through a dataloader of indices. This covers the prompt ensemble and the caption bookkeeping too.
- non-square images end to end: a random open_clip model on the pedestrian crops and on odd-shaped generated
  images in CLIP_benchmark's wds layout, read by clip_benchmark's own loader and open_clip's transform on one side
  and by vlp with exact decoding on the other.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.eval.features import FeatureOptions, FeatureStore
from vlp.eval.images import LoadOptions
from vlp.eval.metrics import classification_metrics
from vlp.eval.models import EvalModel, Preprocess
from vlp.eval.suite import load_suite, run_suite

REPO = Path(__file__).resolve().parents[1]
CB_VERSION = "1.6.2"
# requests and what it needs: clip_benchmark.datasets.builder imports it (for downloads the tests never make)
CB_PACKAGES = [f"clip-benchmark=={CB_VERSION}", "numpy<2.4", "requests", "urllib3", "idna", "charset-normalizer",
               "certifi"]
CB_DIR = REPO / ".cache" / "clip_benchmark"

REFERENCE = r'''
import json, math, sys
import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from clip_benchmark.metrics import zeroshot_classification as zc, zeroshot_retrieval as zr

work = sys.argv[1]
spec = json.load(open(f"{work}/spec.json"))
arrays = np.load(f"{work}/arrays.npz")
out = {"numpy": np.__version__, "metric_cases": []}

for i, classes in enumerate(spec["metric_cases"]):
    logits, target = torch.from_numpy(arrays[f"logits{i}"]), torch.from_numpy(arrays[f"target{i}"])
    if classes >= 5:  # as zeroshot_classification.evaluate does
        acc1, acc5 = zc.accuracy(logits, target, topk=(1, 5))
    else:
        (acc1,), acc5 = zc.accuracy(logits, target, topk=(1,)), float("nan")
    mpcr = balanced_accuracy_score(target, logits.argmax(axis=1))
    out["metric_cases"].append({"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mpcr})

class Lookup(torch.nn.Module):
    def __init__(self, images, texts):
        super().__init__()
        self.images, self.texts = images, texts
    def encode_image(self, index):
        return self.images[index]
    def encode_text(self, index):
        return self.texts[index]

vocab = {t: i for i, t in enumerate(spec["texts"])}
tokenizer = lambda batch: torch.tensor([vocab[t] for t in batch])
model = Lookup(torch.from_numpy(arrays["image_table"]), torch.from_numpy(arrays["text_table"]))

c = spec["classification"]
dataset = torch.utils.data.TensorDataset(torch.tensor(c["image_index"]), torch.tensor(c["labels"]))
dataset.classes = c["classnames"]
loader = torch.utils.data.DataLoader(dataset, batch_size=37)
out["classification"] = zc.evaluate(model, loader, tokenizer, c["classnames"], c["templates"], "cpu", amp=False)

r = spec["retrieval"]
batches = [(torch.tensor(r["image_index"][s:s + 16]), r["captions"][s:s + 16])
           for s in range(0, len(r["captions"]), 16)]
out["retrieval"] = zr.evaluate(model, batches, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
json.dump(out, open(f"{work}/reference.json", "w"), default=float)
'''


@pytest.fixture(scope="session")
def eval_clip_benchmark() -> Path:
    """clip-benchmark + numpy<2.4 + requests in a folder of their own (installed once, atomically)."""
    marker = CB_DIR / f".installed-{CB_VERSION}-{len(CB_PACKAGES)}"
    if marker.exists():
        return CB_DIR
    partial = CB_DIR.with_name(f".clip_benchmark.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--no-deps", "--target", str(partial), *CB_PACKAGES],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("installing clip-benchmark for the parity tests timed out (no network?)")
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        pytest.skip(f"clip-benchmark=={CB_VERSION} could not be installed for the parity tests (no network?): "
                    f"{proc.stderr.strip()[-400:]}")
    (partial / marker.name).touch()
    shutil.rmtree(CB_DIR, ignore_errors=True)
    os.replace(partial, CB_DIR)
    return CB_DIR


def colour_png(path: Path, index: int, red: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (red, index // 256, index % 256)).save(path)


class Lookup(EvalModel):
    """vlp's side of the lookup model: the image index comes back from the pixels."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor, texts: list[str]):
        super().__init__(identity="lookup", preprocess=Preprocess(12, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
        self.image_table, self.text_table = image_table, text_table
        self.vocab = {t: i for i, t in enumerate(texts)}

    def encode_image(self, images):
        rgb = (images[:, :, 6, 6] * 255).round().long()
        return self.image_table[rgb[:, 1] * 256 + rgb[:, 2]]

    def encode_text(self, texts):
        return self.text_table[torch.tensor([self.vocab[t] for t in texts])]


def metric_cases(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    cases = []
    for classes, n in ((3, 50), (5, 80), (10, 500), (37, 300), (100, 1000)):
        logits = rng.standard_normal((n, classes)).astype(np.float32)
        # unbalanced labels, some classes absent, and a bias so that top-1 is neither 0 nor 1
        target = np.minimum(rng.geometric(0.15, n) - 1, classes - 1).astype(np.int64)
        logits[np.arange(n), target] += 1.0
        cases.append((logits, target))
    return cases


@pytest.fixture(scope="module")
def eval_parity(tmp_path_factory, eval_clip_benchmark):
    work = tmp_path_factory.mktemp("eval_parity")
    rng = np.random.default_rng(0)
    classes, per_class, templates = 10, 15, ["a photo of a {c}.", "a blurry photo of the {c}.", "{c}", "art of {c}"]
    classnames = [f"thing {c}" for c in range(classes)]
    images = 60
    captions = [[f"image {i} caption {j}" for j in range(5)] for i in range(images)]
    texts = [t.format(c=c) for c in classnames for t in templates] + [t for cs in captions for t in cs]
    image_table = rng.standard_normal((classes * per_class + images, 16)).astype(np.float32)
    text_table = rng.standard_normal((len(texts), 16)).astype(np.float32)

    cls_index, labels = [], []
    for c in range(classes):
        for j in range(per_class):
            index = c * per_class + j
            colour_png(work / "cls" / f"class{c:02d}" / f"{j:03d}.png", index, red=c)
            cls_index.append(index)
            labels.append(c)
    lines = ["image,caption"]
    for i in range(images):
        colour_png(work / "ret" / f"{i:03d}.png", classes * per_class + i)
        lines += [f"{i:03d}.png,{c}" for c in captions[i]]
    (work / "captions.txt").write_text("\n".join(lines) + "\n")

    cases = metric_cases(rng)
    spec = {"metric_cases": [logits.shape[1] for logits, _ in cases], "texts": texts,
            "classification": {"image_index": cls_index, "labels": labels, "classnames": classnames,
                               "templates": templates},
            "retrieval": {"image_index": list(range(classes * per_class, classes * per_class + images)),
                          "captions": captions}}
    (work / "spec.json").write_text(json.dumps(spec))
    arrays = {f"logits{i}": logits for i, (logits, _) in enumerate(cases)}
    arrays.update({f"target{i}": target for i, (_, target) in enumerate(cases)})
    np.savez(work / "arrays.npz", image_table=image_table, text_table=text_table, **arrays)
    (work / "reference.py").write_text(REFERENCE)
    env = {**os.environ, "PYTHONPATH": str(eval_clip_benchmark)}
    proc = subprocess.run([sys.executable, str(work / "reference.py"), str(work)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads((work / "reference.json").read_text())

    suite = {"name": "parity", "data_root": str(work), "tasks": [
        {"dataset": "cls", "task": "zeroshot_classification"},
        {"dataset": "ret", "task": "zeroshot_retrieval", "options": {"recall_k": [1, 5, 10]}}],
        "datasets": {"cls": {"format": "folder", "path": "cls", "classnames": classnames, "templates": templates},
                     "ret": {"format": "captions", "images": "ret", "captions": "captions.txt"}}}
    (work / "suite.yaml").write_text(json.dumps(suite))
    model = Lookup(torch.from_numpy(image_table), torch.from_numpy(text_table), texts)
    store = FeatureStore(model, FeatureOptions(load=LoadOptions(batch_size=32, workers=0), progress=False))
    ours = [r.metrics for r in run_suite(load_suite(str(work / "suite.yaml")), store)]
    return {"reference": reference, "ours": ours, "cases": cases}


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


def test_reference_runs_on_numpy_below_2_4(eval_parity):
    major, minor = (int(x) for x in eval_parity["reference"]["numpy"].split(".")[:2])
    assert (major, minor) < (2, 4)


def test_classification_metric_functions_match(eval_parity):
    for (logits, target), ref in zip(eval_parity["cases"], eval_parity["reference"]["metric_cases"]):
        ours = classification_metrics(torch.from_numpy(logits), torch.from_numpy(target))
        for key in ("acc1", "acc5", "mean_per_class_recall"):
            assert close(ours[key], ref[key]), (logits.shape, key, ours[key], ref[key])


def test_zero_shot_classification_evaluator_matches(eval_parity):
    ours, ref = eval_parity["ours"][0], eval_parity["reference"]["classification"]
    assert set(ref) == {"acc1", "acc5", "mean_per_class_recall"}
    for key in ref:
        assert close(ours[key], ref[key]), (key, ours[key], ref[key])
    assert 0.05 < ours["acc1"] < 0.95  # random embeddings: a figure that a wrong classifier would change


def test_zero_shot_retrieval_evaluator_matches(eval_parity):
    ours, ref = eval_parity["ours"][1], eval_parity["reference"]["retrieval"]
    assert set(ref) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    for key in ref:
        assert close(ours[key], ref[key]), (key, ours[key], ref[key])



def test_registry_prompts_match_clip_benchmark(eval_clip_benchmark):
    """Same prompts, same numbers: the registry's templates (and the class names CLIP_benchmark ships rather
    than reading from torchvision) equal clip_benchmark's English lists."""
    from vlp.eval import prompts

    shipped = eval_clip_benchmark / "clip_benchmark" / "datasets"
    templates = json.loads((shipped / "en_zeroshot_classification_templates.json").read_text())
    classnames = json.loads((shipped / "en_classnames.json").read_text())
    for name in ("cifar10", "cifar100", "mnist", "imagenet1k"):
        assert prompts.registry_list(name, "templates") == templates[name], name
    for name in ("mnist", "imagenet1k"):
        assert prompts.registry_list(name, "classnames") == classnames[name], name


# -- non-square images, real model, CLIP_benchmark's own loaders ------------------------------------------------
NONSQUARE_REFERENCE = r'''
import json, sys
import numpy as np
import torch
import vlp.models  # registers vlp-tiny-64 with open_clip
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import zeroshot_classification as zc, zeroshot_retrieval as zr
from clip_benchmark.models import load_clip

work, weights = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
model, transform, tokenizer = load_clip("open_clip", "vlp-tiny-64", pretrained=weights, cache_dir=None, device="cpu")
model.eval()
out = {}
for name, task in (("wds_people", "zeroshot_classification"), ("wds_odd", "zeroshot_retrieval")):
    dataset = build_dataset(f"wds/{name}", root=f"{work}/{name}", transform=transform, split="test", task=task)
    loader = torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, shuffle=False, num_workers=0)
    if task == "zeroshot_classification":
        metrics = zc.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)
    else:
        metrics = zr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 2, 5])
    with torch.no_grad():  # order-free check of the pixels: the sum of the raw image embeddings
        total = sum(model.encode_image(images).double().sum(0) for images, _ in loader)
    out[name] = {"metrics": metrics, "embedding_sum": total.tolist()}
json.dump(out, open(f"{work}/reference.json", "w"), default=float)
'''


def odd_shaped_retrieval_set(root: Path) -> tuple[Path, Path]:
    """16 generated images from 9x31 to 400x150, PNG and JPEG; JPEGs with a shorter side of 128 or more are the
    ones vlp's default decode drafts at input 64. Two captions each."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from generated_images import encode, photo

    shapes = [(9, 31), (48, 128), (128, 48), (300, 101), (101, 300), (400, 150), (150, 400), (261, 199)]
    lines = ["image,caption"]
    for i, (width, height) in enumerate(shapes * 2):
        img = Image.fromarray(photo(width, height, seed=i)[:, ::(-1) ** i])
        name = f"{i:02d}.{'jpg' if i % 2 else 'png'}"
        (root / "odd").mkdir(parents=True, exist_ok=True)
        (root / "odd" / name).write_bytes(encode(img, "JPEG", quality=90) if i % 2 else encode(img, "PNG"))
        lines += [f"{name},picture {i} of {width} by {height}", f"{name},image number {i}"]
    (root / "odd_captions.txt").write_text("\n".join(lines) + "\n")
    return root / "odd", root / "odd_captions.txt"


@pytest.fixture(scope="module")
def nonsquare_parity(tmp_path_factory, eval_clip_benchmark):
    """A random vlp-tiny-64 (seed 0) on the pedestrian crops (48x128, the first 5 people of val/all_imgs as
    classes) and on odd-shaped generated images, both written in CLIP_benchmark's wds layout; clip_benchmark reads
    them with its own loader and open_clip's transform, vlp with ``--exact-decode`` (and, for the generated set,
    with its default drafted decode)."""
    import open_clip

    import vlp.models  # noqa: F401 - registers vlp-tiny-64
    from vlp.eval import wds_layout
    from vlp.eval.models import load_model

    people = REPO.parent / "shared" / "data" / "pedestrians" / "val" / "all_imgs"
    if not people.exists():
        pytest.skip(f"real data not available: {people} is absent")
    work = tmp_path_factory.mktemp("nonsquare_parity")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("vlp-tiny-64").state_dict(), work / "weights.pt")
    persons = sorted(p for p in people.iterdir() if p.is_dir())[:5]
    for person in persons:
        shutil.copytree(person, work / "people" / person.name)
    classnames = [f"pedestrian {p.name}" for p in persons]
    templates = ["a photo of {c}.", "{c} walking.", "a low resolution photo of {c}."]
    wds_layout.write_classification(work / "people", work / "wds_people", "test", classnames=classnames,
                                    templates=templates, samples_per_shard=50, progress=False)
    images, captions = odd_shaped_retrieval_set(work)
    wds_layout.write_retrieval(images, captions, work / "wds_odd", "test", samples_per_shard=10, progress=False)

    (work / "reference.py").write_text(NONSQUARE_REFERENCE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(eval_clip_benchmark), str(REPO)])}
    proc = subprocess.run([sys.executable, str(work / "reference.py"), str(work), str(work / "weights.pt")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads((work / "reference.json").read_text())

    suite = {"name": "nonsquare", "data_root": str(work), "datasets": {
        "wds_people": {"format": "wds", "path": "wds_people"}, "wds_odd": {"format": "wds", "path": "wds_odd"}},
        "tasks": [{"dataset": "wds_people", "task": "zeroshot_classification"},
                  {"dataset": "wds_odd", "task": "zeroshot_retrieval", "options": {"recall_k": [1, 2, 5]}}]}
    (work / "suite.yaml").write_text(json.dumps(suite))
    loaded = load_suite(str(work / "suite.yaml"))
    model = load_model(f"vlp-tiny-64:{work / 'weights.pt'}")
    store = FeatureStore(model, FeatureOptions(load=LoadOptions(batch_size=32, workers=0, fast_decode=False),
                                               progress=False))
    exact = {r.entry.dataset.name: {"metrics": r.metrics, "embedding_sum": store.images(
        r.entry.dataset.image_set()).features.double().sum(0)} for r in run_suite(loaded, store)}
    drafting = FeatureStore(model, FeatureOptions(load=LoadOptions(batch_size=32, workers=0), progress=False))
    fast = drafting.images(loaded.datasets["wds_odd"].image_set()).features.double().sum(0)
    return {"reference": reference, "exact": exact, "fast_odd_embedding_sum": fast}


@pytest.mark.slow  # about 20 s on 2 busy cores, half of it the reference's imports
@pytest.mark.parametrize("name", ["wds_people", "wds_odd"])
def test_non_square_images_give_clip_benchmarks_figures_with_exact_decode(nonsquare_parity, name):
    ref, ours = nonsquare_parity["reference"][name], nonsquare_parity["exact"][name]
    assert ref["metrics"], name
    for key, value in ref["metrics"].items():
        assert close(ours["metrics"][key], value), (name, key, ours["metrics"][key], value)
    theirs = torch.tensor(ref["embedding_sum"], dtype=torch.float64)
    assert torch.allclose(ours["embedding_sum"], theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.slow
def test_the_non_square_check_sees_drafted_pixels(nonsquare_parity):
    """The generated set holds large JPEGs: vlp's default (drafted) decode gives other embeddings there, which the
    embedding sum shows beyond the tolerance the parity check allows."""
    exact, fast = nonsquare_parity["exact"]["wds_odd"]["embedding_sum"], nonsquare_parity["fast_odd_embedding_sum"]
    assert (fast - exact).abs().max().item() > 1e-4 * exact.abs().max().item()
