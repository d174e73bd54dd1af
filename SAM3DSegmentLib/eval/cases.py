"""The cases an evaluation scores: an image and its binary targets, from a dataset folder or the bundled sample.

Dataset folders are read by :func:`SAM3DSegmentLib.data.datasets.read_nnunet_dataset` (the reader training
uses too). Every label value is its own binary target, named by ``dataset.json`` or, without one,
``label_<value>`` for every value present in the case.
"""
from __future__ import annotations

from collections import abc as _abc
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import Volume
from ..data.datasets import CaseFiles, read_case, read_nnunet_dataset

__all__ = ["EvaluationError", "Case", "LabelTargets", "discover_dataset", "load_case", "sample_cases",
           "filter_targets"]


class EvaluationError(ValueError):
    """Bad evaluation options (clicks, protocols, targets), with a message saying how to fix it."""


@dataclass
class Case:
    """One image and its targets: ``{target name: bool mask [k, j, i] on the image grid}`` (any mapping;
    :func:`load_case` gives a lazy one so a 100-label case does not hold 100 masks)."""

    name: str
    image: Volume
    targets: Mapping[str, np.ndarray]


class LabelTargets(_abc.Mapping):
    """``{name: label_map == value}``, computed on access (read-only mapping)."""

    def __init__(self, label_map: np.ndarray, values: Dict[str, int]):
        self._labels = label_map
        self._values = dict(values)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._labels == self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def label_value(self, name: str) -> int:
        """The label-map value of target ``name``."""
        return self._values[name]


def discover_dataset(root: str, split: str = "Tr") -> Tuple[List[CaseFiles], Optional[Dict[int, str]]]:
    """``(cases sorted by name, {label value: name} from dataset.json or None)`` of an nnU-Net raw dataset
    folder (``--data``); raises :class:`~SAM3DSegmentLib.data.datasets.DataError`."""
    ds = read_nnunet_dataset(root, split, source="--data")
    return ds.cases, ds.labels


def _select(available: Sequence[str], values: Dict[str, int], wanted: Optional[Sequence[str]]) -> List[str]:
    if not wanted:
        return list(available)
    out = []
    for w in wanted:
        hit = [n for n in available if n == w or n.lower() == str(w).lower() or str(values.get(n)) == str(w)]
        if not hit:
            raise EvaluationError(f"--labels: no target {w!r}; available: {', '.join(available)} "
                                  "(names, or label values for --data)")
        out.extend(h for h in hit if h not in out)
    return out


def load_case(ref: CaseFiles, names: Optional[Dict[int, str]], wanted: Optional[Sequence[str]] = None) -> Case:
    """Read one case; every label value named in ``names`` (without names: every value present) becomes a
    binary target; ``wanted`` keeps only those targets (names or label values)."""
    image, label = read_case(ref)
    lab = np.asarray(label.array)
    if names:
        mapping = dict(names)
    else:
        present = np.flatnonzero(np.bincount(lab.ravel()))
        mapping = {int(v): f"label_{int(v)}" for v in present if v != 0}
    values = {n: v for v, n in mapping.items()}
    chosen = _select(list(mapping.values()), values, wanted)
    return Case(ref.name, image, LabelTargets(lab, {n: values[n] for n in chosen}))


def sample_cases(name: str = "chest") -> List[Case]:
    """The bundled sample data (``--sample chest``: slicerio's chest CT with its 7 segments)."""
    if name != "chest":
        raise EvaluationError(f"--sample {name!r}: the only sample is 'chest'")
    from ..data import sample_data

    image = sample_data.chest_ct()
    segs = sample_data.chest_segments(image)
    return [Case(str(image.meta.get("name", "CTChest4")), image,
                 {n: np.asarray(v.array) != 0 for n, v in segs.items()})]


def filter_targets(case: Case, wanted: Optional[Sequence[str]]) -> Case:
    """``case`` with only the ``wanted`` targets (names, any case); all of them without ``wanted``."""
    chosen = _select(list(case.targets), {}, wanted)
    return Case(case.name, case.image, {n: case.targets[n] for n in chosen})
