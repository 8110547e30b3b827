"""Models to evaluate: anything that embeds a batch of images and a list of texts.

:func:`load_model` takes what a user types after ``--model``:
- ``NAME:TAG`` an open_clip config with a pretrained tag (``ViT-B-32:laion2b_s34b_b79k``);
- ``NAME:/path/to/weights`` an open_clip config with a local weights file (``.pt``, ``.bin``, ``.safetensors``);
- a vlp run folder (its latest checkpoint) or checkpoint folder: the model is rebuilt from the ``model:`` section
  of its ``config.yaml`` (extra parts included) and takes the checkpoint's weights, parts and all;
- a checkpoint file, with ``model_name`` (``--model-name``) naming its config;
- ``NAME`` alone: random weights (smoke tests), with a warning.

Every model is built by :func:`vlp.models.build_model`. Texts go through the model's ``encode_text``: a model with
a text prefix encodes them with the prefix of ``text_kind`` (by default its first kind, the caption prefix), and
the results record which.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlp.config import ModelConfig, load_model_config
from vlp.data.preprocess import RESIZE_MODES
from vlp.models import VLPModel, build_model

log = logging.getLogger(__name__)


class ModelSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Preprocess:
    """What the eval transform needs from a model: input size, normalisation and how the image becomes square."""
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"


@dataclass
class EvalModel:
    """The interface evaluators use. ``identity`` keys the feature cache: two models with the same identity must
    embed identically (for open_clip models it is a hash of the weights)."""
    identity: str
    preprocess: Preprocess
    describe: dict = field(default_factory=dict)  # goes into every result file

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class OpenClipModel(EvalModel):
    """A :class:`VLPModel` (an open_clip model and any extra parts) behind the evaluators' interface."""

    def __init__(self, model: VLPModel, name: str, describe: dict, device: str = "cpu", text_kind: str | None = None):
        self.model = model.eval().to(device)
        self.device = device
        self.tokenizer = _tokenizer(name)
        prefix = model.prefix
        if text_kind is not None and (prefix is None or text_kind not in prefix.kinds):
            known = f"its prefix kinds: {', '.join(prefix.kinds)}" if prefix is not None else "it has no text prefix"
            raise ModelSpecError(f"text kind {text_kind!r} asked of {name} ({known})")
        self.text_kind = text_kind or (prefix.kinds[0] if prefix is not None else None)
        describe = {**describe, "text_kind": self.text_kind, "parts": sorted(model.parts) or None}
        super().__init__(identity=weights_digest(self.model, f"{name}|{self.text_kind}"),
                         preprocess=_preprocess(self.model.clip, name), describe=describe)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device)).float().cpu()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, kind=self.text_kind if self.model.prefix else None).float().cpu()


def _tokenizer(name: str):
    import open_clip

    return open_clip.get_tokenizer(name)


def _preprocess(model: torch.nn.Module, name: str) -> Preprocess:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ModelSpecError(f"{name}: non-square input {size} is not supported by vlp's eval transform")
        size = size[0]
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in RESIZE_MODES:
        log.warning("%s asks for resize_mode=%s; vlp's eval transform has %s and uses shortest, figures may differ",
                    name, resize_mode, ", ".join(RESIZE_MODES))
        resize_mode = "shortest"
    if cfg.get("interpolation", "bicubic") != "bicubic":
        log.warning("%s asks for interpolation=%s; vlp's eval transform uses bicubic, figures may differ slightly",
                    name, cfg["interpolation"])
    return Preprocess(int(size), tuple(float(x) for x in cfg["mean"]), tuple(float(x) for x in cfg["std"]),
                      resize_mode)


def weights_digest(model: torch.nn.Module, name: str) -> str:
    """A hash of the architecture name and every tensor of the state dict: a new checkpoint, even of the same
    run, gets a new identity, so cached features are never reused for different weights."""
    h = hashlib.blake2b(name.encode(), digest_size=16)
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _build(cfg: ModelConfig, device: str, weights: dict | None = None) -> VLPModel:
    """The builder's model for evaluation (padded text tower: open_clip's exact computation), with ``weights`` (a
    ``VLPModel`` state dict) loaded strictly where given."""
    import open_clip

    try:
        model = build_model(cfg, device, pretrained=weights is None, pack_text=False, training=False)
        if weights is not None:
            model.load_state_dict(weights)
        return model
    except (RuntimeError, KeyError, ValueError, AssertionError, pickle.UnpicklingError) as e:  # open_clip asserts
        # on shape mismatches; a torch file that weights_only loading refuses comes back as UnpicklingError
        known = ("; open_clip.list_models() lists the known configs"
                 if open_clip.get_model_config(cfg.name) is None else "")
        raise ModelSpecError(f"cannot build model {cfg.name!r} (pretrained={cfg.pretrained!r}): {e}{known}") from e


