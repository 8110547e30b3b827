"""PLIP's identity-level pretraining: P x K batches, attributes in the batch, the attribute and colorization
objectives and parts, identity contrast, text queries from pseudo-captions, and their config checks."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import make_sample, write_tar
from vlp.config import ConfigError, experiment_from_dict
from vlp.data import StreamOptions
from vlp.data.batch import attribute_ids
from vlp.data.memory import MemoryLoader, identity_order
from vlp.data.preprocess import ImageOptions
from vlp.models.parts import Colorizer, TowerSpec
from vlp.objectives import build_objective
from vlp.objectives.group import group_targets

COLORS = ["black", "white", "red", "blue"]
VOCAB = {"upper_color": COLORS, "lower_color": COLORS}


# -- P x K batches ---------------------------------------------------------------------------------------------
def test_identity_batches_hold_p_distinct_identities_of_k_rows_and_every_row_once_or_more():
    identities = [i // 5 for i in range(40)] + [8, 8] + [-1, -1]  # 8 people x 5 rows, one with 2, two unlabelled
    batches = identity_order(identities, p=3, k=4, seed=0, epoch=0)
    assert batches, "an epoch has batches"
    seen = Counter()
    for batch in batches:
        assert len(batch) == 12
        people = [identities[r] for r in batch]
        groups = [people[i:i + 4] for i in range(0, 12, 4)]
        assert all(len(set(g)) == 1 for g in groups), groups  # K rows of one identity, identity-major
        assert len({g[0] for g in groups}) == 3  # P distinct identities: never one identity alone
        seen.update(batch)
    assert identities[42] == -1 and 42 not in seen and 43 not in seen
    # 8 identities x 2 groups (5 rows: 4 + 1 topped up) + 1 (2 rows + 2 repeats) = 17 groups: 5 batches and a
    # sixth of the 2 groups left, filled up with a fresh group of another identity
    assert len(batches) == 6
    assert set(seen) == set(range(42)), "every row with an identity is seen in the epoch"
    assert sum(seen.values()) == 72


def test_identity_batches_are_seeded_by_epoch_and_repeatable():
    identities = [i // 4 for i in range(64)]
    a = identity_order(identities, 4, 4, seed=1, epoch=3)
    assert a == identity_order(identities, 4, 4, seed=1, epoch=3)
    assert a != identity_order(identities, 4, 4, seed=1, epoch=4)
    assert a != identity_order(identities, 4, 4, seed=2, epoch=3)


def person_shards(root, people: int = 6, per_person: int = 4):
    """Identity samples with attributes: person p wears COLORS[p % 4] on top and COLORS[(p + 1) % 4] below."""
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for p in range(people):
        for j in range(per_person):
            n = p * per_person + j
            attributes = {"upper_color": COLORS[p % 4], "lower_color": COLORS[(p + 1) % 4]}
            samples.append(make_sample(f"p{p}_{j}", n, text=f"a person in {COLORS[p % 4]}", identity=p,
                                       kind="identity", attributes=attributes))
    write_tar(root / "00000.tar", samples)
    return str(root / "00000.tar")


def loader(shards, rank=0, world=1, **kw):
    import open_clip

    opts = StreamOptions(batch_size=8, seed=0, image=ImageOptions(size=32, scale=(1.0, 1.0)), shuffle_buffer=100,
                         identity_batches=(2, 4), attributes=VOCAB, **kw)
    return MemoryLoader(shards, opts, open_clip.get_tokenizer("vlp-tiny-32"), rank, world)


def test_the_memory_loader_makes_identity_batches_resumes_exactly_and_splits_ranks(tmp_path):
    shards = person_shards(tmp_path / "shards")
    first = loader(shards)
    it = iter(first)
    b0 = next(it)
    assert b0["identity"].tolist()[:4] == [b0["identity"][0].item()] * 4 and len(set(b0["identity"].tolist())) == 2
    people = b0["identity"]
    assert b0["attributes"].tolist() == [[p % 4, (p + 1) % 4] for p in people.tolist()]
    state = first.state_dict()
    rest = [b["uid"] for b in it]
    resumed = loader(shards)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [b["uid"] for b in resumed] == rest, "a resumed loader continues with exactly the batches that were next"
    assert sorted(u for b in [b0["uid"], *rest] for u in b) == sorted({u for b in [b0["uid"], *rest] for u in b})
    ranks = [[b["uid"] for b in loader(shards, r, 2)] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 1  # 3 batches in the epoch: one each, the third waits
    assert not set(ranks[0][0]) & set(ranks[1][0])


def stream_loader(shards, workers: int, shuffle: int = 0):
    import open_clip

    from vlp.data import Loader, ShardStream

    opts = StreamOptions(batch_size=8, seed=0, image=ImageOptions(size=32), shuffle_buffer=shuffle,
                         identity_batches=(2, 4), attributes=VOCAB)
    stream = ShardStream(shards, opts, open_clip.get_tokenizer("vlp-tiny-32"), rank=0, world_size=1)
    return Loader(stream, workers=workers, lookahead=False)


def test_the_stream_makes_identity_batches_counts_leftovers_and_resumes_exactly(tmp_path):
    from vlp.data.stream import identity_groups

    # 7 people x 4 images and one person with 3: with P=2, K=4 three batches; 4 + 3 images cannot make a fourth
    person_shards(tmp_path / "shards", people=7, per_person=4)
    write_tar(tmp_path / "shards" / "00001.tar", [make_sample(f"q{j}", 100 + j, identity=9, kind="identity")
                                                   for j in range(3)] + [make_sample("anon", 200)])
    spec = str(tmp_path / "shards" / "{00000..00001}.tar")
    loader = stream_loader(spec, workers=0, shuffle=16)
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        ids = b["identity"].tolist()
        assert ids[:4] == [ids[0]] * 4 and ids[4:] == [ids[4]] * 4 and ids[0] != ids[4]
    assert loader.skipped == Counter({"identity_leftover": 7, "no_identity": 1})
    uids = [b["uid"] for b in batches]
    assert len({u for batch in uids for u in batch}) == 24

    again = stream_loader(spec, workers=0, shuffle=16)
    it = iter(again)
    next(it)
    state = json.loads(json.dumps(again.state_dict()))
    resumed = stream_loader(spec, workers=0, shuffle=16)
    resumed.load_state_dict(state)
    assert [b["uid"] for b in resumed] == uids[1:], "a resumed stream continues with exactly the next batch"
    skipped = Counter()
    groups = list(identity_groups(iter([make_sample(f"r{j}", j, identity=j % 3) for j in range(9)]), 3, 2, skipped))
    assert len(groups) == 1 and skipped == Counter({"identity_leftover": 3})  # 3 x 2 batched, one of each left


def test_attribute_ids_index_the_vocabulary_and_mark_unknown_values():
    rows = [{"meta": {"attributes": {"upper_color": "red", "lower_color": "blue"}}},
            {"meta": {"attributes": {"upper_color": "teal"}}}, {"meta": {}}]
    assert attribute_ids(rows, VOCAB).tolist() == [[2, 3], [-1, -1], [-1, -1]]


# -- objectives ---------------------------------------------------------------------------------------------------
def test_two_images_of_one_identity_are_both_positives_of_each_other_and_of_their_texts():
    targets = group_targets(torch.tensor([7, 3, 7, 5]))
    assert targets[0].tolist() == [0.5, 0.0, 0.5, 0.0]  # image 0: its own text and image 2's
    assert targets[2].tolist() == [0.5, 0.0, 0.5, 0.0]
    assert targets[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    objective = build_objective("group_contrast", {"field": "identity"})
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    out = {"image_features": features, "text_features": features, "logit_scale": torch.tensor(10.0)}
    loss, metrics = objective(out, {"identity": torch.tensor([7, 3, 7, 5])})
    assert metrics["positives_per_row"].item() == pytest.approx(1.5)
    swapped = {**out, "text_features": features[[2, 1, 0, 3]]}  # 0 and 2 trade texts: the same identity's
    swapped_loss, _ = objective(swapped, {"identity": torch.tensor([7, 3, 7, 5])})
    assert swapped_loss.item() == pytest.approx(loss.item(), abs=1e-6)


def test_a_masked_slots_target_is_that_slots_value():
    objective = build_objective("attributes", {"head": "attr", "classes": [4, 4]})
    targets = torch.tensor([[2, 3], [0, -1]])
    right = torch.full((2, 8), -20.0)
    right[0, 2] = right[0, 4 + 3] = right[1, 0] = 20.0  # slot 1 of row 1 is unknown: any logits
    loss, metrics = objective({"attr": right}, {"attributes": targets})
    assert loss.item() < 1e-6 and metrics["attr0_acc"] == 1 and metrics["attr1_acc"] == 1
    wrong = right.clone()
    wrong[0, 4 + 3], wrong[0, 4 + 1] = -20.0, 20.0  # row 0 predicts lower_color 1 instead of 3
    loss, metrics = objective({"attr": wrong}, {"attributes": targets})
    assert loss.item() == pytest.approx(40.0 / 2, rel=1e-3)  # slot 1's only known row is wrong by 40 nats; mean of 2
    assert metrics["attr1_acc"] == 0


MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SPEC = TowerSpec(embed_dim=16, text_width=0, context_length=0, image_width=8, mean=MEAN, std=STD)


def normalised(rgb01: torch.Tensor) -> torch.Tensor:
    return (rgb01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_the_colorization_target_of_a_grey_image_is_grey_and_the_tower_sees_grey():
    part = Colorizer(SPEC, "colorizer", resolution=4, width=8)
    grey = torch.rand(2, 1, 16, 16).expand(2, 3, 16, 16)
    copy, target = part.targets(normalised(grey))
    assert target.shape == (2, 2, 4, 4) and target.abs().max() < 1e-5
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    copy, target = part.targets(normalised(red))
    assert target[:, 1].min() > 0.45 and target[:, 0].max() < -0.15  # Cr = 0.5, Cb = -0.169 for pure red
    rgb = copy * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.allclose(rgb, torch.full_like(rgb, 0.299), atol=1e-5)  # the copy: red's luma in every channel
    seen = []

    def tokens(images):
        seen.append(images)
        return torch.randn(images.shape[0], 8, 2, 2)

    out = part({"text_features": torch.randn(1, 16)}, {"image": normalised(red)}, tokens)
    assert out["colorizer"].shape == (1, 2, 4, 4) and torch.equal(seen[0], copy)
    loss, metrics = build_objective("colorize", {})(out, {})
    assert loss.item() == pytest.approx((out["colorizer"] - out["colorizer_target"]).abs().mean().item())


# -- a model with both parts trains, and accumulation agrees ----------------------------------------------------------
PARTS = {"attr": {"type": "attribute_head", "classes": [4, 4]},
         "colorizer": {"type": "colorizer", "resolution": 4, "width": 8}}
OBJECTIVES = [{"name": "group_contrast", "options": {"field": "identity"}},
              {"name": "attributes", "weight": 0.5, "options": {"head": "attr", "classes": [4, 4]}},
              {"name": "colorize", "options": {}}]


def plip_experiment(shards, accum_steps: int, batch: int = 8, **data):
    return experiment_from_dict({
        "name": "plip", "model": {"name": "vlp-tiny-32", "parts": PARTS}, "objectives": OBJECTIVES,
        "data": {"train": [{"shards": shards}], "batch_size": batch, "workers": 0, "in_memory": True,
                 "scale": [1.0, 1.0], "attributes": VOCAB, **data},
        "train": {"max_steps": 1, "log_every": 1, "accum_steps": accum_steps}, "optim": {"clip_grad": None}})


def test_pretext_parts_with_accumulation_equal_one_big_batch(tmp_path):
    from test_distributed import first_step

    shards = person_shards(tmp_path / "shards", people=4, per_person=4)
    _, grads = first_step(plip_experiment(shards, 1, identity_batches=[4, 2]), tmp_path / "pk")
    assert grads["parts.colorizer.reduce.weight"].abs().sum() > 0 and grads["parts.attr.linear.weight"].abs().sum() > 0
    # the same 8 rows in one batch, or in two micro-batches of 4 (a fixed order: no shuffle)
    loss1, grads1 = first_step(plip_experiment(shards, 1, shuffle_buffer=0), tmp_path / "a")
    loss2, grads2 = first_step(plip_experiment(shards, 2, 4, shuffle_buffer=0), tmp_path / "b")
    assert abs(loss1 - loss2) < 1e-5
    for name, grad in grads1.items():
        assert torch.allclose(grads2[name], grad, atol=1e-5, rtol=1e-4), name


# -- config checks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"data": {"identity_batches": [2, 4], "batch_size": 8}}, r"data.identity_batches: .*set train.max_steps"),
    ({"data": {"identity_batches": [2, 4], "batch_size": 8, "resampled": True, "samples_per_epoch": 8},
      "train": {"max_steps": 5}}, r"data.identity_batches: streams in epochs from one source"),
    ({"data": {"identity_batches": [1, 8], "batch_size": 8, "in_memory": True}}, r"P >= 2 identities"),
    ({"data": {"identity_batches": [2, 3], "batch_size": 8, "in_memory": True}}, r"2 x 3 = 6, but data.batch_size"),
    ({"data": {"attributes": {"upper_color": ["red"]}}}, r"data.attributes.upper_color"),
    ({"model": {"parts": {"a": {"type": "attribute_head", "classes": [4, 3]}}}, "data": {"attributes": VOCAB}},
     r"model.parts.a.classes: \[4, 3\] values per slot, but data.attributes lists \[4, 4\]"),
    ({"objectives": [{"name": "attributes", "options": {"classes": [4, 4]}}]}, r"objectives\[0\].options.classes.*"
                                                                              r"no slot"),
    ({"data": {"ratio": [1.0, 0.5]}}, r"data.ratio"),
    ({"model": {"resize_mode": "longest"}}, r"model.resize_mode: 'longest' is not one of"),
    ({"objectives": [{"name": "attributes"}]}, r"objectives.attributes.options.classes: None"),
])
def test_bad_identity_configs_are_errors_naming_the_key(change, message):
    data = {"name": "x", "model": {"name": "vlp-tiny-32"}, "data": {"train": [{"shards": "x.tar"}]}}
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(data)


# -- text queries from pseudo-captions ---------------------------------------------------------------------------------
def test_pseudo_caption_queries_are_the_query_images_attribute_captions_and_get_scored(tmp_path, monkeypatch):
    """The builtin people suite: text->image queries are each query image's pseudo-caption (what the shard writer
    stores as txt), scored beside image->image, and the result counts them."""
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "cache"))
    from vlp.data.attributes import caption_image
    from vlp.eval.features import FeatureStore
    from vlp.eval.models import load_model
    from vlp.eval.suite import load_suite, run_suite

    suite = load_suite("people")
    dataset = suite.datasets["people"]
    queries = dataset.text_queries()
    paths = sorted((dataset.base / "raw/val/query").glob("*/*.png"))
    assert len(queries) == len(paths) == 12  # 6 people x 2 query images
    assert queries == [(p.parent.name, caption_image(p, f"{p.parent.name}/{p.name}")[0][0]) for p in paths]
    (result,) = run_suite(suite, FeatureStore(load_model("vlp-tiny-32")))
    counts = result.entry.evaluator.counts
    assert counts["texts"] == 12 and counts["images"] == 12 + 36
    assert 0.0 <= result.metrics["text_to_image_rank@1"] <= 1.0 and "image_to_image_mAP" in result.metrics
