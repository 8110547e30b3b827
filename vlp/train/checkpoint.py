"""Checkpoints: written atomically, the newest K kept, loaded without running pickled code.

``<run>/checkpoints/step-000100/`` holds:
- ``model.safetensors``: a plain open_clip state dict (it loads in
  ``open_clip.create_model_and_transforms(name, pretrained=path)``); with ``train.ema`` the average of the weights;
- ``online.safetensors``: only with ``train.ema``, the weights the optimizer moves;
- ``parts.safetensors`` (and ``online-parts.safetensors``): the model's extra parts (``model.parts``: heads, a text
  prefix), where it has any;
- ``training.pt``: optimizer, scaler, step, epoch, RNG states and every rank's data position (read with
  ``weights_only=True``);
- ``config.yaml``: the run's resolved config, whose ``model:`` section rebuilds the model (``vlp eval``).
The folder is written as ``.step-000100.partial`` and renamed when complete; ``latest`` (a one-line file, replaced
atomically) names the newest complete checkpoint. A write killed half-way never replaces a good checkpoint.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlp import atomic
from vlp.models.model import join_state, split_state

LATEST = "latest"
MODEL = "model.safetensors"  # the weights to use: the EMA of the weights when the run keeps one
ONLINE = "online.safetensors"  # only with an EMA: the weights the optimizer moves (a resumed run goes on from them)
PARTS = {MODEL: "parts.safetensors", ONLINE: "online-parts.safetensors"}  # the extra parts of each


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model_state: dict, training_state: dict, config_yaml: str, keep: int,
         online_state: dict | None = None) -> Path:
    """A checkpoint folder from ``VLPModel`` state dicts (``clip.*`` and ``parts.*`` entries)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final, partial = root / name, root / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for state, file in ((model_state, MODEL), (online_state, ONLINE)):
        if state is not None:
            clip, parts = split_state(state)
            for part, path in ((clip, file), (parts, PARTS[file])):
                if part:
                    save_file({k: v.detach().cpu().contiguous() for k, v in part.items()}, partial / path)
    torch.save(training_state, partial / "training.pt")
    (partial / "config.yaml").write_text(config_yaml)
    for f in partial.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    atomic.write_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def latest(run_dir: Path, needs: str = "training.pt") -> Path | None:
    """The newest complete checkpoint folder of a run (holding ``needs``: what resuming reads, by default), or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / needs).exists() else None


def load_weights(path: Path, which: str = MODEL) -> dict | None:
    """The ``VLPModel`` state dict of a checkpoint folder: ``model.safetensors`` (``which=MODEL``) or the
    optimizer's weights of a run with an EMA (``which=ONLINE``; None where the checkpoint has none), each with its
    parts."""
    path = Path(path)
    if not (path / which).exists():
        if which == MODEL:
            raise FileNotFoundError(f"{path} is not a vlp checkpoint (no {MODEL})")
        return None
    parts = path / PARTS[which]
    try:
        return join_state(load_file(path / which), load_file(parts) if parts.exists() else None)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path}: {which} or {PARTS[which]} is unreadable ({e})") from None


class CheckpointError(ValueError):
    pass


def load(path: Path) -> tuple[dict, dict]:
    """(``VLPModel`` state dict, training state) of a checkpoint folder. A file that does not read as vlp wrote it
    (damaged, or holding objects that loading without running pickled code refuses) is an error naming it."""
    weights = load_weights(path)
    training = Path(path) / "training.pt"
    try:
        state = torch.load(training, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{training}: refused, it holds objects that weights-only loading does not allow (vlp "
                              f"never writes them; was it replaced?): {reason}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{training}: unreadable ({str(e).strip().splitlines()[0]})") from None
    return weights, state


def load_online(path: Path) -> dict | None:
    """The optimizer's weights of a checkpoint whose run keeps an EMA (None for other checkpoints)."""
    return load_weights(path, ONLINE)
