"""The one interface between the interactive engine and whatever runs the network.

The engine speaks numpy only: a backend turns a normalised 128^3 region into an opaque embedding once,
and each click (points + previous low-res logits) into new low-res logits. ``LocalBackend`` runs our
torch model on CPU/CUDA/MPS; tests use stubs; ``remote.client.RemoteBackend`` implements the same two calls
over HTTP. :func:`make_backend` picks the backend of a loaded model's family (the 3DSAM-adapter's is
:class:`~SAM3DSegmentLib.inference.backends_sam3d_adapter.Sam3DAdapterBackend`); :func:`load_backend` resolves,
loads and wraps a checkpoint of either family.

Optional attributes a backend may declare (the session reads them; absent means SAM-Med3D's behaviour):
``spacing_mm`` (region voxel size, default 1.5), ``intensity`` (a
:class:`~SAM3DSegmentLib.core.intensity.WindowZNorm`: the model's own HU window and statistics),
``supports_exclude`` / ``supports_mask_prompt`` (default True), ``family`` and ``limits_notice`` (one line
for the user about what the model cannot do).

Axis convention for every array crossing this interface: the region's own (a, b, c) axes, i.e. the
RAS-canonical (i, j, k) order the reference pipeline feeds the network; points are continuous voxel
indices in that order (voxel centres are integers).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    #: Short human-readable description, e.g. "SAM-Med3D turbo on cpu (float32)".
    name: str
    #: Side of the cubic model input (128 for SAM-Med3D).
    image_size: int
    #: Side of the low-res logits (32 for SAM-Med3D).
    low_res_size: int

    def encode(self, image: np.ndarray) -> Any:
        """``image``: float32 (S, S, S), already normalised. Returns an opaque embedding handle."""

    def decode(self, embedding: Any, points: np.ndarray, labels: np.ndarray,
               mask_logits: Optional[np.ndarray]) -> np.ndarray:
        """``points`` (N, 3) float, ``labels`` (N,) in {0, 1}; ``mask_logits`` (s, s, s) or None (zeros).

        Returns float32 low-res logits (s, s, s).
        """


#: Optional batched decode (many prompts on one embedding per call), used by the automatic mask generator
#: through :func:`decode_batch`: ``backend.decode_batch(embedding, points (B, N, 3), labels (B, N),
#: mask_logits (B, s, s, s) or None) -> (logits (B, s, s, s) float32, predicted IoU (B,) float32 or None)``.
#: Backends without it (remote, stubs) keep working: :func:`decode_batch` then calls ``decode`` per prompt.


def decode_batch(backend, embedding: Any, points: np.ndarray, labels: np.ndarray,
                 mask_logits: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Decode ``B`` prompts on one embedding: ``(logits (B, s, s, s) float32, predicted IoU (B,) or None)``.

    ``points`` (B, N, 3), ``labels`` (B, N), ``mask_logits`` (B, s, s, s) or None (zeros: a first step).
    Uses ``backend.decode_batch`` when the backend has one, else one ``backend.decode`` per prompt (then
    there is no predicted IoU: None)."""
    pts = np.asarray(points, dtype=np.float32)
    lab = np.asarray(labels, dtype=np.int64)
    if pts.ndim != 3 or pts.shape[-1] != 3 or lab.shape != pts.shape[:2]:
        raise ValueError(f"decode_batch takes points (B, N, 3) and labels (B, N); got {pts.shape} and {lab.shape}")
    fn = getattr(backend, "decode_batch", None)
    if fn is not None:
        logits, iou = fn(embedding, pts, lab, mask_logits)
        return (np.asarray(logits, dtype=np.float32),
                None if iou is None else np.asarray(iou, dtype=np.float32).reshape(-1))
    s = int(backend.low_res_size)
    out = np.empty((pts.shape[0], s, s, s), dtype=np.float32)
    zeros = np.zeros((s, s, s), dtype=np.float32)
    for b in range(pts.shape[0]):
        m = zeros if mask_logits is None else np.asarray(mask_logits[b], dtype=np.float32)
        out[b] = np.asarray(backend.decode(embedding, pts[b], lab[b], m), dtype=np.float32).reshape(s, s, s)
    return out, None


