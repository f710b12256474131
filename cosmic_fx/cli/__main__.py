"""``python -m cosmic_fx.cli``: the same as the ``cosmic-fx`` script."""

import sys

from cosmic_fx.cli.app import main

sys.exit(main())