def _from_weights(name: str, weights: Path, device: str, describe: dict, text_kind: str | None) -> OpenClipModel:
    """An open_clip config with a weights file from elsewhere (open_clip_train's ``epoch_N.pt``, a downloaded
    file). open_clip's own loader reads it: it strips DDP prefixes, unwraps ``{"state_dict": ...}`` and converts
    known third-party layouts; a mismatch comes back naming the file and the config. Only such foreign files are
    looked into, for a SigLIP logit bias that the config alone does not create; vlp checkpoints carry their config."""
    from vlp.train.checkpoint import PARTS, MODEL

    if weights.name == MODEL and (weights.parent / PARTS[MODEL]).exists():
        raise ModelSpecError(f"{weights} belongs to a model with extra parts ({PARTS[MODEL]} beside it): evaluate "
                             f"its checkpoint folder {weights.parent} so that they are used")
    cfg = ModelConfig(name=name, pretrained=str(weights), init_logit_bias=0.0 if _has_logit_bias(weights) else None)
    return OpenClipModel(_build(cfg, device), name, describe, device, text_kind)


def _has_logit_bias(weights: Path) -> bool:
    """Whether a weights file holds a logit bias: safetensors by its header, torch files (open_clip_train's
    ``epoch_N.pt``: ``{"state_dict": {"module.logit_bias": ...}}``) memory-mapped, without running pickled code."""
    if not weights.is_file():
        return False
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return "logit_bias" in f.keys()
    if weights.suffix not in (".pt", ".pth", ".bin"):
        return False
    try:
        try:
            checkpoint = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive (a legacy torch file): read it whole
            checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable here: open_clip's loader then reports it, naming the file
        return False
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    return any(k.removeprefix("module.") == "logit_bias" for k in state)


def _vlp_folder(folder: Path, model_name: str | None, device: str, text_kind: str | None) -> OpenClipModel:
    """A run folder (its latest checkpoint) or one checkpoint folder, rebuilt from the config saved with it."""
    from vlp.train import checkpoint

    if (folder / checkpoint.MODEL).exists():
        ckpt, run = folder, folder.parent.parent
    else:
        ckpt, run = checkpoint.latest(folder, needs=checkpoint.MODEL), folder
        if ckpt is None:
            raise ModelSpecError(f"run folder {folder}: no complete checkpoint under {folder / 'checkpoints'}")
    cfg = load_model_config(ckpt / "config.yaml" if (ckpt / "config.yaml").exists() else folder / "config.yaml")
    if model_name is not None and model_name != cfg.name:
        raise ModelSpecError(f"--model-name {model_name!r}: {folder} is a {cfg.name} run (its config.yaml says so)")
    model = _build(cfg, device, checkpoint.load_weights(ckpt))
    return OpenClipModel(model, cfg.name, {"model": cfg.name, "pretrained": str((ckpt / checkpoint.MODEL).resolve()),
                                           "run": str(run)}, device, text_kind)


def load_model(spec: str, model_name: str | None = None, device: str = "cpu",
               text_kind: str | None = None) -> OpenClipModel:
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise ModelSpecError(f"{path} is a folder but not a vlp run or checkpoint folder (no config.yaml)")
        return _vlp_folder(path, model_name, device, text_kind)
    if path.is_file():
        if model_name is None:
            raise ModelSpecError(f"{path} is a checkpoint file: pass --model-name with its open_clip config")
        return _from_weights(model_name, path, device, {"model": model_name, "pretrained": str(path.resolve())},
                             text_kind)
    if spec.startswith(("hf-hub:", "local-dir:")):  # open_clip schemas that carry their own weights
        return OpenClipModel(_build(ModelConfig(name=spec), device), spec, {"model": spec, "pretrained": spec},
                             device, text_kind)
    name, colon, rest = spec.partition(":")
    if model_name is not None and model_name != name:
        raise ModelSpecError(f"--model {spec!r} already names the config {name!r}; --model-name {model_name!r} "
                             "is only for checkpoint files and run folders")
    if not colon:
        log.warning("model %s without weights: evaluating a random initialisation", name)
        return OpenClipModel(_build(ModelConfig(name=name), device), name, {"model": name, "pretrained": None},
                             device, text_kind)
    if Path(rest).is_file():
        return _from_weights(name, Path(rest), device, {"model": name, "pretrained": str(Path(rest).resolve())},
                             text_kind)
    if "/" in rest or rest.endswith((".pt", ".bin", ".safetensors", ".pth")):
        raise ModelSpecError(f"--model {spec!r}: weights file {rest} does not exist")
    return OpenClipModel(_build(ModelConfig(name=name, pretrained=rest), device), name,
                         {"model": name, "pretrained": rest}, device, text_kind)