def require_torch() -> None:
    """Raise a RuntimeError saying how to install torch when it cannot be imported."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("torch is not installed: in 3D Slicer press 'Install dependencies' (it installs the "
                           "PyTorch extension's torch); elsewhere pip install torch") from exc


class LocalBackend:
    """Runs a :class:`~SAM3DSegmentLib.models.sam_med3d.model.SamMed3D` in this process (CPU, CUDA or MPS)."""

    def __init__(self, model, device: str = "cpu", dtype: str = "float32", name: Optional[str] = None):
        import torch

        from ..models.device import resolve_dtype, tune_cpu_allocator

        self.model = model.eval().to(device)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            tune_cpu_allocator()  # ~10 % faster CPU encodes; SAM3D_NO_MALLOC_TUNING=1 opts out
        self.dtype = resolve_dtype(dtype, self.device)
        self.image_size = int(model.config.image_size)
        self.low_res_size = int(model.config.image_size // 4)
        label = name or getattr(model, "description", "SAM-Med3D-family model")
        self.name = f"{label} on {self.device.type} ({str(self.dtype).replace('torch.', '')})"

    def _autocast(self):
        from ..models.device import autocast_for

        return autocast_for(self.device, self.dtype)

    def encode(self, image: np.ndarray):
        import torch

        x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=self.device)
        with torch.inference_mode(), self._autocast():
            emb = self.model.image_encoder(x[None, None])
        return emb.float()

    def encode_numpy(self, image: np.ndarray) -> np.ndarray:
        """:meth:`encode` as a float32 numpy array (1, C, g, g, g) — what the remote server sends."""
        return self.encode(image).cpu().numpy()

    def decode(self, embedding, points, labels, mask_logits):
        import torch

        if isinstance(embedding, np.ndarray):  # an embedding received from a remote server
            embedding = torch.tensor(embedding, dtype=torch.float32, device=self.device)  # a copy: may be read-only
        s = self.low_res_size
        pts = torch.as_tensor(np.asarray(points, dtype=np.float32).reshape(1, -1, 3), device=self.device)
        lab = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(1, -1), device=self.device)
        if mask_logits is None:
            m = torch.zeros((1, 1, s, s, s), device=self.device)
        else:
            m = torch.as_tensor(np.asarray(mask_logits, dtype=np.float32).reshape(1, 1, s, s, s),
                                device=self.device)
        with torch.inference_mode(), self._autocast():
            logits = self.model.predict_low_res(embedding, pts, lab, m)
        return logits[0, 0].float().cpu().numpy()

    def decode_batch(self, embedding, points, labels, mask_logits=None):
        """``B`` prompts on one embedding in one decoder call: ``(logits (B, s, s, s), predicted IoU (B,))``
        (see :func:`decode_batch`); each row equals :meth:`decode` of that prompt up to float rounding."""
        import torch

        s = self.low_res_size
        pts = torch.as_tensor(np.asarray(points, dtype=np.float32), device=self.device)
        lab = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=self.device)
        b = pts.shape[0]
        if mask_logits is None:
            m = torch.zeros((b, 1, s, s, s), device=self.device)
        else:
            m = torch.as_tensor(np.asarray(mask_logits, dtype=np.float32).reshape(b, 1, s, s, s), device=self.device)
        with torch.inference_mode(), self._autocast():
            logits, iou = self.model.predict_low_res_with_iou(embedding, pts, lab, m)
        return logits[:, 0].float().cpu().numpy(), iou[:, 0].float().cpu().numpy()


# ------------------------------------------------------------------------------------------ loading
class BackendError(RuntimeError):
    """The model could not be found, loaded or placed on the device; the message names the problem and the
    fix. ``details``: optional short lines to show under it (the ways to get a model when none is found)."""

    def __init__(self, message: str, details=()):
        super().__init__(message)
        self.details = list(details)


def load_backend(model: Optional[str] = None, checkpoint: Optional[str] = None, device: str = "auto",
                 threads: Optional[int] = None, dtype: str = "float32", remote=None):
    """Resolve the checkpoint, load it (either family) and wrap it (:func:`make_backend`); ``(backend, info)``.

    ``model``: a registered name (downloaded into the cache on first use); ``checkpoint``: a file path
    (always a path, never a name); neither: the default model. ``threads``: torch CPU threads (None: torch's
    choice). ``info``: model label, checkpoint path, backend name, device, architecture, family, image size
    (and a 3DSAM-adapter's ``intensity`` settings).

    ``remote`` (a :class:`~SAM3DSegmentLib.remote.options.RemoteOptions`, from ``--server``): the model runs on
    those servers instead, behind a :class:`~SAM3DSegmentLib.remote.client.RemoteBackend`; ``model`` then names
    a model they offer, and ``checkpoint`` (split mode) is the same file loaded here to decode clicks with torch.
    ``info`` then also holds the served file's sha256, the servers and the mode.
    Raises :class:`BackendError`.
    """
    if remote is not None:
        from ..remote.errors import RemoteError
        from ..remote.options import load_remote_backend

        try:
            return load_remote_backend(remote, model, checkpoint,
                                       lambda: load_backend(None, checkpoint, device, threads, dtype)[0])
        except BackendError:
            raise
        except (RemoteError, ValueError) as err:  # refused key, unreachable server, bad URL: one line, the fix
            raise BackendError(f"--server: {err}") from err
    import os
    from pathlib import Path

    from ..weights import DEFAULT_MODEL, get_weights, resolve_checkpoint

    name = checkpoint or model or DEFAULT_MODEL
    try:  # --checkpoint is always a path (a Path never means a model name); --model only a registered name
        path = resolve_checkpoint(Path(checkpoint) if checkpoint else get_weights(name).name)
    except Exception as err:  # WeightsError and friends carry the fix in their message
        if checkpoint or name.lower() == "demo":
            raise BackendError(f"cannot find the model: {err}") from err
        raise _model_missing_error(model, name, err) from err
    try:
        import torch  # noqa: F401 - only to say clearly that it is missing
    except ImportError as err:
        raise BackendError("torch is not installed: install it (pip install torch; in 3D Slicer: the PyTorch "
                           "extension) to run the model") from err
    from ..models.device import resolve_device, set_threads
    from ..models.families import load_model

    set_threads(threads)
    try:
        dev = resolve_device(device)
    except Exception as err:
        raise BackendError(f"--device {device}: {err}") from err
    try:
        net = load_model(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any loader failure is reported with the path
        hint = "" if "Pass " in str(err) or "Load " in str(err) else (
            " Pass a SAM-Med3D (.pth) checkpoint, a 3DSAM-adapter file or one saved by sam3d train with "
            "--checkpoint, or a model name with --model")
        raise BackendError(f"could not load checkpoint {path}: {err}{hint}") from err
    label = model or (os.path.basename(str(path)) if checkpoint else name)
    entry = None if checkpoint else get_weights(name)
    try:
        backend = make_backend(net, device=str(dev), dtype=dtype, name=f"{label} [{getattr(net, 'description', '')}]",
                               intensity=getattr(entry, "intensity", None))
    except ValueError as err:  # e.g. float16 on the CPU
        raise BackendError(f"--dtype {dtype}: {err}") from err
    info = {"model": label, "checkpoint": str(path), "backend": backend.name, "device": str(dev),
            "architecture": getattr(getattr(net, "config", None), "name", None),
            "family": getattr(backend, "family", "sam_med3d"), "image_size": int(backend.image_size)}
    if getattr(backend, "intensity", None) is not None:
        info["intensity"] = backend.intensity.to_dict()
    return backend, info


def make_backend(net, device: str = "cpu", dtype: str = "float32", name: Optional[str] = None, intensity=None):
    """The backend for a loaded model of either family (``net.family``, set by
    :func:`SAM3DSegmentLib.models.families.load_model`): :class:`LocalBackend` for SAM-Med3D, a
    :class:`~.backends_sam3d_adapter.Sam3DAdapterBackend` for the 3DSAM-adapter, normalised with (in this
    order) the file's own intensity settings, ``intensity`` (a registry entry's, as a mapping or a
    :class:`~SAM3DSegmentLib.core.intensity.WindowZNorm`), else the family's default
    (:data:`~SAM3DSegmentLib.core.intensity.DEFAULT_WINDOW_HU`, each crop's own statistics)."""
    if getattr(net, "family", "sam_med3d") != "3dsam_adapter":
        return LocalBackend(net, device=device, dtype=dtype, name=name)
    from ..core.intensity import WindowZNorm
    from .backends_sam3d_adapter import Sam3DAdapterBackend

    chosen = getattr(net, "intensity", None) or intensity
    if chosen is not None and not isinstance(chosen, WindowZNorm):
        chosen = WindowZNorm.from_dict(chosen)
    return Sam3DAdapterBackend(net, device=device, dtype=dtype, name=name, intensity=chosen)


def _model_missing_error(model: Optional[str], name: str, err: BaseException) -> BackendError:
    """A registered model that is neither cached nor downloadable: the reason, then the choices, one a line."""
    reason = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    head = (f"no model given, and the default model {name} is not available: {reason}" if model is None
            else f"cannot find the model {name}: {reason}")
    details = ["choose one:",
               "--model demo        the small model bundled with sam3dsegment (works offline; rough masks, "
               "for trying things out)",
               "--checkpoint PATH   a SAM-Med3D .pth checkpoint file you already have"]
    try:
        from ..weights import checkpoint_dir, get_weights

        entry = get_weights(name)
        url = entry.download_url()
        where = f" (from {url})" if url else ""
        details.append(f"or copy {entry.filename}{where} into {checkpoint_dir()}")
    except Exception:  # noqa: BLE001 - the list above is still complete without the cache hint
        pass
    return BackendError(head, details)
