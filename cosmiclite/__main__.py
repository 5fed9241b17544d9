"""`python -m cosmiclite ...` runs the same command line as `cosmiclite ...`."""
import sys

from .cli import main

sys.exit(main())
