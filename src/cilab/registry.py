"""A tiny name -> object registry, so components plug in by config string."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from .errors import PluginError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.what} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} '{name}'; known: {', '.join(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def import_plugins(package: str, path: Iterable[str], skip: tuple[str, ...] = ()) -> None:
    """Import every module of ``package`` (its folders ``path``) but ``skip``: each registers its
    components on import, so a new one is a new file. A file that does not import (a syntax error,
    a name registered twice) is named in a PluginError, not left to a traceback from the import."""
    for mod in pkgutil.iter_modules(path):
        if mod.name in skip:
            continue
        try:
            importlib.import_module(f"{package}.{mod.name}")
        except Exception as e:
            file = Path(mod.module_finder.path) / f"{mod.name}.py"
            raise PluginError(f"the plugin {file} does not import ({type(e).__name__}: {e}); fix it, or move it "
                              f"out of {file.parent}") from e
