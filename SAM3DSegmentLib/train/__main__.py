"""``python -m SAM3DSegmentLib.train CONFIG [--set key=value ...]``."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
