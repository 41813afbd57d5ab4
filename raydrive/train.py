"""`python -m raydrive.train MODEL ...`: see `raydrive/launch/train.py`."""

import sys

from raydrive.launch.train import main

if __name__ == "__main__":
    sys.exit(main())
