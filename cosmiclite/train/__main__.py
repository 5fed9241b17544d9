"""`python -m cosmiclite.train --config FILE ...` = `cosmiclite train ...`, so that `accelerate launch -m
cosmiclite.train` and `torchrun -m cosmiclite.train` work. The command line itself is `cosmiclite.cli`'s."""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
