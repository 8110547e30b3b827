"""Models come from open_clip; vlp only adds small configs for CPU work to its registry.

Importing this module registers every ``configs/*.json`` under its file name (e.g. ``vlp-tiny-32``), so
``open_clip.create_model("vlp-tiny-32")`` works anywhere vlp has been imported.
"""
from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).parent / "configs"

if str(CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
    open_clip.add_model_config(CONFIG_DIR)


def vlp_model_names() -> list[str]:
    """vlp's own configs (``configs/*.json``), registered into open_clip under these names."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_image_size(name: str) -> int:
    """Input resolution of an open_clip (or vlp) model config, without building the model."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(vlp_model_names())} and "
                         "open_clip.list_models()")
    size = cfg["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def get_tokenizer(name: str):
    return open_clip.get_tokenizer(name)


from vlp.models.model import VLPModel, build_model, join_state, split_state  # noqa: E402 - after the registration

__all__ = ["VLPModel", "build_model", "get_tokenizer", "join_state", "model_image_size", "split_state",
           "vlp_model_names"]
