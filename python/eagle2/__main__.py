"""`python -m eagle2`: the `eagle2` command line (eagle2.cli)."""
import sys

from .cli import main

sys.exit(main())
