"""Captions and class labels in one batch (Saito et al. 2023): label data as prompts, weighted mixing in memory,
label-aware targets (UniCL), and a prefix model's evaluation with the text kind recorded."""
from __future__ import annotations

import json
from collections import Counter

import open_clip
import pytest
import torch

from conftest import REPO, make_sample, write_tar
from vlp.config import label_prompts
from vlp.data import Loader, ShardStream, Source, StreamOptions
from vlp.data.memory import MemoryLoader
from vlp.data.preprocess import ImageOptions
from vlp.objectives import build_objective
from vlp.objectives.group import group_targets

CIFAR = label_prompts("cifar10", "test")


def labelled(root, n: int, offset: int = 0, prefix: str = "s") -> str:
    root.mkdir(parents=True, exist_ok=True)
    write_tar(root / "00000.tar", [make_sample(f"{prefix}{i:04d}", offset + i, label=i % 10) for i in range(n)])
    return str(root / "00000.tar")


def options(**kw) -> StreamOptions:
    base = dict(batch_size=4, shuffle_buffer=8, seed=3, image=ImageOptions(size=32, train=True))
    return StreamOptions(**{**base, **kw})


@pytest.mark.parametrize("in_memory", [False, True])
def test_label_data_becomes_a_prompt_of_its_class_drawn_per_step(tmp_path, in_memory):
    shards = labelled(tmp_path / "cifar", 20)
    source = [Source(shards, prompts=CIFAR)]
    tokenizer = open_clip.get_tokenizer("vlp-tiny-32")
    drawn = Counter()
    for epoch in range(3):
        if in_memory:
            loader = MemoryLoader(source, options(), tokenizer)
        else:
            loader = Loader(ShardStream(source, options(), tokenizer), workers=0)
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch["kind"] == ["label"] * len(batch["kind"])
            for caption, label in zip(batch["caption"], batch["label"].tolist()):
                assert caption in CIFAR.texts(label), (caption, label)  # "a photo of a bird." for label 2
                drawn[CIFAR.texts(label).index(caption)] += 1
            assert torch.equal(batch["text"], tokenizer(batch["caption"]))
    assert sum(drawn.values()) == 60 and len(drawn) >= 10  # 18 templates, drawn anew per sample and step


def test_in_memory_mixing_follows_the_weights_and_goes_through_each_source_before_repeating(tmp_path):
    a = labelled(tmp_path / "a", 10, prefix="a")
    b = labelled(tmp_path / "b", 6, offset=100, prefix="b")
    sources = [Source(a, weight=3.0), Source(b, weight=1.0, prompts=CIFAR)]
    tokenizer = open_clip.get_tokenizer("vlp-tiny-32")
    loader = MemoryLoader(sources, options(samples_per_epoch=8), tokenizer)
    assert loader.batches_per_epoch() == 2
    seen = {0: [], 1: []}
    for epoch in range(5):
        loader.set_epoch(epoch)
        keys = [(src, key) for batch in loader for src, key in zip(batch["source"].tolist(), batch["key"])]
        assert Counter(src for src, _ in keys) == {0: 6, 1: 2}  # 8 x 3/4 and 8 x 1/4, every epoch
        for src, key in keys:
            seen[src].append(key)
    # source a: 10 samples, 6 per epoch, so 5 epochs are 3 whole passes, each sample 3 times; source b: 6 samples,
    # 2 per epoch, its first 3 epochs one pass
    assert set(Counter(seen[0]).values()) == {3} and len(Counter(seen[0])) == 10
    assert len(set(seen[1][:6])) == 6
    # resumed mid-epoch: the same batches as an uninterrupted loader
    loader.set_epoch(2)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    rest = next(batches)
    resumed = MemoryLoader(sources, options(samples_per_epoch=8), tokenizer)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert again["key"] == rest["key"] and torch.equal(again["image"], rest["image"])
    assert torch.equal(again["text"], rest["text"])


def test_mixing_in_memory_needs_an_epoch_length(tmp_path):
    a, b = labelled(tmp_path / "a", 4), labelled(tmp_path / "b", 4)
    with pytest.raises(ValueError, match="data.samples_per_epoch"):
        MemoryLoader([Source(a), Source(b)], options(), open_clip.get_tokenizer("vlp-tiny-32"))


def test_group_targets_make_every_sample_of_a_class_a_positive_and_captions_their_own():
    groups = torch.tensor([3, -1, 3, 5, -1])  # two images of class 3, two caption pairs, one of class 5
    targets = group_targets(groups)
    assert torch.equal(targets[0], torch.tensor([0.5, 0, 0.5, 0, 0]))  # both class-3 texts
    assert torch.equal(targets[2], targets[0])
    assert torch.equal(targets[1], torch.tensor([0.0, 1, 0, 0, 0]))  # a caption: its own text only
    assert torch.equal(targets[3], torch.tensor([0.0, 0, 0, 1, 0]))


def test_group_contrast_is_clip_without_groups_and_pulls_a_class_together():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    out = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)}
    clip, _ = build_objective("clip", {})(out, {})
    group = build_objective("group_contrast", {})
    assert torch.allclose(group(out, {"label": torch.full((6,), -1)})[0], clip, atol=1e-6)
    # two samples of one class whose texts are swapped: CLIP counts them wrong, the group target does not
    swapped = {**out, "text_features": text[[1, 0, 2, 3, 4, 5]]}
    same_class = torch.tensor([7, 7, -1, -1, -1, -1])
    assert group(swapped, {"label": same_class})[0] < build_objective("clip", {})(swapped, {})[0] - 0.1
    logits = 10.0 * image @ text[[1, 0, 2, 3, 4, 5]].T  # the loss by hand: row 0 targets texts 0 and 1 equally
    targets = group_targets(same_class)
    expected = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean())
    assert torch.allclose(group(swapped, {"label": same_class})[0], expected / 2, atol=1e-6)


def test_a_mixed_prefix_run_evaluates_with_the_kind_the_suite_or_cli_asks_and_records_it(tmp_path):
    import yaml

    from vlp.config import load_experiment
    from vlp.eval.cli import main as eval_main
    from vlp.train.loop import Trainer

    exp = load_experiment(REPO / "configs" / "prefix-mixed.yaml", smoke=True)
    trainer = Trainer(exp, tmp_path / "run")
    trainer.train()
    kinds = Counter()
    trainer.loader.set_epoch(1)
    for batch in trainer.loader:
        kinds.update(batch["kind"])
    assert set(kinds) == {"caption", "label"} and abs(kinds["caption"] - kinds["label"]) <= 2  # weights 1:1
    suite = yaml.safe_load((REPO / "eval" / "suites" / "digits.yaml").read_text())
    (tmp_path / "digits-label.yaml").write_text(yaml.safe_dump({**suite, "text_kind": "label"}))
    runs = {}
    for name, args in (("default", ["--suite", "digits"]), ("suite", ["--suite", str(tmp_path / "digits-label.yaml")]),
                       ("cli", ["--suite", "digits", "--text-kind", "label"])):
        out = tmp_path / name
        assert eval_main(["--model", str(tmp_path / "run"), *args, "--no-cache", "--workers", "0",
                          "--out", str(out)]) == 0
        runs[name] = json.loads((out / "digits__zeroshot_classification.json").read_text())
    assert runs["default"]["text_kind"] == "caption"
    assert runs["suite"]["text_kind"] == runs["cli"]["text_kind"] == "label"
    assert runs["suite"]["metrics"] == runs["cli"]["metrics"]
