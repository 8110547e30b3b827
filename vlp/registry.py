"""Name -> class registries for what config and suite files choose by name (objectives, model parts, evaluators).

A registry is filled by a decorator next to the class it registers (timm's ``@register_model`` habit), and its
lookup error lists the known names under the config key that asked; :func:`check_options` checks the options a
config gives a registered class against its constructor.
"""
from __future__ import annotations

import inspect
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, attribute: str | None = None):
        self.what = what  # "objective", "model part", ...: the word an error uses
        self.attribute = attribute  # set on each registered class to its name (e.g. an evaluator's ``task``)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            if self.attribute:
                setattr(item, self.attribute, name)
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str, key: str) -> T:
        """The item called ``name``; ``key`` is the config key that named it (for the error)."""
        if name not in self._items:
            raise ValueError(f"{key}: unknown {self.what} {name!r} (known: {', '.join(sorted(self._items))})")
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)


def check_options(cls: type, options: dict, key: str, skip: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming ``key`` if ``cls`` takes no such options (or lacks a required one)."""
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and n not in skip}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"{key}.{unknown[0]}: unknown option (known: {', '.join(sorted(params)) or 'none'})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options
               and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if missing:
        raise ValueError(f"{key}.{missing[0]}: required option is missing")
