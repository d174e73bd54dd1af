"""``python -m SAM3DSegmentLib ...`` is the ``sam3d`` command (see :mod:`SAM3DSegmentLib.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
