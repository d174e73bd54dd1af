"""Files in and out: volumes and DICOM series (:mod:`.volumes`, :mod:`.dicom`), masks and ``.seg.nrrd``
segmentations (:mod:`.segmentations`). The public names are re-exported here."""
from .errors import AmbiguousMaskError, VolumeReadError, VolumeWriteError
from .segmentations import read_mask, read_segmentation, write_mask, write_segmentation
from .volumes import READ_EXTENSIONS, WRITE_EXTENSIONS, atomic_write, file_extension, read_volume, resample_like, \
    write_volume

__all__ = ["AmbiguousMaskError", "VolumeReadError", "VolumeWriteError", "READ_EXTENSIONS", "WRITE_EXTENSIONS",
           "file_extension", "read_volume", "write_volume", "resample_like", "atomic_write", "write_mask", "read_segmentation",
           "write_segmentation", "read_mask"]
