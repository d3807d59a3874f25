"""``python -m cilab``: the ``cilab`` command (a plugin that does not import named in one line)."""

import sys

from .console import main

sys.exit(main())
