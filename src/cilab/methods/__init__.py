"""Class-incremental methods as plugins: one file per method, registered by name.

``base.py`` holds the hooks (``Method``) and what they see (``TaskContext``);
every other module here registers its method on import, so a new method is a
new file and nothing else. A method defined outside cilab registers itself the
same way (``@register("mine")``) once its module is imported.
"""

from ..registry import import_plugins
from .base import METHODS, Method, NoArgs, Outputs, TaskContext, register

import_plugins(__name__, __path__, skip=("base",))

__all__ = ["METHODS", "Method", "NoArgs", "Outputs", "TaskContext", "register"]
