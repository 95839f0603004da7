"""`python -m lmforge`: the same entry point as the `lmforge` command."""

import sys

from lmforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
