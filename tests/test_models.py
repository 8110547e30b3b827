"""vlp models: open_clip's CLIP plus parts, the text tower vlp computes (packed, prefixed), the one builder."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from vlp.config import ModelConfig
from vlp.models import build_model, join_state, split_state
from vlp.models.text import encode_packed, encode_padded, packing_plan, shift_tokens

CAPTIONS = ["a dog", "two children play football on a green field next to a red house in the afternoon sun while "
            "their parents watch from a bench", "a man in a red shirt climbs a rock", ""]
PREFIX = {"type": "text_prefix", "kinds": ["caption", "label"], "length": 3}


def tokens(name: str = "vlp-r10t-32-t2", captions=CAPTIONS) -> torch.Tensor:
    return open_clip.get_tokenizer(name)(captions)


def model_of(name="vlp-r10t-32-t2", pack=True, **parts):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, parts=parts), pack_text=pack)


def test_without_parts_the_text_tower_is_open_clips():
    model, plain = model_of(pack=False), model_of(pack=True)
    text = tokens()
    reference = model.clip.encode_text(text)
    assert text.argmax(-1).tolist()[1] == 23  # the long caption is cut: its end-of-text in the last position
    assert torch.equal(model.encode_text(text), reference)  # padded: open_clip's own computation
    packed = plain.encode_text(text)
    assert torch.allclose(packed, reference, atol=1e-5) and not torch.equal(packed, torch.zeros_like(packed))
    reference.square().sum().backward()
    packed.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-4 * q.grad.abs().max() + 1e-7), name


def test_forward_returns_open_clips_outputs_and_heads():
    model = model_of(head={"type": "linear_head", "classes": 5})
    model.eval()
    batch = {"image": torch.randn(4, 3, 32, 32), "text": tokens(), "kind": ["caption"] * 4}
    out = model(model.prepare(batch))
    reference = model.clip.eval()(batch["image"], batch["text"])
    image, text = reference[:2] if isinstance(reference, tuple) else (reference["image_features"],
                                                                      reference["text_features"])
    assert torch.allclose(out["image_features"], image, atol=1e-6)
    assert torch.allclose(out["text_features"], text, atol=1e-5)
    assert torch.equal(out["logit_scale"], model.clip.logit_scale.exp())
    assert out["head"].shape == (4, 5)
    assert torch.equal(out["head"], model.parts["head"].linear(out["image_features"]))
    assert model.merge_rules["head"] == "rows" and model.merge_rules["logit_scale"] == "shared"


def test_shifting_for_a_prefix_keeps_the_start_and_end_of_text_tokens():
    text = tokens()
    shifted = shift_tokens(text, 3)
    last = text.argmax(-1)
    for i in range(len(CAPTIONS)):
        assert shifted[i, 0] == text[i, 0] and (shifted[i, 1:4] == 0).all()
        if last[i] + 3 < text.shape[1]:  # fits: every token moves 3 places
            assert torch.equal(shifted[i, 4:last[i] + 4], text[i, 1:last[i] + 1])
        else:  # cut: the first words stay, the end-of-text token takes the last position
            assert torch.equal(shifted[i, 4:-1], text[i, 1:text.shape[1] - 4])
            assert shifted[i, -1] == text[i, last[i]]
        assert shifted[i].argmax() == min(last[i] + 3, text.shape[1] - 1)


def test_the_prefix_conditions_the_text_and_packed_equals_padded():
    padded, packed = model_of(pack=False, prefix=PREFIX), model_of(pack=True, prefix=PREFIX)
    assert packed.packed and not padded.packed
    text = tokens()
    caption, label = padded.encode_text(text), padded.encode_text(text, kind="label")
    assert torch.equal(caption, padded.encode_text(text, kind="caption"))  # the first kind is the default
    assert (caption - label).norm(dim=-1).min() > 1e-3  # every caption's embedding moves with the kind
    assert torch.allclose(packed.encode_text(text, kind="label"), label, atol=1e-5)
    # the prefix is more than shifted tokens: without its vectors (zeros) the embedding differs
    with torch.no_grad():
        zeroed = copy.deepcopy(padded)
        zeroed.parts["prefix"].vectors.zero_()
    assert (zeroed.encode_text(text) - caption).norm(dim=-1).min() > 1e-3
    with pytest.raises(ValueError, match="text kind 'prompt' has no prefix"):
        padded.encode_text(text, kind="prompt")


def test_a_packing_plan_from_the_host_is_the_one_used():
    model = model_of()
    text = tokens(captions=["a dog", "a man in a red shirt climbs a rock", "two cats"])
    reference = encode_packed(model.clip, text)
    assert torch.equal(encode_packed(model.clip, text, packing_plan(text)), reference)
    # another batch's plan (the captions' lengths rolled) is used as given, so the result changes
    assert not torch.allclose(encode_packed(model.clip, text, packing_plan(text.roll(1, 0))), reference, atol=1e-3)


def test_packed_gradients_are_repeatable_on_several_threads():
    """A gather with repeated indices accumulates its gradient in a thread-dependent order; the packed tower reads
    each row once, so two backward passes on 2 threads over a large batch give identical gradients."""
    model = model_of(prefix=PREFIX)
    words = "a person in a red shirt walks a small dog along the beach at sunset near the water".split()
    captions = [" ".join(words[: 2 + i % 15]) for i in range(512)]
    text = shift_tokens(tokens(captions=captions), 3)
    kinds = torch.arange(512) % 2
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(2):
            model.zero_grad()
            prefix = model.parts["prefix"].vectors_for(kinds)
            encode_packed(model.clip, text, packing_plan(text), prefix).square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    assert "clip.positional_embedding" in grads[0] and "parts.prefix.vectors" in grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_padded_with_prefix_matches_open_clips_tower_on_the_same_embeddings():
    """``encode_padded`` without a prefix is open_clip's ``encode_text`` to the bit."""
    model = model_of(pack=False)
    text = tokens()
    assert torch.equal(encode_padded(model.clip, text), model.clip.encode_text(text))


