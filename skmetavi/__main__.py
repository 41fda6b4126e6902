"""``python -m skmetavi``: the command line."""

import sys

from skmetavi._cli import main

sys.exit(main())
