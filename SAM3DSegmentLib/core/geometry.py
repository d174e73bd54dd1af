"""Physical space: a voxel array plus its ijk->RAS matrix.

This is the one place where voxel/physical conversions live. Conventions (see README, "Conventions"):

* ``Volume.array`` is indexed ``[k, j, i]`` — the order of ``slicer.util.arrayFromVolume``,
  ``SimpleITK.GetArrayFromImage`` and torch ``(D, H, W)``.
* ``Volume.ijk_to_ras`` is a 4x4 matrix ``[D . diag(spacing) | origin]``; the COLUMNS of ``D`` are the
  i, j, k axis directions in RAS. Integer ijk are voxel centres.
* Files on disk (NIfTI via ITK, NRRD, MHA, DICOM, ``.seg.nrrd``) are LPS: convert with ``LPS_TO_RAS``
  at the file boundary, nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np

from .boxes import mask_bounds  # noqa: F401 - re-exported: callers take it from here too

#: Flip of the first two physical axes; its own inverse (RAS <-> LPS).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_TO_LPS = LPS_TO_RAS


class GeometryError(ValueError):
    """A volume or point that does not make geometric sense (with a message saying how to fix it)."""


def make_ijk_to_ras(spacing: Sequence[float], directions: Optional[np.ndarray] = None,
                    origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Build a 4x4 ijk->RAS matrix. ``directions`` has the unit i, j, k axis directions as COLUMNS."""
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    if np.any(~np.isfinite(spacing)) or np.any(spacing <= 0):
        raise GeometryError(f"spacing must be three positive numbers, got {spacing.tolist()}")
    d = np.eye(3) if directions is None else np.asarray(directions, dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * spacing[None, :]
    m[:3, 3] = np.asarray(origin, dtype=np.float64).reshape(3)
    return m


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points of shape (..., 3)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass
class Volume:
    """A 3D scalar image in physical (RAS) space.

    ``array`` is ``[k, j, i]``; ``ijk_to_ras`` maps (i, j, k, 1) voxel-centre indices to RAS millimetres.
    ``meta`` carries optional provenance (source path, modality, DICOM series UID, ...).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise GeometryError(
                f"expected a 3D volume, got an array of shape {arr.shape} ({arr.ndim}D); "
                "give a single 3D scalar image (split 4D series into 3D frames first)")
        if min(arr.shape) < 1:
            raise GeometryError(f"volume has an empty axis: shape {arr.shape}")
        m = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)):
            raise GeometryError("ijk_to_ras must be a finite 4x4 matrix")
        if abs(np.linalg.det(m[:3, :3])) < 1e-12:
            raise GeometryError("ijk_to_ras is singular (zero spacing or collinear axes)")
        self.array = arr
        self.ijk_to_ras = m

    # ----------------------------------------------------------------- geometry
    @property
    def shape_ijk(self) -> Tuple[int, int, int]:
        """Number of voxels along i, j, k (the reverse of ``array.shape``)."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def directions(self) -> np.ndarray:
        """Unit i, j, k axis directions in RAS as the columns of a 3x3 matrix."""
        return self.ijk_to_ras[:3, :3] / self.spacing[None, :]

    @property
    def origin(self) -> np.ndarray:
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        return apply_affine(self.ijk_to_ras, ijk)

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Continuous ijk (voxel centres are integers) for RAS points of shape (..., 3)."""
        return apply_affine(self.ras_to_ijk, ras)

    def contains_ijk(self, ijk: np.ndarray) -> np.ndarray:
        """True where the continuous index lies inside the voxel grid (voxel-edge inclusive)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        hi = np.asarray(self.shape_ijk, dtype=np.float64) - 0.5
        return np.all((ijk >= -0.5) & (ijk <= hi), axis=-1)

    def ras_to_voxel(self, ras: Sequence[float]) -> Tuple[int, int, int]:
        """Nearest voxel (i, j, k) for one RAS point; a clear error when it lies outside the volume."""
        ijk = self.ras_to_ijk_points(np.asarray(ras, dtype=np.float64).reshape(3))
        if not bool(self.contains_ijk(ijk)):
            lo = self.ijk_to_ras_points(np.zeros(3))
            hi = self.ijk_to_ras_points(np.asarray(self.shape_ijk) - 1.0)
            raise GeometryError(
                f"point R,A,S = {np.round(ras, 2).tolist()} lies outside the volume "
                f"(ijk {np.round(ijk, 1).tolist()}, grid {list(self.shape_ijk)}; corner voxels at "
                f"{np.round(lo, 1).tolist()} and {np.round(hi, 1).tolist()} mm). Click inside the image, "
                "or pass voxel indices with --voxel")
        return tuple(int(v) for v in np.floor(ijk + 0.5))  # round half up, voxel centres are integers

    def bounds_ras(self) -> Tuple[np.ndarray, np.ndarray]:
        """Axis-aligned RAS bounding box of the voxel corners."""
        i, j, k = self.shape_ijk
        corners = np.array([[a, b, c] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5)
                            for c in (-0.5, k - 0.5)])
        ras = self.ijk_to_ras_points(corners)
        return ras.min(axis=0), ras.max(axis=0)

    def with_array(self, array: np.ndarray, **meta) -> "Volume":
        """Same grid, other voxels (e.g. a mask)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise GeometryError(f"array shape {array.shape} does not match the volume grid "
                                f"{self.array.shape} (k, j, i)")
        return Volume(array, self.ijk_to_ras.copy(), {**self.meta, **meta})

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        return (self.array.shape == other.array.shape
                and np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=atol))

    # ------------------------------------------------------------ ITK boundary
    @classmethod
    def from_sitk(cls, image, **meta) -> "Volume":
        """From a SimpleITK image (LPS physical space) to a RAS ``Volume``."""
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise GeometryError(
                f"expected a 3D image, got {image.GetDimension()}D; a 2D slice or a 4D series cannot "
                "be segmented in 3D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise GeometryError(
                f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per "
                "voxel (RGB or vector image); convert it to a single-channel CT first")
        d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)  # rows: physical, cols: ijk
        ijk_to_lps = make_ijk_to_ras(image.GetSpacing(), d, image.GetOrigin())
        return cls(sitk.GetArrayFromImage(image), LPS_TO_RAS @ ijk_to_lps, dict(meta))

    def to_sitk(self, array: Optional[np.ndarray] = None):
        """To a SimpleITK image (LPS), optionally with another array on the same grid."""
        import SimpleITK as sitk

        arr = self.array if array is None else np.asarray(array)
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        ijk_to_lps = RAS_TO_LPS @ self.ijk_to_ras
        spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((ijk_to_lps[:3, :3] / spacing[None, :]).reshape(-1).tolist())
        image.SetOrigin(ijk_to_lps[:3, 3].tolist())
        return image


def spacing_mm(spacing: Optional[Sequence[float]]) -> np.ndarray:
    """Three positive finite spacings (mm, one per array axis) as float64; ones for None."""
    if spacing is None:
        return np.ones(3)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or np.any(~np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three positive numbers in mm (one per array axis), got {spacing!r}")
    return sp


def closest_canonical_axes(directions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For each RAS axis (R, A, S) the volume axis (i, j, k) closest to it and its sign.

    Returns ``(perm, signs)`` with ``directions[:, perm[r]] * signs[r]`` the volume axis that points most
    nearly along RAS axis ``r`` (a permutation/flip; any residual rotation stays). For axis-aligned and mildly
    oblique volumes this is the permutation/flip nibabel's ``as_closest_canonical`` applies; for some strongly
    oblique ones nibabel's rule (polar decomposition, then input axes in order) picks another (16 of 300
    random orientations tilted up to 50 degrees). The reference's own rule, for reference mode, is
    :func:`SAM3DSegmentLib.eval.reference_pipeline.reference_orientation`.
    """
    d = np.asarray(directions, dtype=np.float64)
    perm = np.full(3, -1)
    signs = np.ones(3)
    taken = set()
    # Greedy on the largest absolute cosine, like nibabel's io_orientation.
    order = np.dstack(np.unravel_index(np.argsort(-np.abs(d), axis=None), d.shape))[0]
    for ras_axis, vol_axis in order:
        if perm[ras_axis] >= 0 or vol_axis in taken:
            continue
        perm[ras_axis] = vol_axis
        signs[ras_axis] = 1.0 if d[ras_axis, vol_axis] >= 0 else -1.0
        taken.add(int(vol_axis))
    return perm, signs
