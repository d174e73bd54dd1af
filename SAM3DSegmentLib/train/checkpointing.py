"""Checkpoints of training runs: atomic writes, exact resume, small partial (adapter) files, merge, export.

File kinds (all ``torch.save`` dicts loadable with ``weights_only=True``):

* FULL (``format`` = ``sam3dsegment-checkpoint/1``, the models package format): ``config`` (the model
  config dict, adapters included under ``config["adapter"]``) + ``model_state_dict``; training files add
  ``training`` (optimiser, schedule, scaler, RNG states, epoch, step, ...). ``models.load_checkpoint``
  loads them directly (it ignores the extra entries).
* PARTIAL (``format`` = ``sam3dsegment-partial/1``): written when a non-``full`` mode starts from a base
  checkpoint. ``trainable_state_dict`` holds only the trained tensors (adapters, norms, ...), plus
  ``config`` and ``base`` = ``{path, sha256, size}`` identifying the base file. :func:`merge_checkpoint`
  (``sam3d train merge``) loads base + partial and writes a FULL checkpoint that the Slicer module loads.
* ENCODER (``format`` = ``sam3dsegment-image-encoder/1``): ``config`` + ``image_encoder_state_dict``.

Writes go to a temporary file in the destination folder, are flushed and fsync'ed, then renamed over the
target (``os.replace``) and the folder is fsync'ed: a full disk during the write leaves the previous file
intact and the temporary removed. torch reports a failed write as a ``RuntimeError`` (its zip writer
drops the errno); :func:`atomic_save` turns that into a :class:`CheckpointWriteError` naming the disk
problem. A run that is killed mid-write leaves its temporary (``.latest.pt.XXXXXXXX.tmp.pt``) behind;
the next training start removes those with :func:`remove_stale_temporaries`.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
from typing import Any, Dict, Optional

import numpy as np

__all__ = [
    "CheckpointWriteError", "CHECKPOINT_NAMES", "remove_stale_temporaries", "FULL_FORMAT", "PARTIAL_FORMAT", "ENCODER_FORMAT", "atomic_save",
    "file_sha256", "rng_state", "set_rng_state", "save_training_checkpoint", "read_training_checkpoint",
    "merge_checkpoint", "export_image_encoder", "resume_path", "load_for_resume",
]

from ..models.checkpoint_file import (ENCODER_FORMAT, FULL_FORMAT, PARTIAL_FORMAT,  # noqa: E402 (the one definition)
                                      strip_wrapper_prefixes)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at that path is untouched.

    ``errno`` says why (``ENOSPC``: the disk is full); ``str()`` is the message alone, without the
    ``[Errno N]`` prefix, so the CLI prints one readable line."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _serialize(obj: Any, f) -> None:
    """Write ``obj`` into the open binary file ``f`` (a seam for tests that simulate a full disk)."""
    import torch

    torch.save(obj, f)


#: The files a training run writes into its output folder with :func:`atomic_save`.
CHECKPOINT_NAMES = ("latest.pt", "best.pt", "final.pt", "encoder.pt")
#: Their temporaries, as ``atomic.atomic_write`` names them (``tempfile.mkstemp``: 8 random characters).
_STALE_TMP = re.compile(r"^\.(%s)\.[a-z0-9_]{8}\.tmp\.pt$" % "|".join(re.escape(n) for n in CHECKPOINT_NAMES))

#: Below this much free space a failed torch.save is reported as a full disk even without an errno.
_LOW_SPACE_BYTES = 64 << 20


def remove_stale_temporaries(folder: str) -> list:
    """Delete the checkpoint temporaries an interrupted run left in ``folder``; returns their paths.

    Only regular files named like our own temporaries of :data:`CHECKPOINT_NAMES` are touched; anything
    else in the folder (the user's files, other programs' temporaries) stays.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for e in entries:
        if _STALE_TMP.match(e.name) and e.is_file(follow_symlinks=False):
            try:
                os.unlink(e.path)
                removed.append(e.path)
            except FileNotFoundError:
                pass
    return sorted(removed)


