"""``python -m threaddispatch``: the command line."""

import sys

from threaddispatch.cli import main

sys.exit(main())
