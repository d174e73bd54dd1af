#!/usr/bin/env python
"""Automatic mask generator (3D): recall of known nodules, false positives per scan, run time and peak memory.

Prints one JSON object (and writes it to ``--out`` when given). Usage::

    python benchmarks/bench_auto.py [--phantoms 3] [--demo-phantoms 2] [--threads 2] [--timing] [--full-size]

Parts:

* ``phantoms``: synthetic chest CTs (``data/nodule_phantoms.ChestPhantom``, 256x256x200 voxels of 1.2x1.2x1.5 mm)
  with 11 nodules of 3 to 30 mm (solid and part-solid; free, juxta-pleural, juxta-vascular) and 3 more where the
  generator's regions meet. Recall at mask IoU >= 0.5 and false positives per scan, overall and by size, kind and
  site, for (a) the model-free oracle (``eval/oracle.py``: the machinery alone; the true object under each prompt
  at the model's 32^3 output resolution) and (b) the bundled demo model (the ``nodules`` preset, and unfiltered:
  no stability, volume or region-cut filter). Control: the demo model's mask after one include click at each
  nodule's centre through the ordinary click loop (``Session``), outside the generator.
* ``chest_ct``: the bundled chest CT (slicerio's CTChest4, 3.05x3.05x10 mm) with 5 spherical nodules of 10-30 mm
  implanted in its lungs (30 HU, ground truth = sphere inside the lung), same measures; and its 7 reference
  segments as objects for the ``everything`` preset (a 20 mm grid), oracle and demo model.
* ``timing`` (``--timing``): a 512x512x300 chest phantom written as NRRD, ``nodules`` preset, each model in a fresh
  subprocess: wall time, CPU time and peak resident memory of the whole run (read the file, load the model,
  candidates, encodes, decodes, masks).
  ``--full-size`` adds (or, without ``--timing``, times only) the full-size SAM-Med3D architecture (vit_b_ori,
  random weights: same cost as the published weights, which cannot be downloaded here).

The load average is recorded: on a shared machine wall times stretch; CPU seconds do not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0)
SIZE_BINS = ((3, 6), (6, 10), (10, 20), (20, 31))


def _load_demo(threads):
    import torch

    torch.set_num_threads(threads)
    from SAM3DSegmentLib.inference.backends import load_backend

    return load_backend("demo", device="cpu", threads=threads)[0]


def _score(result, case_nodules, table, iou=0.5):
    from SAM3DSegmentLib.eval.detection import match_instances, objects_of

    m = match_instances([i.mask for i in result.instances], objects_of(case_nodules), iou)
    rows = []
    for row in table:
        rows.append(dict(row, best_iou=m["best_iou"].get(row["label"], 0.0), found=row["label"] in m["matched"]))
    return {"tp": m["tp"], "fn": m["fn"], "fp": m["fp"], "instances": len(result.instances), "rows": rows,
            "decoded": result.decoded, "regions": len(result.regions), "rejected": result.rejected,
            "timings": {k: round(v, 3) for k, v in result.timings.items()}}


def _summary(runs):
    rows = [r for run in runs for r in run["rows"]]
    out = {"scans": len(runs), "nodules": len(rows), "recall": _rate(rows),
           "fp_per_scan": round(float(np.mean([run["fp"] for run in runs])), 2) if runs else None,
           "recall_by_size_mm": {f"{a}-{b}": _rate([r for r in rows if a <= r["diameter_mm"] < b]) for a, b in SIZE_BINS},
           "recall_by_kind": {k: _rate([r for r in rows if r["kind"] == k]) for k in ("solid", "part_solid")},
           "recall_by_site": {s: _rate([r for r in rows if r["site"] == s])
                              for s in ("free", "juxta_pleural", "juxta_vascular", "region_border")},
           "median_best_iou": round(float(np.median([r["best_iou"] for r in rows])), 3) if rows else None,
           "decoded_per_scan": round(float(np.mean([run["decoded"] for run in runs])), 1),
           "seconds_per_scan": round(float(np.mean([run["timings"]["total_s"] for run in runs])), 2)}
    return out


def _rate(rows):
    return None if not rows else round(sum(r["found"] for r in rows) / len(rows), 3)


def phantom_cases(n, seed0=100):
    """``n`` chest phantoms with 11 nodules each (sizes, kinds and sites in turn) plus 3 at region borders."""
    from SAM3DSegmentLib.data.nodule_phantoms import ChestPhantom
    from SAM3DSegmentLib.inference.auto_options import AutoOptions, preset
    from SAM3DSegmentLib.inference.automatic import RegionLattice
    from SAM3DSegmentLib.inference.candidates import SearchArea

    for s in range(n):
        ph = ChestPhantom(seed=seed0 + s)
        nodules = ph.random_nodules(SIZES)
        torso = ph.case([]).image
        lat = RegionLattice(torso, *SearchArea(torso).bounds_ras(), AutoOptions(**preset("nodules")))
        lungs = np.argwhere((ph.labels == 2) | (ph.labels == 3))      # lung voxels (k, j, i) of the torso
        rng = np.random.default_rng(seed0 + s)
        for _ in range(300):                       # a lung point moved onto a plane where two regions meet
            if sum(nd.site == "region_border" for nd in nodules) == 3:
                break
            p = torso.ijk_to_ras_points(lungs[rng.integers(len(lungs))][::-1].astype(float))
            q = lat.axes.T @ p
            ax = int(rng.integers(3))
            if lat.n[ax] < 2:
                continue
            t = np.clip(np.floor((q[ax] - lat.first[ax]) / lat.stride), 0, lat.n[ax] - 2)
            q[ax] = lat.first[ax] + (t + 0.5) * lat.stride
            d = float(rng.choice([6.0, 10.0, 15.0, 20.0]))
            nd = ph.place(d, ("solid", "part_solid")[ax % 2], "region_border", nodules, at=lat.axes @ q)
            if nd is not None:
                nodules.append(nd)
        yield ph.case(nodules)


def implanted_chest_ct(seed=0):
    """The bundled chest CT with spherical nodules of 10-30 mm in its lungs: (image, nodule labels, table)."""
    from scipy import ndimage

    from SAM3DSegmentLib.core.geometry import Volume
    from SAM3DSegmentLib.data.sample_data import chest_ct, chest_segments

    ct = chest_ct()
    segs = chest_segments(ct)
    lungs = (segs["right lung"].array > 0) | (segs["left lung"].array > 0)
    sp = ct.spacing[::-1]
    depth = ndimage.distance_transform_edt(lungs, sampling=sp)
    rng = np.random.default_rng(seed)
    img = np.asarray(ct.array).astype(np.float32).copy()
    labels = np.zeros(img.shape, np.uint16)
    kji = np.indices(img.shape).reshape(3, -1).T
    ras = ct.ijk_to_ras_points(kji[:, ::-1].astype(float)).reshape(img.shape + (3,))
    table, placed = [], []
    for n, d in enumerate((10.0, 15.0, 20.0, 25.0, 30.0), start=1):
        ok = np.argwhere(depth > d / 2 + 2.0)
        for _ in range(200):
            c = ras[tuple(ok[rng.integers(len(ok))])]
            if all(np.linalg.norm(c - pc) > (d + pd) / 2 + 5 for pc, pd in placed):
                break
        placed.append((c, d))
        ball = (np.linalg.norm(ras - c, axis=-1) <= d / 2) & lungs
        img[ball] = 30.0
        labels[ball] = n
        table.append({"label": n, "diameter_mm": d, "kind": "solid", "site": "free",
                      "centre_ras": [round(float(v), 2) for v in c], "voxels": int(ball.sum())})
    return ct.with_array(np.rint(img).astype(np.int16)), Volume(labels, ct.ijk_to_ras.copy()), table, segs


def one_click_masks(backend, case):
    """Control outside the generator: the ordinary click loop's mask after one include click at each nodule's centre
    (volume in ml and IoU with the nodule), to tell the model's quality from the generator's."""
    from SAM3DSegmentLib.inference.session import Session

    ml = abs(float(np.linalg.det(case.image.ijk_to_ras[:3, :3]))) / 1000.0
    rows = []
    for row in case.table:
        s = Session(backend)
        s.set_volume(case.image)
        s.add_click(row["centre_ras"], True)
        m, t = s.mask() > 0, case.nodules.array == row["label"]
        rows.append({"label": row["label"], "diameter_mm": row["diameter_mm"], "site": row["site"],
                     "mask_ml": round(float(m.sum() * ml), 3), "iou": round(float((m & t).sum() / max((m | t).sum(), 1)), 4)})
    return rows


def run_accuracy(args, out):
    from SAM3DSegmentLib.eval.oracle import OracleRegionDecoder
    from SAM3DSegmentLib.inference.auto_options import AutoOptions, preset
    from SAM3DSegmentLib.inference.automatic import AutomaticMaskGenerator3D

    nod = AutoOptions(**preset("nodules"))
    loose = AutoOptions(**preset("nodules", min_stability=0.0, max_volume_ml=None, drop_cut=False))
    demo = _load_demo(args.threads) if args.demo_phantoms or args.chest else None
    runs = {"oracle": [], "demo": [], "demo_unfiltered": []}
    clicks = []
    for n, case in enumerate(phantom_cases(max(args.phantoms, args.demo_phantoms))):
        if n < args.phantoms:
            gen = AutomaticMaskGenerator3D(region_decoder=OracleRegionDecoder(case.structures), options=nod)
            runs["oracle"].append(_score(gen.generate(case.image), case.nodules, case.table))
        if n < args.demo_phantoms:
            runs["demo"].append(_score(AutomaticMaskGenerator3D(demo, nod).generate(case.image), case.nodules, case.table))
            runs["demo_unfiltered"].append(
                _score(AutomaticMaskGenerator3D(demo, loose).generate(case.image), case.nodules, case.table))
            clicks += one_click_masks(demo, case)
        print(f"phantom {n + 1} done", file=sys.stderr, flush=True)
    out["phantoms"] = {"grid": "256x256x200 voxels, 1.2x1.2x1.5 mm", "nodules_per_scan": "11 + 3 at region borders",
                       "options": nod.to_dict(),
                       **{k: {"summary": _summary(v), "scans": v} for k, v in runs.items() if v}}
    if clicks:
        out["phantoms"]["demo_one_click_control"] = {
            "what": "the click loop (Session, no generator): one include click at each nodule's centre, demo model",
            "median_mask_ml": round(float(np.median([c["mask_ml"] for c in clicks])), 2),
            "median_iou": round(float(np.median([c["iou"] for c in clicks])), 3),
            "iou_at_least_0.5": sum(c["iou"] >= 0.5 for c in clicks), "nodules": len(clicks), "rows": clicks}
    if not args.chest:
        return
    image, labels, table, segs = implanted_chest_ct()
    chest = {"nodules": {}, "segments": {}}
    for name, gen in (("oracle", AutomaticMaskGenerator3D(region_decoder=OracleRegionDecoder(labels), options=nod)),
                      ("demo", AutomaticMaskGenerator3D(demo, nod)),
                      ("demo_unfiltered", AutomaticMaskGenerator3D(demo, loose)),):
        run = _score(gen.generate(image), labels, table)
        chest["nodules"][name] = {"summary": _summary([run]), "scan": run}
    from SAM3DSegmentLib.core.geometry import Volume

    names = list(segs)
    seg_labels = np.zeros(image.array.shape, np.uint16)
    for n, name in enumerate(names, start=1):
        seg_labels[segs[name].array > 0] = n
    seg_volume = Volume(seg_labels, image.ijk_to_ras.copy())
    seg_table = [{"label": n, "name": name, "diameter_mm": 0.0, "kind": "structure", "site": "structure"}
                 for n, name in enumerate(names, start=1)]
    every = AutoOptions(**preset("everything"))
    for name, gen in (("oracle", AutomaticMaskGenerator3D(region_decoder=OracleRegionDecoder(seg_volume), options=every)),
                      ("demo", AutomaticMaskGenerator3D(demo, every))):
        run = _score(gen.generate(image), seg_volume, seg_table)
        chest["segments"][name] = {"recall": _rate(run["rows"]), "fp": run["fp"], "scan": run}
    out["chest_ct"] = dict(chest, note="CTChest4 (128x128x34, 3.05x3.05x10 mm) with 5 implanted 10-30 mm spheres; "
                                       "segments: its 7 reference segments, 'everything' preset")


TIMING_WORKER = r"""
import json, resource, sys, time
model, threads, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import torch
torch.set_num_threads(threads)
t0, c0 = time.perf_counter(), time.process_time()
from SAM3DSegmentLib.io import read_volume
image = read_volume(path)
from SAM3DSegmentLib.inference.backends import LocalBackend, load_backend
if model == "demo":
    backend = load_backend("demo", device="cpu", threads=threads)[0]
