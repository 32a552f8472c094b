"""`python -m spicegw`, the same as the `spicegw` command."""

import sys

from .cli import main

sys.exit(main())
