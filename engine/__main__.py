"""`python -m engine` is `hotserve`."""

import sys

from .cli import main

sys.exit(main())
