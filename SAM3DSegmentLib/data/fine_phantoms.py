"""Phantoms with structures finer than the model's 6 mm logit cells: thin shells and small spheres, with
partial-volume edges, a blurred point-spread and noise (benchmarks/bench_guided_upsampling.py, tests).

Objects are ellipsoids in physical space (RAS mm), painted in order, each covering what was painted before
(:mod:`SAM3DSegmentLib.data.phantoms` conventions: ``array[k, j, i]``, a voxel belongs to an object when its
centre lies inside it, later objects remove their voxels from earlier labels). Unlike those phantoms the
image is not a hard step: each object is painted with its partial-volume fraction (one minus half, clipped,
of the signed distance to its surface in voxels, the distance estimated as the ellipsoid function over its
gradient), then the image is blurred with a Gaussian point-spread (``psf_mm`` standard deviation) and
Gaussian noise is added. So an edge looks like a CT edge: a ~1-2 voxel ramp, centred where the label changes.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import Volume
from .phantoms import Ellipsoid, make_volume_grid, oblique_rotation

__all__ = ["paint_scene", "shell_phantom", "spheres_phantom", "organ_phantom", "FINE_CASES", "fine_case"]


def _signed_distance(m: np.ndarray, shape_kji, e: Ellipsoid) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) of every voxel centre to ``e``'s surface."""
    q = e.matrix()
    c = np.asarray(e.centre, dtype=np.float64)
    k, j, i = (np.arange(n, dtype=np.float32) for n in shape_kji)
    a = q @ m[:3, :3]
    b = q @ (m[:3, 3] - c)
    y = [np.float32(a[r, 2]) * k[:, None, None] + np.float32(a[r, 1]) * j[None, :, None]
         + (np.float32(a[r, 0]) * i + np.float32(b[r]))[None, None, :] for r in range(3)]
    r = np.sqrt(y[0] ** 2 + y[1] ** 2 + y[2] ** 2)
    # gradient of |Q (x - c)| in x is Q^T y / |y|
    qt = q.T.astype(np.float32)
    g2 = sum((qt[row, 0] * y[0] + qt[row, 1] * y[1] + qt[row, 2] * y[2]) ** 2 for row in range(3))
    return (r - 1.0) * r / np.sqrt(np.maximum(g2, 1e-12))


def paint_scene(shape_ijk: Sequence[int], spacing: Sequence[float], directions: Optional[np.ndarray],
                background_hu: float, objects: Sequence[Tuple[Optional[str], Ellipsoid, float]],
                noise: float = 15.0, psf_mm: float = 0.6, seed: int = 0,
                centre_ras: Sequence[float] = (0.0, 0.0, 0.0)) -> Tuple[Volume, Dict[str, Volume]]:
    """``(image, {name: mask})``: ``objects`` = ``(label name or None, ellipsoid, HU)`` painted in order with
    partial-volume edges, then the point-spread blur and the noise (int16 HU image, uint8 masks)."""
    from scipy import ndimage

    m = make_volume_grid(shape_ijk, spacing, directions, centre_ras=centre_ras)
    shape_kji = tuple(int(v) for v in np.asarray(shape_ijk)[::-1])
    voxel = float(np.mean(spacing))
    image = np.full(shape_kji, float(background_hu), dtype=np.float32)
    labels: Dict[str, np.ndarray] = {}
    for name, e, hu in objects:
        d = _signed_distance(m, shape_kji, e)
        occ = np.clip(0.5 - d / voxel, 0.0, 1.0)
        image += occ * (np.float32(hu) - image)
        inside = d <= 0
        for arr in labels.values():
            arr[inside] = 0
        if name is not None:
            labels[name] = inside.astype(np.uint8)
    if psf_mm > 0:
        image = ndimage.gaussian_filter(image, [psf_mm / s for s in np.asarray(spacing, float)[::-1]])
    if noise > 0:
        image += np.random.default_rng(seed).standard_normal(shape_kji, dtype=np.float32) * np.float32(noise)
    img = np.clip(np.rint(image), -32768, 32767).astype(np.int16)
    meta = {"source": "phantom:fine"}
    return Volume(img, m, dict(meta)), {k: Volume(v, m.copy(), {**meta, "label": k}) for k, v in labels.items()}


