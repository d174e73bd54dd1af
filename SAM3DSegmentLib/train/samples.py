"""Training samples: normalisation, crops, the map-style datasets and their loaders.

Crops (:func:`~SAM3DSegmentLib.eval.reference_pipeline.reference_crop_or_pad`, the reference's CropOrPad,
padded with ``data.pad_value``) are in the network's axis order (a, b, c) = RAS-canonical (i, j, k) of the
preprocessing cache (:mod:`.data`). Every random choice of a sample is keyed by ``(seed, epoch, index)`` (see
:class:`EpochTagged`), so a sample is the same whichever worker process, rank or resumed run draws it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..eval.reference_pipeline import reference_crop_or_pad
from .config import ConfigError, TrainConfig
from .data import CachedCase, DataError, PreparedData, Target, prepare_dataset
from .distributed import DistInfo

__all__ = ["normalize_ct", "EpochTagged", "TrainTargets", "ValTargets", "Loaders", "make_loaders"]


def normalize_ct(crop: np.ndarray, clamp: Sequence[float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Per-sample: clamp (CT), then z-normalise with mean/std over the voxels > 0 (all voxels if < 2)."""
    x = crop.astype(np.float32, copy=True)
    if clamp:
        np.clip(x, float(clamp[0]), float(clamp[1]), out=x)
    m = x > 0
    sel = x[m] if int(m.sum()) >= 2 else x.reshape(-1)
    mean = float(sel.mean(dtype=np.float64))
    std = float(sel.std(dtype=np.float64))
    return ((x - mean) / max(std, 1e-8)).astype(np.float32)


