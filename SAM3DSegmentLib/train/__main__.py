"""``python -m SAM3DSegmentLib.train CONFIG [--set key=value ...]`` is ``sam3d train`` (:mod:`SAM3DSegmentLib.cli.train`)."""
import sys

from ..cli.train import main

if __name__ == "__main__":
    sys.exit(main())