def _grid(oblique: bool, fov_mm: Sequence[float], spacing: Sequence[float]):
    directions = oblique_rotation((17.0, -11.0, 23.0)) if oblique else None
    shape = tuple(int(np.ceil(f / s)) for f, s in zip(fov_mm, spacing))
    return shape, directions


def shell_phantom(thickness_mm: float = 5.0, oblique: bool = False, spacing=(1.0, 1.0, 1.25), seed: int = 0,
                  kind: str = "bone"):
    """A closed ellipsoidal shell ``thickness_mm`` thick (label ``shell``) around an ellipsoid of content.

    ``kind="bone"``: a skull-like 700 HU shell between 35 HU content and a 4 mm 20 HU scalp in air;
    ``kind="wall"``: a bowel-wall-like 40 HU shell between gas (-1000 HU) and fat (-100 HU)."""
    semi = np.array([52.0, 60.0, 46.0])
    rot = oblique_rotation((5.0, 10.0, -8.0))
    shape, directions = _grid(oblique, 2 * semi + 24.0, spacing)
    t = float(thickness_mm)
    if kind == "bone":
        objects = [(None, Ellipsoid((0, 0, 0), semi + 4.0, rot), 20.0),
                   ("shell", Ellipsoid((0, 0, 0), semi, rot), 700.0),
                   ("content", Ellipsoid((0, 0, 0), semi - t, rot), 35.0)]
        background = -1000.0
    elif kind == "wall":
        objects = [("shell", Ellipsoid((0, 0, 0), semi, rot), 40.0),
                   ("lumen", Ellipsoid((0, 0, 0), semi - t, rot), -1000.0)]
        background = -100.0
    else:
        raise ValueError(f"shell kind must be 'bone' or 'wall', got {kind!r}")
    return paint_scene(shape, spacing, directions, background, objects, seed=seed)


def spheres_phantom(radii_mm: Sequence[float] = (3.0, 5.0, 8.0), oblique: bool = False,
                    spacing=(0.8, 0.8, 1.25), seed: int = 0):
    """Small 40 HU spheres (labels ``sphere_<radius>mm``) in -850 HU lung, 40 mm apart along R."""
    n = len(radii_mm)
    centres = [((q - (n - 1) / 2.0) * 40.0, 0.0, 0.0) for q in range(n)]
    shape, directions = _grid(oblique, (40.0 * n + 30.0, 60.0, 60.0), spacing)
    objects = [(f"sphere_{r:g}mm", Ellipsoid(c, (r, r, r)), 40.0) for c, r in zip(centres, radii_mm)]
    return paint_scene(shape, spacing, directions, -850.0, objects, seed=seed)


def organ_phantom(oblique: bool = False, spacing=(0.8, 0.8, 1.25), seed: int = 0):
    """A kidney-like 35 HU ellipsoid (label ``organ``, 40x30x55 mm semi-axes) in -100 HU fat, next to a
    60 HU neighbour it touches (label ``neighbour``: a low-contrast boundary)."""
    rot = oblique_rotation((10.0, 0.0, 20.0))
    shape, directions = _grid(oblique, (170.0, 110.0, 140.0), spacing)
    objects = [("organ", Ellipsoid((-15.0, 0.0, 0.0), (40.0, 30.0, 55.0), rot), 35.0),
               ("neighbour", Ellipsoid((45.0, 5.0, 0.0), (25.0, 25.0, 40.0)), 60.0)]
    return paint_scene(shape, spacing, directions, -100.0, objects, seed=seed)


#: name -> (builder, kwargs) of the benchmark's synthetic cases (each also built oblique).
FINE_CASES = {
    "bone_shell_5mm": (shell_phantom, {"thickness_mm": 5.0, "kind": "bone"}),
    "wall_shell_5mm": (shell_phantom, {"thickness_mm": 5.0, "kind": "wall"}),
    "small_spheres": (spheres_phantom, {}),
    "organ": (organ_phantom, {}),
}


def fine_case(name: str, oblique: bool = False, **kwargs):
    """Build one of :data:`FINE_CASES` (axis-aligned or oblique)."""
    if name not in FINE_CASES:
        raise KeyError(f"unknown fine phantom {name!r}; choose one of {sorted(FINE_CASES)}")
    builder, kw = FINE_CASES[name]
    return builder(oblique=oblique, **{**kw, **kwargs})
