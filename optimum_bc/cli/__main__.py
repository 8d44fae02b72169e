"""``python -m optimum_bc.cli``: the same entry point as the ``optimum-bc`` command."""

import sys

from . import main


sys.exit(main())
