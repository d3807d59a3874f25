"""A tiny name -> object registry, so components plug in by config string."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
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


PLUGINS_ENV = "CILAB_PLUGINS"


def import_user_plugins() -> None:
    """Import the modules that ``$CILAB_PLUGINS`` names (comma-separated: importable module names or
    ``.py`` files), so that the components they register (a method, a backbone, ...) are known to
    every command and to the worker processes ``reproduce`` spawns (they inherit the variable).
    Each is imported once per process; one that does not import is named in a PluginError."""
    for item in (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",")):
        if not item:
            continue
        name = item
        try:
            if item.endswith(".py"):
                path = Path(item).expanduser().resolve()
                name = f"cilab_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except Exception as e:
            if item.endswith(".py"):
                sys.modules.pop(name, None)  # importlib leaves a module name it failed on out, do so too
            raise PluginError(f"{PLUGINS_ENV}: {item} does not import ({type(e).__name__}: {e}); fix it, or "
                              f"take it out of {PLUGINS_ENV}") from e
