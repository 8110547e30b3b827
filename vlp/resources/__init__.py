"""Files vlp reads at run time that people edit in the repository: the prompt registry and eval suites
(``eval/``) and the experiment configs (``configs/``, of which ``vlp demo`` runs ``digits-tiny.yaml``).

``eval`` and ``configs`` here are symbolic links to the repository's top-level folders, so that a source
checkout (an editable install) reads exactly the files people edit, with no second copy to keep in step.
Building a wheel or an sdist follows the links and packs real copies (``package-data`` in pyproject.toml), so
an installed vlp carries them; tests/test_packaging.py builds a wheel and runs vlp from it to prove it.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def path(*parts: str) -> Path:
    """A shipped file or folder, e.g. ``path("eval", "suites")``, as a real filesystem path (links resolved, so
    messages name the file people edit and ``..`` in paths relative to it means what it says)."""
    found = files(__name__).joinpath(*parts)
    if not isinstance(found, Path):  # only a zipped install gives something else; pip always unpacks wheels
        raise RuntimeError(f"vlp's resource {'/'.join(parts)} is not on the filesystem ({found!r}): install vlp "
                           "unpacked (pip install)")
    return found.resolve()
