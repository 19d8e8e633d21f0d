"""`python -m engine` is `hotserve`."""

import sys

from .cli import main

if __name__ == "__main__":  # the REST decoder's spawned worker imports this module too
    sys.exit(main())
