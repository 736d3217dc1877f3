"""``python -m erase_core``: see :mod:`erase_core.cli`."""
import sys

from .cli import main

sys.exit(main())
