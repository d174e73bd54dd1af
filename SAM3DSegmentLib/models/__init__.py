"""SAM-Med3D-family model (imports torch). Names follow the released checkpoints and the SAM paper."""
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .sam_med3d.config import SamMed3DConfig
from .sam_med3d.model import SamMed3D, build_sam_med3d

__all__ = ["SamMed3DConfig", "SamMed3D", "build_sam_med3d", "load_checkpoint", "save_checkpoint",
           "read_checkpoint", "CheckpointError"]
