"""Class names and prompt templates: the registry in ``eval/prompts/*.yaml`` and custom lists from suite files.

A registry entry is ``eval/prompts/<name>.yaml`` with ``classnames`` and ``templates``, each given as
- a list of strings (templates hold ``{c}`` where the class name goes, CLIP_benchmark's convention),
- ``{open_clip: NAME}``: a list that ``open_clip.zero_shot_metadata`` ships (ImageNet's names and 80 templates),
- ``{same_as: OTHER}``: the list of another registry entry.

The registry is the ``eval/`` folder vlp ships (:mod:`vlp.resources`: the repository's top-level ``eval/`` in a
source checkout, a packed copy in an installed wheel) unless ``VLP_EVAL_DIR`` points elsewhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from vlp import resources

EVAL_DIR_ENV = "VLP_EVAL_DIR"


class PromptError(ValueError):
    pass


def eval_dir() -> Path:
    """The registry folder: ``$VLP_EVAL_DIR``, else the ``eval/`` folder shipped with vlp."""
    override = os.environ.get(EVAL_DIR_ENV)
    path = Path(override) if override else resources.path("eval")
    if not path.is_dir():
        where = f"set by ${EVAL_DIR_ENV}" if override else "vlp/resources/eval, a link to the repository's eval/"
        raise PromptError(f"the eval registry folder {path} ({where}) does not exist")
    return path


def registry_names() -> list[str]:
    return sorted(p.stem for p in (eval_dir() / "prompts").glob("*.yaml"))


def _entry(name: str) -> dict:
    path = eval_dir() / "prompts" / f"{name}.yaml"
    if not path.exists():
        raise PromptError(f"no prompt registry entry {name!r} (looked for {path}); known: {registry_names()}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping with classnames and templates")
    return data


def registry_list(name: str, what: str, _seen: tuple[str, ...] = ()) -> list[str] | None:
    """``what`` ("classnames" or "templates") of registry entry ``name``; None when the entry has none."""
    if name in _seen:
        raise PromptError(f"prompt registry: same_as cycle {' -> '.join(_seen + (name,))}")
    value = _entry(name).get(what)
    where = f"{eval_dir() / 'prompts' / name}.yaml: {what}"
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"same_as"}:
        return registry_list(value["same_as"], what, _seen + (name,))
    if isinstance(value, dict) and set(value) == {"open_clip"}:
        from open_clip import zero_shot_metadata

        items = getattr(zero_shot_metadata, value["open_clip"], None)
        if items is None:
            raise PromptError(f"{where}: open_clip.zero_shot_metadata has no {value['open_clip']!r}")
        # open_clip keeps templates as lambdas; applied to the placeholder they give CLIP_benchmark's strings.
        return [t("{c}") if callable(t) else str(t) for t in items]
    return _as_strings(value, where)


def _as_strings(value, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int)) for v in value):
        raise PromptError(f"{where}: expected a non-empty list of strings")
    return [str(v) for v in value]


def read_list_file(path: Path) -> list[str]:
    """One entry per line (``.txt``, CLIP_benchmark's ``classnames.txt``) or a list in ``.json`` / ``.yaml``."""
    if not path.exists():
        raise PromptError(f"{path} does not exist")
    if path.suffix in (".json", ".yaml", ".yml"):
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        return _as_strings(data, str(path))
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise PromptError(f"{path} is empty")
    return lines


def resolve(value, what: str, base: Path, where: str) -> tuple[list[str], str] | None:
    """A suite's ``classnames``/``templates`` value: an inline list, a registry name, or a file (relative paths
    against ``base``). Returns the list and where it came from (for error messages), or None when not given."""
    if value is None:
        return None
    if isinstance(value, list):
        return _as_strings(value, where), where
    if not isinstance(value, str):
        raise PromptError(f"{where}: expected a list, a registry name or a file path, got {type(value).__name__}")
    if value in registry_names():
        found = registry_list(value, what)
        if found is None:
            raise PromptError(f"{where}: registry entry {value!r} has no {what}")
        return found, f"eval/prompts/{value}.yaml"
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.exists():
        raise PromptError(f"{where}: {value!r} is neither a prompt registry name ({registry_names()}) "
                          f"nor an existing file ({path})")
    return read_list_file(path), str(path)


def check_templates(templates: list[str], source: str) -> None:
    for t in templates:
        try:
            filled = t.format(c="CLASS")
        except (KeyError, IndexError, ValueError) as e:
            raise PromptError(f"{source}: template {t!r} is not a format string with only {{c}} ({e})") from e
        if "CLASS" not in filled:
            raise PromptError(f"{source}: template {t!r} has no {{c}} placeholder for the class name")
