"""``python -m nanomorph.cli`` runs the console script (the tests and scripts use it)."""

import sys

from nanomorph.cli import main

sys.exit(main())
