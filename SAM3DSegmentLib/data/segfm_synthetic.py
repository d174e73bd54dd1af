"""A small synthetic set of SegFM challenge cases (``.npz``), for tests and for trying the protocol end to end.

Each case is a :func:`SAM3DSegmentLib.data.phantoms.synthetic_case` phantom (random rotated ellipsoids of
different HU in a body, anisotropic voxels, noise) written in the challenge's layout
(:mod:`SAM3DSegmentLib.data.segfm_npz`): ``imgs`` the HU window [-1000, 1000] scaled to 0..255 (uint8),
``gts`` the objects as labels 1..N, ``spacing`` in (x, y, z) order, and ``boxes`` from the ground truth
(:func:`~SAM3DSegmentLib.data.segfm_npz.boxes_from_gt`) on every case except every third one (the challenge
also leaves the box out of some cases). Everything follows from the seed.

``python -m SAM3DSegmentLib.data.segfm_synthetic OUT_DIR [--cases N] [--seed S]`` writes a set.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .phantoms import synthetic_case
from .segfm_npz import boxes_from_gt, write_segfm_case

__all__ = ["HU_WINDOW", "synthetic_segfm_arrays", "write_synthetic_segfm_set", "main"]

#: The HU range scaled to 0..255.
HU_WINDOW = (-1000.0, 1000.0)


def synthetic_segfm_arrays(seed: int, shape_ijk: Sequence[int] = (64, 64, 40),
                           spacing_xyz: Sequence[float] = (1.2, 1.2, 2.0), n_classes: int = 3
                           ) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """``(imgs uint8 (D, H, W), gts uint8 (D, H, W), spacing (x, y, z))`` of one phantom."""
    vol, masks = synthetic_case(seed, shape_ijk=shape_ijk, spacing=spacing_xyz, n_objects=n_classes)
    lo, hi = HU_WINDOW
    hu = np.asarray(vol.array, dtype=np.float32)
    imgs = np.round(np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    gts = np.zeros(hu.shape, dtype=np.uint8)
    for label, name in enumerate(sorted(masks, key=lambda n: int(n.rsplit("_", 1)[1])), start=1):
        gts[np.asarray(masks[name].array) != 0] = label
    return imgs, gts, tuple(float(v) for v in spacing_xyz)


def write_synthetic_segfm_set(folder: str, n_cases: int = 3, seed: int = 0,
                              shape_ijk: Sequence[int] = (64, 64, 40),
                              spacing_xyz: Sequence[float] = (1.2, 1.2, 2.0), n_classes: int = 3,
                              separate_gts: Optional[str] = None) -> List[str]:
    """Write ``case_000.npz`` ... into ``folder`` (created); returns their paths. Case ``n`` has seed
    ``seed + n``; cases 2, 5, 8, ... have no ``boxes``. With ``separate_gts`` (a folder), ``gts`` goes into a
    file of the same name there instead (the challenge's validation layout)."""
    if int(n_cases) < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    os.makedirs(folder, exist_ok=True)
    if separate_gts:
        os.makedirs(separate_gts, exist_ok=True)
    paths = []
    for n in range(int(n_cases)):
        imgs, gts, spacing = synthetic_segfm_arrays(seed + n, shape_ijk, spacing_xyz, n_classes)
        boxes = None if n % 3 == 2 else boxes_from_gt(gts)
        name = f"case_{n:03d}.npz"
        path = os.path.join(folder, name)
        write_segfm_case(path, imgs, None if separate_gts else gts, spacing, boxes)
        if separate_gts:
            write_segfm_case(os.path.join(separate_gts, name), None, gts, None)
        paths.append(os.path.abspath(path))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m SAM3DSegmentLib.data.segfm_synthetic",
                                description="Write a small synthetic set of SegFM challenge .npz cases.")
    p.add_argument("out", metavar="OUT_DIR", help="folder for the cases (created if missing)")
    p.add_argument("--cases", type=int, default=3, help="number of cases (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    p.add_argument("--classes", type=int, default=3, help="objects per case (default 3)")
    args = p.parse_args(argv)
    existing = [f for f in os.listdir(args.out) if f.endswith(".npz")] if os.path.isdir(args.out) else []
    if existing:
        sys.stderr.write(f"{args.out} already holds .npz files ({len(existing)}); choose an empty folder\n")
        return 1
    for path in write_synthetic_segfm_set(args.out, args.cases, args.seed, n_classes=args.classes):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
