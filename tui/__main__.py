"""`python -m tui` runs the same entry point as the `virtdeck` console script."""

import sys

from tui.cli import main

sys.exit(main())
