"""``python -m sss_ext``: see :mod:`sss_ext.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
