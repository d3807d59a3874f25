"""Class-incremental methods as plugins: one file per method, registered by name.

``base.py`` holds the hooks (``Method``) and what they see (``TaskContext``);
every other module here registers its method on import, so a new method is a
new file and nothing else. A method defined outside cilab registers itself the
same way (``@register("mine")``) once its module is imported.
"""

import importlib
import pkgutil

from .base import METHODS, Method, NoArgs, Outputs, TaskContext, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Method", "NoArgs", "Outputs", "TaskContext", "register"]
