"""Errors that name a problem and its fix; shared by config, methods and the rest.

A module of its own so that ``config`` and the method plugins can both raise
``ConfigError`` without importing each other.
"""


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and how to fix it."""


class OlderRunError(ConfigError):
    """A run folder written by an older cilab whose numbers no setting of this one reproduces."""


class ReportError(RuntimeError):
    """Run folders that cannot make a report (or a figure of one); the message names the folder."""


class PluginError(ImportError):
    """A plugin that does not import, in one of cilab's plugin folders (methods/, memory/) or named
    in $CILAB_PLUGINS; the message names it. Raised while cilab itself imports, before any command runs."""