else:
    from SAM3DSegmentLib.models.sam_med3d.model import build_sam_med3d
    torch.manual_seed(0)
    backend = LocalBackend(build_sam_med3d(), name="vit_b_ori (random weights)")
from SAM3DSegmentLib.inference.auto_options import AutoOptions, preset
from SAM3DSegmentLib.inference.automatic import AutomaticMaskGenerator3D
res = AutomaticMaskGenerator3D(backend, AutoOptions(**preset("nodules"))).generate(image)
print(json.dumps({"model": backend.name, "threads": threads, "image": list(image.shape_ijk),
                  "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "regions": len(res.regions), "decoded": res.decoded, "instances": len(res.instances),
                  "candidates": res.candidates, "timings": {k: round(v, 2) for k, v in res.timings.items()}}))
"""


def run_timing(args, out):
    """Each model in a fresh subprocess: read the 512x512x300 CT (NRRD), load the model, generate (wall, CPU, peak)."""
    import tempfile

    from SAM3DSegmentLib.data.nodule_phantoms import ChestPhantom
    from SAM3DSegmentLib.io import write_volume

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads))
    out["timing"] = {"preset": "nodules", "image": "chest phantom 512x512x300 voxels, 0.8x0.8x1.0 mm, 6 nodules",
                     "measured": "one process per model: read the NRRD, load the model, generate (wall and CPU "
                                 "seconds, peak resident memory of the process)"}
    with tempfile.TemporaryDirectory() as tmp:
        ph = ChestPhantom(seed=7, shape_ijk=(512, 512, 300), spacing=(0.8, 0.8, 1.0))
        path = os.path.join(tmp, "ct.nrrd")
        write_volume(ph.case(ph.random_nodules([4.0, 6.0, 8.0, 12.0, 20.0, 30.0])).image, path)
        del ph
        for model in (("demo",) if args.timing else ()) + (("vit_b_ori",) if args.full_size else ()):
            load0 = os.getloadavg()[0]
            r = subprocess.run([sys.executable, "-c", TIMING_WORKER, model, str(args.threads), path],
                               capture_output=True, text=True, env=env, timeout=3600)
            if r.returncode != 0:
                out["timing"][model] = {"error": r.stderr.strip().splitlines()[-1:]}
                continue
            out["timing"][model] = dict(json.loads(r.stdout.strip().splitlines()[-1]),
                                        load_average_1min=[round(load0, 2), round(os.getloadavg()[0], 2)])


def _gpu():
    """The CUDA device's name, or a sentence saying there was none (no GPU figure is then reported)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "none: CPU only (no GPU time measured)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phantoms", type=int, default=3, help="chest phantoms for the oracle (default 3)")
    p.add_argument("--demo-phantoms", type=int, default=2, help="of them, run with the demo model (default 2)")
    p.add_argument("--no-chest", dest="chest", action="store_false", help="skip the bundled chest CT")
    p.add_argument("--timing", action="store_true", help="time a 512x512x300 CT (subprocess per model)")
    p.add_argument("--full-size", action="store_true",
                   help="time the full-size vit_b_ori architecture on the 512x512x300 CT (with --timing: both)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = {"benchmark": "bench_auto", "command": "python benchmarks/bench_auto.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                       "threads": args.threads, "load_average_1min_start": round(os.getloadavg()[0], 2),
                       "gpu": _gpu()},
           "iou_threshold": 0.5}
    t0 = time.perf_counter()
    if args.phantoms or args.demo_phantoms or args.chest:
        run_accuracy(args, out)
    if args.timing or args.full_size:
        run_timing(args, out)
    out["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
