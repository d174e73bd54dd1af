"""Build small ``torch.save``-format files without torch, for the weights/download tests.

The layout is the one ``torch.save`` writes (a zip with ``<name>/data.pkl``, ``<name>/data/<key>`` and
``<name>/version``; the pickle names ``torch._utils._rebuild_tensor_v2`` and ``torch.FloatStorage`` and
refers to storages by persistent id). Names below live in a stand-in module so no torch is imported.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
import types
import zipfile
from typing import Dict, Optional, Sequence, Tuple

_FAKE = types.ModuleType("torch_stand_in_for_tests")


class FloatStorage:  # pickled by name only
    pass


def _rebuild_tensor_v2(*args):  # pragma: no cover - never called
    raise AssertionError("stand-in")


for _obj in (FloatStorage, _rebuild_tensor_v2):
    _obj.__module__ = _FAKE.__name__
    setattr(_FAKE, _obj.__name__, _obj)
sys.modules[_FAKE.__name__] = _FAKE


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: Tuple[int, ...], stride: Optional[Tuple[int, ...]] = None):
        self.storage, self.shape = storage, tuple(shape)
        if stride is None:
            stride, acc = [], 1
            for s in reversed(self.shape):
                stride.insert(0, acc)
                acc *= s
        self.stride = tuple(stride)

    def __reduce__(self):
        return (_rebuild_tensor_v2, (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


SAM_KEYS = ("image_encoder.patch_embed.proj.weight", "prompt_encoder.point_embeddings.0.weight",
            "mask_decoder.iou_token.weight")


def checkpoint_bytes(keys: Sequence[str] = SAM_KEYS, numel: int = 4, *, declared_numel: Optional[int] = None,
                     shape: Optional[Tuple[int, ...]] = None, stride: Optional[Tuple[int, ...]] = None,
                     extra: Optional[Dict] = None, wrap: str = "model_state_dict", seed: int = 0) -> bytes:
    """A float32 ``torch.save`` zip holding ``{wrap: {key: tensor}}`` (plus ``extra``).

    ``declared_numel``: what the pickle claims each storage holds (default: the ``numel`` stored);
    ``shape``/``stride``: override each tensor's view (default ``(numel,)`` contiguous).
    """
    tensors = {}
    blobs = {}
    for i, key in enumerate(keys):
        st = _Storage(str(i), numel if declared_numel is None else declared_numel)
        tensors[key] = _Tensor(st, shape or (numel,), stride)
        blobs[str(i)] = bytes((seed + i + j) % 251 for j in range(4 * numel))
    root = dict(extra or {})
    root[wrap] = tensors
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(root)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        for key, blob in blobs.items():
            zf.writestr(f"archive/data/{key}", blob)
        zf.writestr("archive/version", "3\n")
    return out.getvalue()
