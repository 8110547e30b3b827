"""A vlp model: an open_clip ``CLIP`` plus named extra parts, and the one builder training, evaluation and scoring use.

``VLPModel.prepare(batch)`` turns a loader batch into the model's inputs on the host (tokens shifted for a text
prefix, the kinds as ids, the packing plan, the fields the parts read); the trainer moves them to the device, and
``forward(inputs)`` returns one dict: ``image_features`` and ``text_features`` (L2-normalised), ``logit_scale``
(exponentiated, as open_clip's ``output_dict``), ``logit_bias`` where the model has one, and each head's outputs.
``merge_rules`` says how gradient accumulation merges each output over micro-batches.

``encode_image`` and ``encode_text`` keep open_clip's signatures; ``encode_text`` also takes the text ``kind``
(the first of the prefix's kinds by default: the caption prefix for zero-shot transfer).

State dict: the open_clip model's entries under ``clip.``, the parts' under ``parts.<name>.``;
:func:`split_state` gives the plain open_clip state dict that ``model.safetensors`` holds, and the parts' beside it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import open_clip
import torch
from torch import nn

from vlp.models import text as text_tower
from vlp.models.parts import ROWS, SHARED, Part, TextPrefix, TowerSpec, build_part
from vlp.models.trim import trim_dead_taps

if TYPE_CHECKING:
    from vlp.config import ModelConfig

log = logging.getLogger(__name__)

CLIP_PREFIX, PARTS_PREFIX = "clip.", "parts."


class VLPModel(nn.Module):
    def __init__(self, clip: nn.Module, parts: dict[str, Part] | None = None, pack_text: bool = True):
        super().__init__()
        self.clip = clip
        self.parts = nn.ModuleDict(parts or {})
        prefixes = [name for name, p in self.parts.items() if isinstance(p, TextPrefix)]
        if len(prefixes) > 1:
            raise ValueError(f"model.parts: one text prefix at most ({', '.join(prefixes)})")
        self.prefix_name = prefixes[0] if prefixes else None
        reason = text_tower.why_not_own_tower(clip) if self.prefix_name else None
        if reason:
            raise ValueError(f"model.parts.{self.prefix_name}: a text prefix cannot be inserted: {reason}")
        reason = text_tower.why_not_packed(clip) if pack_text else "model.pack_text is off"
        if pack_text and reason:
            log.info("text tower computed over the padded context: %s", reason)
        self.packed = reason is None
        self.heads = [name for name, p in self.parts.items() if not isinstance(p, TextPrefix)]
        self.fields = tuple(dict.fromkeys(f for p in self.parts.values() for f in p.fields))
        self.merge_rules = {"image_features": ROWS, "text_features": ROWS, "logit_scale": SHARED,
                            "logit_bias": SHARED}
        for p in self.parts.values():
            self.merge_rules.update(p.outputs)

    @property
    def prefix(self) -> TextPrefix | None:
        return self.parts[self.prefix_name] if self.prefix_name else None

    # -- open_clip's interface ----------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_image(image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False, kind: str | None = None) -> torch.Tensor:
        """open_clip's ``encode_text``; ``kind`` chooses the prefix (default: the prefix's first kind)."""
        prefix = self.prefix
        if prefix is None:
            if kind is not None:
                raise ValueError(f"text kind {kind!r} asked of a model without a text prefix")
            ids = None
        else:
            ids = prefix.kind_ids([kind or prefix.kinds[0]] * text.shape[0]).to(text.device)
            text = text_tower.shift_tokens(text, prefix.length)
        return self._text(text, ids, None, normalize)

    # -- training -----------------------------------------------------------------------------------------------
    def prepare(self, batch: dict) -> dict:
        """The model's inputs from a loader batch, on the host: ``image``, ``text`` (shifted for the prefix),
        ``kind`` ids (one per text row), ``text_plan`` where packed, and the fields the parts read."""
        tokens = batch["text"]
        inputs = {"image": batch["image"]}
        prefix = self.prefix
        if prefix is not None:
            per_image = len(batch["kind"])
            ids = prefix.kind_ids(batch["kind"])
            inputs["kind"] = ids.repeat_interleave(tokens.shape[0] // per_image) if per_image else ids
            tokens = text_tower.shift_tokens(tokens, prefix.length)
        inputs["text"] = tokens
        if self.packed:
            inputs["text_plan"] = text_tower.packing_plan(tokens)
        for field in self.fields:
            if field != "kind":
                inputs[field] = batch[field]
        return inputs

    def forward(self, inputs: dict) -> dict:
        out = {"image_features": self.encode_image(inputs["image"], normalize=True),
               "text_features": self._text(inputs["text"], inputs.get("kind"), inputs.get("text_plan"), True),
               "logit_scale": self.clip.logit_scale.exp()}
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        for name in self.heads:
            part = self.parts[name]
            out.update(part(out, inputs, self.image_tokens) if part.image_tokens else part(out, inputs))
        return out

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w): the image tower's last feature map (a ViT's patch tokens after its final norm, a ResNet's
        last stage), through open_clip's ``forward_intermediates``."""
        found = self.clip.visual.forward_intermediates(images, indices=1, normalize_intermediates=True,
                                                       intermediates_only=True, output_fmt="NCHW")
        return found["image_intermediates"][-1]

    def _text(self, tokens: torch.Tensor, kind_ids: torch.Tensor | None, plan, normalize: bool) -> torch.Tensor:
        prefix = None if kind_ids is None else self.prefix.vectors_for(kind_ids)
        if self.packed:
            return text_tower.encode_packed(self.clip, tokens, plan, prefix, normalize)
        if prefix is not None:
            return text_tower.encode_padded(self.clip, tokens, prefix, normalize)
        return self.clip.encode_text(tokens, normalize=normalize)