class _CaseStore:
    """Loads cached cases (kept in memory after first use, per process)."""

    def __init__(self, cases: Sequence[CachedCase], max_items: int = 64):
        self.cases = list(cases)
        self.max_items = max_items
        self._mem: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def get(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if i not in self._mem:
            with np.load(self.cases[i].path) as z:
                item = (z["image"], z["label"])
            if len(self._mem) >= self.max_items:
                self._mem.pop(next(iter(self._mem)))
            self._mem[i] = item
        return self._mem[i]


class EpochTagged:
    """Wrap an index sampler so it yields ``(epoch, index)``: per-sample randomness is keyed by
    ``(seed, epoch, index)``, independent of worker processes, ranks and resumption."""

    def __init__(self, sampler, epoch: int = 0, skip: int = 0):
        self.sampler = sampler
        self.epoch = epoch
        self.skip = skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for n, i in enumerate(self.sampler):
            if n >= self.skip:
                yield (self.epoch, int(i))

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class TrainTargets:
    """Map-style dataset of training samples, indexed by ``(epoch, index)`` (see :class:`EpochTagged`).

    Sample ``index`` starts with target ``index % len(targets)``; the crop (``size``^3, centred on the
    target's label box, optional jitter) must hold more than ``min_label_voxels`` label voxels, else
    another target is drawn (up to ``max_tries``, then the best seen is used). Random flips on 3 axes,
    CT clamp and per-sample z-normalisation. Returns float32 ``image``/``label`` ``(1, S, S, S)`` in (a, b, c).
    """

    def __init__(self, cases: Sequence[CachedCase], targets: Sequence[Target], size: int, seed: int = 0,
                 jitter: int = 0, flip: bool = True, min_label_voxels: int = 1000, max_tries: int = 20,
                 clamp: Sequence[float] = (-1000.0, 1000.0), pad_value: float = 0.0,
                 samples_per_epoch: int = 0):
        if not targets:
            raise DataError("the training split has no targets; add cases or lower data.val_fraction")
        self.store = _CaseStore(cases)
        self.targets = list(targets)
        self.size, self.seed, self.jitter, self.flip = int(size), int(seed), int(jitter), bool(flip)
        self.min_label_voxels, self.max_tries = int(min_label_voxels), int(max_tries)
        self.clamp, self.pad_value = list(clamp or []), float(pad_value)
        self.samples_per_epoch = int(samples_per_epoch) or len(self.targets)
        self.warned = False

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _crop(self, t: Target, rng: Optional[np.random.Generator]):
        image, label = self.store.get(t.case_index)
        center = [(lo + hi - 1) // 2 for lo, hi in t.bbox]
        if self.jitter and rng is not None:
            center = [c + int(rng.integers(-self.jitter, self.jitter + 1)) for c in center]
        lab = reference_crop_or_pad(label, center, self.size)[0] == t.value
        return image, center, lab

    def __getitem__(self, key) -> Dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        ti = int(index) % len(self.targets)
        best = None
        for attempt in range(max(1, self.max_tries)):
            t = self.targets[ti]
            image, center, lab = self._crop(t, rng)
            n = int(lab.sum())
            if best is None or n > best[3]:
                best = (t, image, center, n, lab, ti)
            if n > self.min_label_voxels:
                break
            ti = int(rng.integers(len(self.targets)))
        t, image, center, n, lab, ti = best
        if n <= self.min_label_voxels and not self.warned:
            warnings.warn(f"no target gave a crop with more than {self.min_label_voxels} label voxels after "
                          f"{self.max_tries} tries (best {n}); using it anyway. Lower "
                          "data.min_crop_label_voxels for small structures or small crops")
            self.warned = True
        img = normalize_ct(reference_crop_or_pad(image, center, self.size, self.pad_value)[0], self.clamp)
        lab = lab.astype(np.float32)
        if self.flip:
            for ax in range(3):
                if rng.random() < 0.5:
                    img = np.flip(img, ax)
                    lab = np.flip(lab, ax)
        return {"image": np.ascontiguousarray(img)[None], "label": np.ascontiguousarray(lab)[None],
                "index": int(index), "epoch": int(epoch), "target": ti}


class ValTargets:
    """Deterministic validation samples: one centred crop per validation target, no flips."""

    def __init__(self, cases: Sequence[CachedCase], targets: Sequence[Target], size: int,
                 clamp: Sequence[float] = (-1000.0, 1000.0), pad_value: float = 0.0, max_targets: int = 0):
        self.store = _CaseStore(cases)
        self.targets = list(targets)[: max_targets or None]
        self.size, self.clamp, self.pad_value = int(size), list(clamp or []), float(pad_value)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        t = self.targets[index]
        image, label = self.store.get(t.case_index)
        center = [(lo + hi - 1) // 2 for lo, hi in t.bbox]
        img = normalize_ct(reference_crop_or_pad(image, center, self.size, self.pad_value)[0], self.clamp)
        lab = (reference_crop_or_pad(label, center, self.size)[0] == t.value).astype(np.float32)
        return {"image": img[None], "label": lab[None], "index": int(index), "epoch": 0, "target": index}


@dataclass
class Loaders:
    prepared: PreparedData
    #: the training sampler (call ``set_epoch(epoch, skip)`` before each epoch)
    sampler: EpochTagged
    train: Any
    #: None without validation targets or with ``val.every_epochs`` 0
    val: Optional[Any]


def make_loaders(cfg: TrainConfig, info: DistInfo, image_size: int, pin_memory: bool, log=print) -> Loaders:
    """Prepare the data (rank 0 first: it writes the demo data and the cache, the other ranks then read the
    cache) and build the training loader (``DistributedSampler`` over the ranks) and the validation loader."""
    from torch.utils.data import DataLoader, DistributedSampler

    from .distributed import barrier

    d = cfg.data
    size = d.crop_size or image_size
    if size != image_size:
        raise ConfigError(f"data.crop_size {size} differs from the model's image_size {image_size}; the "
                          "encoder takes exactly image_size^3 crops (leave data.crop_size at 0)")
    cache = d.cache_dir or os.path.join(cfg.output_dir, "cache")
    kwargs = dict(layout=d.layout, spacing=d.spacing, image_dtype=d.image_dtype, min_target_mm3=d.min_target_mm3,
                  val_fraction=d.val_fraction, val_cases=d.val_cases, split_seed=d.split_seed, log=log)
    if info.is_main:
        if d.make_demo_data:
            from ..data.demo_data import ensure_demo_dataset

            for root in d.roots:
                ensure_demo_dataset(root, log=log)
        prepared = prepare_dataset(d.roots, cache, **kwargs)
    barrier(info)
    if not info.is_main:
        prepared = prepare_dataset(d.roots, cache, **kwargs)
    log(f"data: {len(prepared.cases)} cases ({len(prepared.train_ids)} train, {len(prepared.val_ids)} "
        f"validation), {len(prepared.train_targets)} training targets, {len(prepared.val_targets)} "
        f"validation targets; cache {cache}")
    train_ds = TrainTargets(prepared.cases, prepared.train_targets, size, seed=cfg.seed, jitter=d.crop_jitter,
                            flip=d.flip, min_label_voxels=d.min_crop_label_voxels, max_tries=d.max_resample_tries,
                            clamp=d.ct_clamp, pad_value=d.pad_value, samples_per_epoch=cfg.loop.samples_per_epoch)
    sampler = EpochTagged(DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                             seed=cfg.seed, drop_last=False))
    train_loader = DataLoader(train_ds, batch_size=cfg.loop.batch_size, sampler=sampler,
                              num_workers=d.num_workers, drop_last=False, pin_memory=pin_memory)
    val_loader = None
    if prepared.val_targets and cfg.val.every_epochs > 0:
        val_ds = ValTargets(prepared.cases, prepared.val_targets, size, clamp=d.ct_clamp, pad_value=d.pad_value,
                            max_targets=cfg.val.max_targets)
        val_loader = DataLoader(val_ds, batch_size=max(1, cfg.loop.batch_size), shuffle=False,
                                num_workers=d.num_workers)
    return Loaders(prepared, sampler, train_loader, val_loader)