def _write_error(err: RuntimeError, folder: str) -> OSError:
    """The OSError behind torch's RuntimeError for a failed write (ENOSPC when the disk is full)."""
    seen = err
    while seen is not None:  # torch chains the Python file's OSError as __context__ when there is one
        if isinstance(seen, OSError) and seen.errno:
            return OSError(seen.errno, os.strerror(seen.errno))
        seen = seen.__cause__ or seen.__context__
    first = (str(err).strip().splitlines() or ["write failed"])[0][:200]
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < _LOW_SPACE_BYTES:
        return OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free; torch: {first})")
    return OSError(errno.EIO, f"torch.save failed: {first}")


def atomic_save(obj: Any, path: str) -> str:
    """Atomically replace ``path`` with ``torch.save(obj)``; raises :class:`CheckpointWriteError`."""
    from ..core.atomic import atomic_write

    path = os.path.abspath(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            try:
                _serialize(obj, f)
            except RuntimeError as err:  # torch's zip writer: a failed write, errno lost
                raise _write_error(err, os.path.dirname(tmp)) from err

    try:
        return atomic_write(path, write, make_dirs=True)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise CheckpointWriteError(
                errno.ENOSPC, f"disk full while writing the checkpoint {path}; the previous file there "
                "(if any) is intact. Free space on that disk (or set output_dir elsewhere) and resume with "
                "--set checkpoint.resume=auto") from err
        raise CheckpointWriteError(err.errno, f"could not write the checkpoint {path}: {err}; the previous "
                                   "file there (if any) is intact") from err


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def resume_path(resume: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint ``checkpoint.resume`` names: ``"auto"`` is ``OUTPUT_DIR/latest.pt`` when it exists (else
    None: a fresh start); any other value must be an existing file."""
    if not resume:
        return None
    path = os.path.join(output_dir, "latest.pt") if resume == "auto" else resume
    if os.path.isfile(path):
        return path
    if resume != "auto":
        raise FileNotFoundError(f"checkpoint.resume: {path} does not exist")
    return None


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) global RNG states, as weights_only-safe values."""
    import torch

    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x):
    if isinstance(x, tuple):
        return [_to_lists(v) for v in x]
    return x


def _to_tuples(x):
    if isinstance(x, list):
        return tuple(_to_tuples(v) for v in x)
    return x


def set_rng_state(state: Dict[str, Any]) -> None:
    import torch

    if not state:
        return
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ training files
def save_training_checkpoint(path: str, model, training: Optional[Dict[str, Any]], partial_base: Optional[Dict] = None,
                             mode: str = "full", extra: Optional[Dict[str, Any]] = None) -> str:
    """Full or partial checkpoint of ``model`` (unwrapped) plus the ``training`` state (None = model only,
    e.g. ``best.pt``/``final.pt``: for partial files just the trained tensors, config and base identity)."""
    cfg = model.config.to_dict()
    if partial_base is not None:
        sd = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        payload = {"format": PARTIAL_FORMAT, "config": cfg, "mode": mode, "base": dict(partial_base),
                   "trainable_state_dict": sd}
    else:
        payload = {"format": FULL_FORMAT, "config": cfg, "mode": mode, "model_state_dict": model.state_dict()}
    if training is not None:
        payload["training"] = training
    payload.update(extra or {})
    return atomic_save(payload, path)


def read_training_checkpoint(path: str) -> Dict[str, Any]:
    import torch

    from ..models.checkpoint import CheckpointError, _sniff
    from pathlib import Path

    _sniff(Path(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unpickling/zip error the same way
        raise CheckpointError(f"checkpoint {path} cannot be read ({str(err).splitlines()[0][:200]}); it is "
                              "truncated or not a training checkpoint") from err


def load_partial_into(model, payload: Dict[str, Any]) -> None:
    """Copy a partial file's trained tensors into ``model`` (which already has the base weights)."""
    import torch

    from ..models.checkpoint import CheckpointError

    sd = strip_wrapper_prefixes(payload["trainable_state_dict"])[0]
    own = dict(model.named_parameters())
    missing = [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or bad:
        raise CheckpointError(f"the partial checkpoint does not fit the model: unknown keys {missing[:5]}, "
                              f"mis-shaped {bad[:5]}; was it trained with another architecture/adapter?")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))


def check_base(base: Dict[str, Any], base_path: str, force: bool = False) -> None:
    from ..models.checkpoint import CheckpointError

    if not os.path.isfile(base_path):
        raise CheckpointError(f"base checkpoint {base_path} not found; pass --base PATH (the file the adapter "
                              f"was trained on, sha256 {base.get('sha256', '?')[:16]}...)")
    sha = file_sha256(base_path)
    if base.get("sha256") and sha != base["sha256"] and not force:
        raise CheckpointError(f"base checkpoint {base_path} (sha256 {sha[:16]}...) is not the file the partial "
                              f"checkpoint was trained on (sha256 {base['sha256'][:16]}...); pass the right "
                              "--base, or --force to merge anyway")


def build_from_partial(payload: Dict[str, Any], base_path: Optional[str] = None, force: bool = False):
    """Base checkpoint + partial file -> the fine-tuned model (adapters included)."""
    from ..models import load_checkpoint
    from ..models.adapters import apply_adapters

    base = payload.get("base", {})
    base_path = base_path or base.get("path")
    check_base(base, base_path, force)
    model = load_checkpoint(base_path, map_location="cpu")
    adapter = payload["config"].get("adapter")
    if adapter:
        adapter = dict(adapter)
        if model.config.adapter:
            raise ValueError("the base checkpoint already has adapters; merge it first")
        model.config.adapter = adapter
        apply_adapters(model, adapter)
    load_partial_into(model, payload)
    return model


def merge_checkpoint(partial_path: str, out_path: str, base_path: Optional[str] = None,
                     force: bool = False) -> str:
    """Write a FULL checkpoint (config with adapters + all weights) from a partial file and its base."""
    from ..models import save_checkpoint

    payload = read_training_checkpoint(partial_path)
    if payload.get("format") == FULL_FORMAT:
        raise ValueError(f"{partial_path} is already a full checkpoint; nothing to merge")
    if payload.get("format") != PARTIAL_FORMAT:
        raise ValueError(f"{partial_path} is not a partial (adapter) checkpoint of ours")
    model = build_from_partial(payload, base_path, force)
    tr = payload.get("training", {})
    try:
        save_checkpoint(model, out_path, extra={"name": os.path.basename(out_path),
                                                "epoch": payload.get("epoch", tr.get("epoch")),
                                                "merged_from": os.path.abspath(partial_path),
                                                "base": payload.get("base")})
    except OSError as err:
        raise CheckpointWriteError(getattr(err, "errno", None) or errno.EIO,
                                   f"could not write {out_path}: {err}") from err
    return out_path


def export_image_encoder(checkpoint_path: str, out_path: str, base_path: Optional[str] = None) -> str:
    """The image encoder alone (e.g. to precompute embeddings elsewhere): config + its state dict."""
    from ..models import load_checkpoint

    payload = None
    try:
        payload = read_training_checkpoint(checkpoint_path)
    except Exception:  # noqa: BLE001 - published files may need the models loader
        payload = None
    if payload is not None and payload.get("format") == PARTIAL_FORMAT:
        model = build_from_partial(payload, base_path)
    else:
        model = load_checkpoint(checkpoint_path, map_location="cpu")
    sd = model.image_encoder.state_dict()
    return atomic_save({"format": ENCODER_FORMAT, "config": model.config.to_dict(),
                        "image_encoder_state_dict": sd}, out_path)


def load_for_resume(path: str, model, base: Optional[Dict[str, Any]], mode: str) -> Dict[str, Any]:
    """Load the model weights of the training checkpoint ``path`` into ``model`` and return its ``training``
    state. ``base``: ``{path, sha256, size}`` of the base checkpoint when this run writes partial files."""
    payload = read_training_checkpoint(path)
    fmt = payload.get("format")
    if "training" not in payload:
        raise ValueError(f"{path} holds no training state (a plain model file?); start a new run from it "
                         "with model.checkpoint instead of checkpoint.resume")
    if fmt == PARTIAL_FORMAT:
        if base is None:
            raise ValueError(f"{path} is a partial checkpoint but this run trains mode {mode} without a base "
                             "checkpoint")
        if payload["base"].get("sha256") != base["sha256"]:
            raise ValueError(f"{path} was trained on another base checkpoint than model.checkpoint")
        load_partial_into(model, payload)
    elif fmt == FULL_FORMAT:
        model.load_state_dict(strip_wrapper_prefixes(payload["model_state_dict"])[0], strict=True)
    else:
        raise ValueError(f"{path}: unknown checkpoint format {fmt!r}")
    return payload["training"]