def test_state_dict_splits_into_plain_open_clip_and_parts():
    model = model_of(prefix=PREFIX, head={"type": "linear_head", "classes": 3})
    clip, parts = split_state(model.state_dict())
    plain = open_clip.create_model("vlp-r10t-32-t2")
    plain.load_state_dict(clip)  # strict: nothing missing, nothing extra
    assert set(parts) == {"prefix.vectors", "head.linear.weight", "head.linear.bias"}
    assert join_state(clip, parts).keys() == model.state_dict().keys()


@pytest.mark.parametrize("parts, message", [
    ({"p": {"type": "prefix"}}, "model.parts.p.type: unknown model part 'prefix'"),
    ({"p": {"type": "text_prefix", "kinds": ["caption"], "size": 2}}, "model.parts.p.size: unknown option"),
    ({"p": {"type": "text_prefix"}}, "model.parts.p.kinds: required option is missing"),
    ({"p": {"type": "text_prefix", "kinds": ["caption"], "length": 40}}, "model.parts.p.length: 40"),
    ({"a": PREFIX, "b": PREFIX}, "one text prefix at most"),
])
def test_bad_parts_are_errors_naming_the_key(parts, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(name="vlp-tiny-32", parts=parts))



def test_text_towers_packing_cannot_reproduce_are_computed_padded():
    checkpointed = build_model(ModelConfig(name="vlp-tiny-32", grad_checkpointing=True))
    assert not checkpointed.packed  # gradient checkpointing recomputes open_clip's blocks: padded it is
    plain = build_model(ModelConfig(name="vlp-tiny-32", grad_checkpointing=True), training=False)
    assert plain.packed  # evaluation builds no checkpointing
