"""Exemplar memory: storage (buffer.py), selection (selection.py) and builders.

A builder turns the training images of the new classes into their exemplars;
it is chosen by ``memory.kind``. ``real`` keeps selected training images;
other kinds register themselves here from their own modules.
"""

import importlib
import pkgutil

from .buffer import ExemplarMemory
from .selection import EXEMPLAR_BUILDERS, SELECTIONS, BuildContext, herding, random_selection

# Every other module in this package registers its builders on import
# (collage.py, deepinversion.py, ...): a new kind is a new file, nothing else.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("buffer", "selection"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ExemplarMemory", "EXEMPLAR_BUILDERS", "SELECTIONS", "BuildContext", "herding", "random_selection"]
