"""The errors of :mod:`SAM3DSegmentLib.io`: their messages name the file, the problem and what to do."""


class VolumeReadError(ValueError):
    """A file or folder that cannot be turned into a 3D scalar volume (the message says why and the fix)."""


class AmbiguousMaskError(VolumeReadError):
    """A mask file holding several segments or labels, read without saying which one (the message lists them)."""


class VolumeWriteError(ValueError):
    """A volume that cannot be written where or how it was asked."""
