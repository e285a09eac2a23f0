"""``python -m optserve.server`` is the ``optserve`` command."""

import sys

from optserve.server.cli import main

sys.exit(main())
