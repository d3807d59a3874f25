"""Exemplar memory: storage (buffer.py), selection (selection.py) and builders.

A builder turns the training images of the new classes into their exemplars;
it is chosen by ``memory.kind``. ``real`` keeps selected training images;
other kinds register themselves here from their own modules.
"""

from ..registry import import_plugins
from .buffer import ExemplarMemory
from .selection import EXEMPLAR_BUILDERS, SELECTIONS, BuildContext, herding, random_selection

# Every other module in this package registers its builders on import
# (collage.py, deepinversion.py, ...): a new kind is a new file, nothing else.
import_plugins(__name__, __path__, skip=("buffer", "selection"))

__all__ = ["ExemplarMemory", "EXEMPLAR_BUILDERS", "SELECTIONS", "BuildContext", "herding", "random_selection"]
