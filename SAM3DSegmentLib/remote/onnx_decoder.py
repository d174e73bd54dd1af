"""Decode clicks with the ONNX export of the prompt encoder + mask decoder (onnxruntime + numpy; no torch).

The graph comes from ``models/onnx_export.py`` (the server exports it and serves it at
``GET /v1/models/{name}/decoder.onnx``). :class:`OnnxDecoder` has the ``decode`` half of the backend
interface (``backends.Backend``), taking the embedding as a numpy array.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np


class OnnxDecoderError(RuntimeError):
    """onnxruntime is missing or the decoder file is unusable (the message names the fix)."""


class OnnxDecoder:
    """``decode(embedding, points, labels, mask_logits) -> (s, s, s) float32 logits`` with onnxruntime."""

    def __init__(self, model: bytes, threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise OnnxDecoderError("onnxruntime is not installed: pip install onnxruntime (in 3D Slicer: "
                                   "slicer.util.pip_install('onnxruntime')), or use the full remote mode "
                                   "where the server decodes") from err
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        # Idle worker threads sleep instead of spinning: the decoder shares the workstation with the viewer.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(bytes(model), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise OnnxDecoderError(f"the ONNX decoder could not be loaded ({type(err).__name__}: {err}); "
                                   "ask the server for it again or use the full remote mode") from err
        self.sha256 = hashlib.sha256(model).hexdigest()
        shapes = {i.name: i.shape for i in self._session.get_inputs()}
        try:
            self.embedding_shape = tuple(int(n) for n in shapes["embedding"])
            self.low_res_size = int(shapes["mask_logits"][-1])
        except (KeyError, TypeError, ValueError) as err:
            raise OnnxDecoderError(f"the ONNX file is not a SAM3DSegment decoder (inputs {sorted(shapes)})") from err

    def decode(self, embedding, points, labels, mask_logits) -> np.ndarray:
        s = self.low_res_size
        emb = np.ascontiguousarray(embedding, dtype=np.float32).reshape(self.embedding_shape)
        pts = np.ascontiguousarray(points, dtype=np.float32).reshape(1, -1, 3)
        lab = np.ascontiguousarray(labels, dtype=np.int64).reshape(1, -1)
        if mask_logits is None:
            mask = np.zeros((1, 1, s, s, s), dtype=np.float32)
        else:
            mask = np.ascontiguousarray(mask_logits, dtype=np.float32).reshape(1, 1, s, s, s)
        out = self._session.run(None, {"embedding": emb, "points": pts, "labels": lab, "mask_logits": mask})[0]
        return np.asarray(out, dtype=np.float32).reshape(s, s, s)
