"""``python -m adamkit``: the same as the ``adamkit`` command."""

import sys

from adamkit.cli import main

sys.exit(main())
