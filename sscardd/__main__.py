"""``python -m sscardd``: the same program as the ``sscardd`` console script."""

import sys

from sscardd.cli import main

sys.exit(main())
