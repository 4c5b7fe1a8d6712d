"""``python -m backend_sim`` = ``sscard-backend``."""

import sys

from backend_sim.cli import main

sys.exit(main())
