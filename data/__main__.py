"""Entry point of `python -m data` (see data/describe.py)."""

import sys

from .describe import main

sys.exit(main())
