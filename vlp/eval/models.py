"""Models to evaluate: anything that embeds a batch of images and a list of texts.

:func:`load_model` takes what a user types after ``--model``:
- ``NAME:TAG`` an open_clip config with a pretrained tag (``ViT-B-32:laion2b_s34b_b79k``);
- ``NAME:/path/to/weights`` an open_clip config with a local weights file (``.pt``, ``.bin``, ``.safetensors``);
- a vlp run folder (``config.yaml`` whose ``model.name`` is the open_clip config,
  ``checkpoints/latest/model.safetensors`` a plain open_clip state dict);
- a checkpoint file, with ``model_name`` (``--model-name``) naming its config;
- ``NAME`` alone: random weights (smoke tests), with a warning.

Texts always go through the model's own ``encode_text``, so a model that conditions its text tower on a prefix
chooses its evaluation prefix there.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import vlp.models  # noqa: F401 - registers vlp's configs (vlp-tiny-32, ...) with open_clip
from vlp.data.preprocess import RESIZE_MODES

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
    def __init__(self, model: torch.nn.Module, name: str, describe: dict, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.device = device
        self.tokenizer = _tokenizer(name)
        super().__init__(identity=weights_digest(self.model, name), preprocess=_preprocess(self.model, name),
                         describe=describe)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device)).float().cpu()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()


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


def _create(name: str, pretrained: str | None, device: str, **model_kwargs):
    import open_clip

    try:
        return open_clip.create_model(name, pretrained=pretrained, device=device, **model_kwargs)
    except (RuntimeError, KeyError, ValueError, AssertionError, pickle.UnpicklingError) as e:  # open_clip asserts
        # on shape mismatches; a torch file that weights_only loading refuses comes back as UnpicklingError
        known = "; open_clip.list_models() lists the known configs" if open_clip.get_model_config(name) is None else ""
        raise ModelSpecError(f"cannot build model {name!r} (pretrained={pretrained!r}): {e}{known}") from e


def _from_weights(name: str, weights: Path, device: str, describe: dict) -> OpenClipModel:
    # open_clip's own loader: it strips DDP prefixes, unwraps {"state_dict": ...} and converts known
    # third-party layouts; a mismatch (missing keys, wrong shapes) comes back naming the file and the config.
    # A SigLIP-trained checkpoint has a logit bias that the config alone does not create: ask for one (its value
    # comes from the file).
    kwargs = {"init_logit_bias": 0.0} if _has_logit_bias(weights) else {}
    return OpenClipModel(_create(name, str(weights), device, **kwargs), name, describe, device)


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


def _run_folder(folder: Path, model_name: str | None, device: str) -> OpenClipModel:
    config = folder / "config.yaml"
    name = model_name
    if name is None:
        cfg = yaml.safe_load(config.read_text()) or {}
        name = (cfg.get("model") or {}).get("name") if isinstance(cfg, dict) else None
        if not name:
            raise ModelSpecError(f"{config}: no model.name (the open_clip config of the run); or pass --model-name")
    latest = folder / "checkpoints" / "latest"
    if latest.is_file():  # a pointer file naming the newest complete checkpoint folder
        latest = latest.parent / latest.read_text().strip()
    weights = latest / "model.safetensors"
    if not weights.exists():
        raise ModelSpecError(f"run folder {folder}: no checkpoint at {weights}")
    return _from_weights(name, weights, device, {"model": name, "pretrained": str(weights.resolve()),
                                                 "run": str(folder)})


def load_model(spec: str, model_name: str | None = None, device: str = "cpu") -> OpenClipModel:
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise ModelSpecError(f"{path} is a folder but not a vlp run folder (no config.yaml)")
        return _run_folder(path, model_name, device)
    if path.is_file():
        if model_name is None:
            raise ModelSpecError(f"{path} is a checkpoint file: pass --model-name with its open_clip config")
        return _from_weights(model_name, path, device, {"model": model_name, "pretrained": str(path.resolve())})
    if spec.startswith(("hf-hub:", "local-dir:")):  # open_clip schemas that carry their own weights
        return OpenClipModel(_create(spec, None, device), spec, {"model": spec, "pretrained": spec}, device)
    name, colon, rest = spec.partition(":")
    if model_name is not None and model_name != name:
        raise ModelSpecError(f"--model {spec!r} already names the config {name!r}; --model-name {model_name!r} "
                             "is only for checkpoint files and run folders")
    if not colon:
        log.warning("model %s without weights: evaluating a random initialisation", name)
        return OpenClipModel(_create(name, None, device), name, {"model": name, "pretrained": None}, device)
    if Path(rest).is_file():
        return _from_weights(name, Path(rest), device, {"model": name, "pretrained": str(Path(rest).resolve())})
    if "/" in rest or rest.endswith((".pt", ".bin", ".safetensors", ".pth")):
        raise ModelSpecError(f"--model {spec!r}: weights file {rest} does not exist")
    return OpenClipModel(_create(name, rest, device), name, {"model": name, "pretrained": rest}, device)
