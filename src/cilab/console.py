"""The ``cilab`` command's entry point: cilab.cli.main, with a plugin that does not import named
in one line (cilab.cli's own imports load the plugin folders, so cli.main cannot catch it)."""

from __future__ import annotations

import sys

from .errors import PluginError


def main(argv: list[str] | None = None) -> int:
    try:
        from .cli import main as cli_main
    except PluginError as e:
        print(f"cilab: error: {e}", file=sys.stderr)
        return 2
    return cli_main(argv)
