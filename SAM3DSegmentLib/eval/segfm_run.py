"""Running the SegFM protocol over a dataset: the cases of ``--data`` (a folder of the challenge's ``.npz`` cases,
or an nnU-Net raw dataset read by :mod:`SAM3DSegmentLib.data.datasets`), one :func:`~SAM3DSegmentLib.eval.
segfm.run_case` each, the outputs of :mod:`~SAM3DSegmentLib.eval.segfm_report` re-written after every case so
an interrupted run keeps what it finished.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from .segfm import CaseResult, SegFMConfig, SegFMTask, run_case
from .segfm_report import write_outputs

__all__ = ["SegFMData", "segfm_data", "run_segfm"]

Log = Callable[[str], None]


@dataclass
class SegFMData:
    """The cases of one ``--data`` folder: ``kind`` "npz" or "nnunet", ``names`` of the cases (in order),
    ``info`` the data description for the summary; :meth:`tasks` reads them one at a time."""

    kind: str
    names: List[str]
    info: Dict[str, Any]
    _load: Callable[[int], SegFMTask]

    def tasks(self) -> Iterator[SegFMTask]:
        for n in range(len(self.names)):
            yield self._load(n)


def _classes(labels: Optional[Sequence[str]]) -> Optional[List[int]]:
    if not labels:
        return None
    out = []
    for text in labels:
        try:
            out.append(int(str(text).strip()))
        except ValueError:
            raise ValueError(f"--labels {text!r}: the SegFM protocol selects classes by label value "
                             "(e.g. --labels 1 3)") from None
    return out


def segfm_data(root: str, gts: Optional[str] = None, spacing_order: str = "xyz", split: str = "Tr",
               labels: Optional[Sequence[str]] = None, max_cases: Optional[int] = None,
               npz_window: Optional[Sequence[float]] = None) -> SegFMData:
    """The cases of ``root``: its ``.npz`` files (ground truth in them, or in ``gts``: files of the same names;
    images mapped back onto ``npz_window`` when given), or, when it has an ``images<split>/`` folder, the
    nnU-Net dataset. ``labels``: only these label values."""
    from ..data.segfm_npz import list_segfm_cases, read_segfm_case

    root = os.path.abspath(os.fspath(root))
    classes = _classes(labels)
    if os.path.isdir(os.path.join(root, f"images{split}")):
        for flag, value in (("--gts", gts), ("--npz-window", npz_window)):
            if value is not None:
                raise ValueError(f"{flag} is for folders of .npz cases; {root} is an nnU-Net dataset")
        from ..data.datasets import read_case, read_nnunet_dataset

        ds = read_nnunet_dataset(root, split, source="--data")
        refs = ds.cases[:max_cases] if max_cases else ds.cases

        def load_nnunet(n: int) -> SegFMTask:
            image, label = read_case(refs[n])
            return SegFMTask.from_volumes(refs[n].name, image, label.array, ds.labels, classes)

        info = {"name": os.path.basename(root), "path": root, "format": "nnU-Net", "split": split,
                "cases": [r.name for r in refs], "labels": list(labels or [])}
        return SegFMData("nnunet", [r.name for r in refs], info, load_nnunet)
    paths = list_segfm_cases(root)
    paths = paths[:max_cases] if max_cases else paths
    gts_dir = None if gts is None else os.path.abspath(os.fspath(gts))
    if gts_dir is not None and not os.path.isdir(gts_dir):
        raise ValueError(f"--gts {gts_dir}: no such folder; give the folder of ground-truth .npz files")

    def load_npz(n: int) -> SegFMTask:
        gts_path = None if gts_dir is None else os.path.join(gts_dir, os.path.basename(paths[n]))
        return SegFMTask.from_npz(read_segfm_case(paths[n], gts_path, spacing_order), classes, npz_window)

    names = [os.path.basename(p)[: -len(".npz")] for p in paths]
    info = {"name": os.path.basename(root), "path": root, "format": "SegFM .npz", "gts": gts_dir,
            "spacing_order": spacing_order, "npz_window": None if npz_window is None else list(npz_window),
            "cases": names, "labels": list(labels or [])}
    return SegFMData("npz", names, info, load_npz)


def run_segfm(data: SegFMData, backend, config: SegFMConfig, out_dir: str, log: Log = lambda m: None
              ) -> Dict[str, Any]:
    """Run the protocol on every case of ``data``; write the outputs into ``out_dir`` (created if missing) after
    every case; return the summary. A case with no class left to score is skipped (and listed as such)."""
    os.makedirs(out_dir, exist_ok=True)
    results: List[CaseResult] = []
    skipped: List[Dict[str, str]] = []
    t_start = time.perf_counter()
    timing: Dict[str, Any] = {}
    for n, task in enumerate(data.tasks(), start=1):
        log(f"case {n}/{len(data.names)}: {task.name} (classes {task.classes}, grid {list(task.image.shape_ijk)} "
            f"i,j,k)")
        if not task.classes:
            skipped.append({"case": task.name, "reason": "no class to score in the ground truth"})
            log(f"  {task.name}: no class to score, skipped")
            continue
        results.append(run_case(backend, task, config, log))
        timing = {"total_s": time.perf_counter() - t_start, "cases": len(results)}
        write_outputs(out_dir, results, config, skipped, timing, plot=False)
    if not results:
        raise ValueError("no case had a class to score; nothing was evaluated")
    return write_outputs(out_dir, results, config, skipped, timing, plot=True)
