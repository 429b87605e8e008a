"""`python -m pagoda` is the `pagoda` command."""

import sys

from pagoda.entrypoints.cli import main

sys.exit(main())
