"""Write-back of one click's result into a Slicer segment: the bridge's region path vs the full-volume path.

Prints JSON. Volume 512 x 512 x 300 (i, j, k; int16), one segment; the changed box is 140 x 140 x 40
(i, j, k) voxels. Paths:

* ``bridge_region``: ``SAM3DSegmentLib.slicer.write_mask_to_segment`` (in place through the segment's internal
  labelmap, box-sized; honours overwrite/locked segments). Timed on repeated writes alternating two masks (every write
  changes voxels); ``bridge_region_first`` is the first write (it also grows the labelmap's extent).
* ``full_volume``: what ``slicer.util.updateSegmentBinaryLabelmapFromArray`` does with a full-volume uint8
  array. That function needs ``slicer.modules`` (GUI only), missing in the ``slicer-core`` wheel, so its body is
  reproduced with the same calls: ``vtkSlicerVolumesLogic.CreateAndAddLabelVolume(reference, "__temp__")``,
  ``slicer.util.updateVolumeFromArray``, ``vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode``,
  ``RemoveNode``. It replaces the whole segment and saves no undo state.

Peak memory: each path runs in its own subprocess (``ru_maxrss`` read right after the timed writes, before the
correctness check); reported as the peak above a baseline subprocess that only builds the scene (the int16
volume alone is 150 MB). Usage: ``python benchmarks/bench_bridge_writeback.py [--repeats N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPE_KJI = (300, 512, 512)
BOX = (slice(130, 170), slice(186, 326), slice(200, 340))  # (k, j, i): 40 x 140 x 140


def _build():
    import numpy as np
    import slicer
    import vtk

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from SAM3DSegmentLib import slicer as sb

    scene = slicer.vtkMRMLScene()
    logic = sb.segmentations_logic(scene)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    img = vtk.vtkImageData()
    img.SetDimensions(SHAPE_KJI[2], SHAPE_KJI[1], SHAPE_KJI[0])
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    sb.scalars_view(img)[...] = 0
    volume.SetAndObserveImageData(img)
    volume.SetSpacing(0.7, 0.7, 1.0)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = sb.ensure_segment(seg, name="object")
    shape = tuple(s.stop - s.start for s in BOX)
    k, j, i = np.indices(shape)
    ball = ((k - 20) / 18.0) ** 2 + ((j - 70) / 60.0) ** 2 + ((i - 70) / 60.0) ** 2 <= 1.0
    masks = [ball.astype(np.uint8), (ball & (i < 90)).astype(np.uint8)]
    return scene, logic, volume, seg, segment_id, masks


def run_path(path: str, repeats: int) -> dict:
    import numpy as np

    scene, logic, volume, seg, segment_id, masks = _build()
    from SAM3DSegmentLib import slicer as sb

    times, first = [], None
    if path == "baseline":
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if path == "bridge_region":
        history = sb.SegmentHistory(seg)
        t0 = time.perf_counter()
        sb.write_mask_to_segment(seg, segment_id, masks[0], BOX, volume)
        first = time.perf_counter() - t0
        for n in range(repeats):
            t0 = time.perf_counter()
            sb.write_mask_to_segment(seg, segment_id, masks[(n + 1) % 2], BOX, volume)
            times.append(time.perf_counter() - t0)
        # with an undo state saved before each write, as the module does
        undo_times = []
        for n in range(max(3, repeats // 2)):
            t0 = time.perf_counter()
            sb.write_mask_to_segment(seg, segment_id, masks[n % 2], BOX, volume, history=history)
            undo_times.append(time.perf_counter() - t0)
        extra = {"median_with_undo_state_s": statistics.median(undo_times)}
    elif path == "full_volume":
        import slicer
        import vtk

        volumes_logic = slicer.vtkSlicerVolumesLogic()
        volumes_logic.SetMRMLScene(scene)
        full = np.zeros(SHAPE_KJI, np.uint8)

        def write(mask):
            full[...] = 0
            full[BOX] = mask
            labelmap = volumes_logic.CreateAndAddLabelVolume(volume, "__temp__")
            try:
                slicer.util.updateVolumeFromArray(labelmap, full)
                ids = vtk.vtkStringArray()
                ids.InsertNextValue(segment_id)
                if not logic.ImportLabelmapToSegmentationNode(labelmap, seg, ids):
                    raise RuntimeError("import failed")
            finally:
                scene.RemoveNode(labelmap)

        t0 = time.perf_counter()
        write(masks[0])
        first = time.perf_counter() - t0
        for n in range(repeats):
            t0 = time.perf_counter()
            write(masks[(n + 1) % 2])
            times.append(time.perf_counter() - t0)
        extra = {}
    else:
        raise SystemExit(f"unknown path {path}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # before the check below allocates
    got = sb.read_segment(seg, segment_id, volume)
    expected = np.zeros(SHAPE_KJI, np.uint8)
    expected[BOX] = masks[repeats % 2] if path == "full_volume" else masks[(max(3, repeats // 2) - 1) % 2]
    return {"median_s": statistics.median(times), "min_s": min(times), "first_s": first, "repeats": repeats,
            "result_matches": bool(np.array_equal(got, expected)),
            "peak_rss_mb": peak, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(run_path(args.path, args.repeats)))
        return
    results = {}
    for path in ("baseline", "bridge_region", "full_volume"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--path", path, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results.pop("baseline")["peak_rss_mb"]
    for r in results.values():
        r["peak_rss_above_baseline_mb"] = round(r["peak_rss_mb"] - base, 1)
    import slicer  # noqa: F401 - version report only
    from importlib.metadata import version

    report = {
        "benchmark": "bridge_writeback",
        "volume_ijk": [SHAPE_KJI[2], SHAPE_KJI[1], SHAPE_KJI[0]],
        "box_ijk": [BOX[2].stop - BOX[2].start, BOX[1].stop - BOX[1].start, BOX[0].stop - BOX[0].start],
        "bridge_region": results["bridge_region"],
        "full_volume": results["full_volume"],
        "speedup_median": round(results["full_volume"]["median_s"] / results["bridge_region"]["median_s"], 1),
        "baseline_peak_rss_mb": base,
        "notes": ("full_volume reproduces slicer.util.updateSegmentBinaryLabelmapFromArray with the same calls "
                  "(vtkSlicerVolumesLogic.CreateAndAddLabelVolume, slicer.util.updateVolumeFromArray, "
                  "ImportLabelmapToSegmentationNode, RemoveNode) because slicer.modules is missing in slicer-core; "
                  "it replaces the whole segment and saves no undo state. Each path runs in its own process; "
                  "peak memory is ru_maxrss."),
        "slicer_core": version("slicer-core"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
