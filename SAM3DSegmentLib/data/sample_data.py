"""Real, offline sample data: the chest CT and its 7-segment segmentation shipped in slicerio's wheel.

* ``chest_ct()``: ``slicerio/data/CTChest4.nrrd`` (128x128x34 voxels along i, j, k; 3.05x3.05x10 mm;
  LPS on disk, converted to RAS here) as a :class:`~SAM3DSegmentLib.core.geometry.Volume` (``array[k, j, i]``).
* ``chest_segments()``: ``slicerio/data/Segmentation.seg.nrrd`` as ``{name: uint8 mask Volume}`` on the
  CT grid: ribs, cervical / thoracic / lumbar vertebral column, right lung, left lung, tissue.

The files are read through ``importlib.resources`` from the installed package; nothing goes online
(``slicerio.testing_data_file_names()`` / ``get_testdata_file`` would, so they are not used).

The segmentation stores all 7 segments in one shared labelmap layer (label values 1..7); its grid is
positioned by its own NRRD space origin/directions. :func:`chest_segments` places every segment onto
the CT grid in PHYSICAL space (nearest neighbour; for this file the two grids coincide exactly, which
the tests check, so it is a copy).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

from ..core.geometry import Volume

__all__ = ["CHEST_SEGMENT_NAMES", "chest_ct", "chest_segments", "slicerio_data_file"]

CHEST_SEGMENT_NAMES = ("ribs", "cervical vertebral column", "thoracic vertebral column",
                       "lumbar vertebral column", "right lung", "left lung", "tissue")


@contextlib.contextmanager
def slicerio_data_file(name: str) -> Iterator[str]:
    """A real file-system path to ``slicerio/data/<name>`` (installed wheel; never downloaded)."""
    from importlib import resources

    try:
        root = resources.files("slicerio") / "data" / name
    except ModuleNotFoundError as err:
        raise FileNotFoundError("slicerio is not installed; `pip install slicerio` (it ships the sample "
                                "chest CT)") from err
    if not root.is_file():
        raise FileNotFoundError(f"slicerio's wheel has no data/{name}; install slicerio>=1.0 from PyPI")
    with resources.as_file(root) as path:
        yield str(path)


def chest_ct() -> Volume:
    """The sample chest CT (HU, int32 on disk) as a RAS ``Volume``."""
    from ..io import read_volume

    with slicerio_data_file("CTChest4.nrrd") as path:
        vol = read_volume(path)
    vol.meta["name"] = "CTChest4"
    return vol


def chest_segments(reference: Optional[Volume] = None) -> Dict[str, Volume]:
    """The 7 sample segments as uint8 masks on the chest CT grid (or on ``reference``'s grid)."""
    from ..io.segmentations import read_segmentation

    ref = chest_ct() if reference is None else reference
    with slicerio_data_file("Segmentation.seg.nrrd") as path:
        return read_segmentation(path, reference=ref)
