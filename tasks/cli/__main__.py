"""`python -m tasks.cli <command>`: the same as the `tuneloop` console script."""

import sys

from tasks.cli import main

sys.exit(main())
