"""``python -m supervise``: the same as the `supervise` command."""

import sys

from supervise.cli import main

sys.exit(main())
