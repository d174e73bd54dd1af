"""Shared inputs of the command-line tests: a tiny random SAM-Med3D checkpoint and a small oblique-free,
LPS-flipped, anisotropic CT-like sphere image written to NIfTI."""
from pathlib import Path

import numpy as np

from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.io import read_volume, write_volume


def make_cli_inputs(d: Path) -> dict:
    """``{"dir", "ckpt", "image", "volume", "centre"}``: the sphere's centre voxel (20, 18, 12) in RAS."""
    import torch

    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_sam_med3d(SamMed3DConfig.tiny()), d / "tiny.pt", extra={"name": "tiny-test"})
    shape_ijk = (40, 36, 24)
    ijk_to_ras = make_ijk_to_ras((1.2, 1.1, 2.0), np.diag([-1.0, -1.0, 1.0]), (30.0, 20.0, -15.0))
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape_ijk), indexing="ij")
    sphere = ((i - 20) ** 2 + (j - 18) ** 2 + ((k - 12) * 1.8) ** 2) < 100
    arr = np.where(sphere, 80, -50).astype(np.int16).transpose(2, 1, 0)
    image = d / "ct.nii.gz"
    write_volume(Volume(arr, ijk_to_ras), str(image))
    vol = read_volume(str(image))
    centre_ras = vol.ijk_to_ras_points(np.array([20.0, 18.0, 12.0]))
    return {"dir": d, "ckpt": ckpt, "image": image, "volume": vol, "centre": centre_ras}