def split_state(state: dict) -> tuple[dict, dict]:
    """(the open_clip state dict, the parts' state dict) of a ``VLPModel`` state dict."""
    clip, parts = {}, {}
    for key, value in state.items():
        if key.startswith(CLIP_PREFIX):
            clip[key[len(CLIP_PREFIX):]] = value
        elif key.startswith(PARTS_PREFIX):
            parts[key[len(PARTS_PREFIX):]] = value
        else:
            raise ValueError(f"state dict entry {key!r} belongs to neither the open_clip model nor a part")
    return clip, parts


def join_state(clip: dict, parts: dict | None) -> dict:
    state = {CLIP_PREFIX + k: v for k, v in clip.items()}
    state.update({PARTS_PREFIX + k: v for k, v in (parts or {}).items()})
    return state


def tower_spec(clip: nn.Module, name: str) -> TowerSpec:
    config = open_clip.get_model_config(name)
    if config is not None:
        embed_dim = int(config["embed_dim"])
    else:  # a hub model: measure its features
        with torch.no_grad():
            size = open_clip.get_model_preprocess_cfg(clip)["size"]
            size = size if isinstance(size, int) else size[0]
            embed_dim = int(clip.encode_image(torch.zeros(1, 3, size, size)).shape[-1])
    own = isinstance(clip, open_clip.CLIP)
    pp = open_clip.get_model_preprocess_cfg(clip)
    return TowerSpec(embed_dim=embed_dim, text_width=int(clip.token_embedding.weight.shape[1]) if own else 0,
                     context_length=int(getattr(clip, "context_length", 0) or 0),
                     image_width=image_token_width(clip.visual), mean=tuple(pp["mean"]), std=tuple(pp["std"]))


def image_token_width(visual: nn.Module) -> int:
    """Channels of ``VLPModel.image_tokens``' feature map: a timm trunk's ``num_features``, a ViT's width, a
    ModifiedResNet's last stage; 0 for a tower of another kind."""
    if hasattr(visual, "trunk"):
        return int(visual.trunk.num_features)
    if hasattr(visual, "transformer") and hasattr(visual, "ln_post"):
        return int(visual.transformer.width)
    if hasattr(visual, "attnpool"):
        return int(visual.attnpool.k_proj.in_features)
    return 0


def model_kwargs(cfg: "ModelConfig") -> dict:
    """``open_clip.create_model`` settings of the config beyond its name (a SigLIP model has a bias parameter)."""
    kwargs = {}
    if cfg.init_logit_scale is not None:
        kwargs["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        kwargs["init_logit_bias"] = cfg.init_logit_bias
    if cfg.resize_mode is not None:
        kwargs["force_preprocess_cfg"] = {"resize_mode": cfg.resize_mode}
    return kwargs


def build_model(cfg: "ModelConfig", device: torch.device | str = "cpu", *, pretrained: bool = True,
                pack_text: bool | None = None, training: bool = True) -> VLPModel:
    """The model of a config's ``model:`` section on ``device``: training, the unsharded copy that evaluates an
    FSDP run, ``vlp eval`` and pool scoring all build it here. ``pretrained=False`` skips loading
    ``cfg.pretrained`` (weights come from a checkpoint next). ``pack_text`` overrides ``cfg.pack_text`` (FSDP
    gathers a block's weights in the block's forward, which the packed computation does not call).
    ``training=False`` leaves out what only training uses (gradient checkpointing)."""
    if open_clip.get_model_config(cfg.name) is None and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        from vlp.models import vlp_model_names

        raise ValueError(f"model.name: unknown model config {cfg.name!r} ({', '.join(vlp_model_names())} "
                         "or one of open_clip.list_models())")
    clip = open_clip.create_model(cfg.name, pretrained=cfg.pretrained if pretrained else None,
                                  **model_kwargs(cfg))
    if cfg.grad_checkpointing and training:
        clip.set_grad_checkpointing(True)
    spec = tower_spec(clip, cfg.name)
    parts = {name: build_part(name, options, spec) for name, options in cfg.parts.items()}
    pack = cfg.pack_text if pack_text is None else pack_text
    model = VLPModel(clip, parts, pack_text=pack and cfg.compile not in (True, "text")).to(device)
    if cfg.trim_dead_taps:
        trim_dead_taps(model.clip.visual)
    if cfg.channels_last:
        model.clip.visual.to(memory_format=torch.channels_last)
    return model
