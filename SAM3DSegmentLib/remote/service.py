"""What a server holds and does, independent of HTTP: its models, the embedding cache, the limits, the
request checks and the model work (``remote/server.py`` puts it behind FastAPI).

Stateless by design: the only state that affects answers is a byte-bounded LRU of embeddings keyed by
(model, content hash of the input), and every request carries what it needs — so any server can answer any
request and a restart loses nothing a client cannot resend. Counters and rate-limit buckets are
bookkeeping only.
"""
from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .. import __version__
from .limits import Busy, ByteLRU, EncodeGate, RateLimiter
from .protocol import (
    E_AUTH, E_MODEL_MISMATCH, E_NOT_AVAILABLE, E_PROTOCOL, E_RATE, E_UNKNOWN_MODEL, PROTOCOL_HEADER, PROTOCOL_VERSION,
    ProtocolError, available_codecs, is_loopback_host)


@dataclass
class ServedModel:
    """One model a server offers. ``backend`` is a :class:`~SAM3DSegmentLib.backends.LocalBackend` (or any
    object with ``image_size``, ``low_res_size``, ``encode`` and ``decode`` on numpy arrays); ``module`` the
    torch model, needed only for the ONNX decoder export."""

    name: str
    backend: Any
    sha256: Optional[str] = None
    architecture: Optional[str] = None
    embedding_shape: Optional[Tuple[int, ...]] = None
    module: Any = None
    _onnx: Optional[bytes] = field(default=None, repr=False)
    _onnx_error: Optional[str] = field(default=None, repr=False)
    _onnx_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "architecture": self.architecture,
                "image_size": int(self.backend.image_size), "low_res_size": int(self.backend.low_res_size),
                "embedding_shape": list(self.embedding_shape) if self.embedding_shape else None,
                "decoder_onnx": self.module is not None}


@dataclass
class ServerConfig:
    """Limits and security settings (``sam3d serve --help`` lists the command-line names)."""

    keys: Sequence[str] = ()
    host: str = "127.0.0.1"
    device: str = "cpu"
    cache_bytes: int = 1 << 30
    max_request_bytes: int = 32 << 20
    max_points: int = 256
    rate_per_s: float = 50.0
    burst: int = 100
    max_concurrent_encodes: int = 1
    max_queue: int = 16
    queue_wait_s: float = 30.0
    body_timeout_s: float = 30.0
    #: request bodies being received or processed at once, in bytes (None: one per encode slot and queue place)
    max_inflight_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_inflight_bytes is None:
            self.max_inflight_bytes = (self.max_concurrent_encodes + self.max_queue) * self.max_request_bytes

    def limits(self) -> Dict[str, Any]:
        return {"max_request_bytes": self.max_request_bytes, "max_inflight_bytes": self.max_inflight_bytes,
                "max_points": self.max_points,
                "cache_bytes": self.cache_bytes, "rate_per_s": self.rate_per_s, "burst": self.burst,
                "max_concurrent_encodes": self.max_concurrent_encodes, "max_queue": self.max_queue,
                "queue_wait_s": self.queue_wait_s, "body_timeout_s": self.body_timeout_s}


class _Refused(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


class ServerState:
    """Everything one server process holds: models, the embedding cache, the limits and counters."""

    def __init__(self, models: Sequence[ServedModel], config: ServerConfig):
        if not models:
            raise ValueError("a server needs at least one model")
        if not config.keys and not is_loopback_host(config.host):
            raise ValueError(f"refusing to serve on {config.host} without a key: anyone on the network could use "
                             "it. Give keys (--keys-file) or bind to 127.0.0.1")
        self.models = {m.name: m for m in models}
        self.config = config
        self._keys = [k.encode("utf-8") for k in config.keys]
        self.cache = ByteLRU(config.cache_bytes)
        self.gate = EncodeGate(config.max_concurrent_encodes, config.max_queue, config.queue_wait_s)
        self.rate = RateLimiter(config.rate_per_s, config.burst)
        self.counters = {"requests": 0, "refused_auth": 0, "encodes": 0, "decodes": 0, "bad_requests": 0,
                         "refused_busy": 0}
        self.inflight_bytes = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` of request body against ``max_inflight_bytes``; :class:`Busy` (503) when over."""
        with self._lock:
            if self.inflight_bytes and self.inflight_bytes + nbytes > self.config.max_inflight_bytes:
                self.counters["refused_busy"] += 1
                raise Busy(f"server full: {self.inflight_bytes} bytes of requests in progress; retry shortly or "
                           "add a server", retry_after_s=1.0)
            self.inflight_bytes += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.inflight_bytes -= nbytes

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    # ------------------------------------------------------------------ request checks
    def authorize(self, headers) -> str:
        """The caller's identity for rate limiting; raises :class:`_Refused` (401/400/429)."""
        self.count("requests")
        version = headers.get(PROTOCOL_HEADER)
        if version is not None and version.strip() != str(PROTOCOL_VERSION):
            raise _Refused(400, E_PROTOCOL, f"client speaks protocol {version.strip()}, this server "
                           f"{PROTOCOL_VERSION} (sam3dsegment {__version__}); install matching versions")
        identity = "anonymous"
        if self._keys:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            given = token.strip().encode("utf-8") if scheme.lower() == "bearer" else b""
            match = -1
            for i, key in enumerate(self._keys):  # every key compared, each in constant time
                if hmac.compare_digest(given, key):
                    match = i
            if match < 0:
                self.count("refused_auth")
                raise _Refused(401, E_AUTH, "missing or wrong key: send 'Authorization: Bearer KEY' with a key "
                               "this server accepts", {"WWW-Authenticate": "Bearer"})
            identity = f"key{match}"
        wait = self.rate.check(identity)
        if wait > 0:
            raise _Refused(429, E_RATE, f"rate limit of {self.config.rate_per_s:g} requests/s exceeded; retry "
                           f"in {wait:.2f} s", {"Retry-After": str(max(1, int(np.ceil(wait))))})
        return identity

    def model(self, name: Any, sha256: Any = None) -> ServedModel:
        """The model called ``name``; with ``sha256`` (what the client expects) it must be that checkpoint."""
        if name is None and len(self.models) == 1:
            name = next(iter(self.models))
        if not isinstance(name, str) or name not in self.models:
            raise ProtocolError(f"unknown model {name!r}; this server offers {sorted(self.models)}",
                                E_UNKNOWN_MODEL, 404)
        model = self.models[name]
        if sha256 is not None and model.sha256 is not None and sha256 != model.sha256:
            raise ProtocolError(f"model {name} here is checkpoint sha256 {model.sha256[:12]}..., the client expects "
                                f"{str(sha256)[:12]}...; serve the same checkpoint on every server",
                                E_MODEL_MISMATCH, 409)
        return model

    def check_image(self, image: Optional[np.ndarray], model: ServedModel) -> np.ndarray:
        size = int(model.backend.image_size)
        if image is None:
            raise ProtocolError("array 'image' is missing")
        if image.shape != (size,) * 3 or image.dtype.name not in ("float16", "float32"):
            raise ProtocolError(f"'image' must be float16/float32 of shape {[size] * 3} for model {model.name}, "
                                f"got {image.dtype.name} {list(image.shape)}")
        if not np.isfinite(image).all():
            raise ProtocolError("'image' holds NaN or infinite values")
        return image

    def check_prompt(self, arrays: Dict[str, np.ndarray], model: ServedModel):
        points, labels, mask = arrays.get("points"), arrays.get("labels"), arrays.get("mask_logits")
        s = int(model.backend.low_res_size)
        if points is None or labels is None:
            raise ProtocolError("arrays 'points' and 'labels' are required")
        n = points.shape[0] if points.ndim == 2 else -1
        if points.ndim != 2 or points.shape[1] != 3 or not 1 <= n <= self.config.max_points:
            raise ProtocolError(f"'points' must have shape (N, 3) with 1 <= N <= {self.config.max_points}, "
                                f"got {list(points.shape)}")
        if points.dtype.name not in ("float32", "float16") or not np.isfinite(points).all():
            raise ProtocolError("'points' must be finite float32 voxel coordinates")
        if labels.shape != (n,) or labels.dtype.name not in ("int32", "int64", "uint8") \
                or not np.isin(labels, (0, 1)).all():
            raise ProtocolError(f"'labels' must be {n} integers, each 0 (exclude) or 1 (include)")
        if mask is not None:
            if mask.shape != (s, s, s) or mask.dtype.name != "float32" or not np.isfinite(mask).all():
                raise ProtocolError(f"'mask_logits' must be finite float32 of shape {[s] * 3}")
        return points.astype(np.float32), labels.astype(np.int64), mask

    # ------------------------------------------------------------------ model work (worker threads)
    def embedding(self, model: ServedModel, key: str, image: np.ndarray) -> Tuple[np.ndarray, bool, float]:
        """(embedding, was cached, encode seconds) for ``image`` whose content key is ``key``."""
        emb = self.cache.get((model.name, key))
        if emb is not None:
            return emb, True, 0.0
        with self.gate:
            emb = self.cache.get((model.name, key))  # another request may have encoded it while we queued
            if emb is not None:
                return emb, True, 0.0
            t = time.perf_counter()
            image32 = np.ascontiguousarray(image, dtype=np.float32)
            encode_numpy = getattr(model.backend, "encode_numpy", None)
            emb = encode_numpy(image32) if encode_numpy else np.asarray(model.backend.encode(image32))
            emb = np.ascontiguousarray(emb, dtype=np.float32)
            seconds = time.perf_counter() - t
        self.count("encodes")
        self.cache.put((model.name, key), emb)
        return emb, False, seconds

    def decode(self, model: ServedModel, emb, points, labels, mask) -> Tuple[np.ndarray, float]:
        t = time.perf_counter()
        logits = model.backend.decode(emb, points, labels, mask)
        self.count("decodes")
        s = int(model.backend.low_res_size)
        return np.ascontiguousarray(logits, dtype=np.float32).reshape(s, s, s), time.perf_counter() - t

    def onnx_decoder(self, model: ServedModel) -> bytes:
        if model.module is None:
            raise ProtocolError(f"this server offers no ONNX decoder for model {model.name}; use the full mode "
                                "(the server decodes) or a local torch decoder", E_NOT_AVAILABLE, 404)
        with model._onnx_lock:   # exported once, on first use (or by ``sam3d serve``'s warm-up)
            if model._onnx is None and model._onnx_error is None:
                try:
                    from ..models.onnx_export import export_decoder_onnx

                    model._onnx = export_decoder_onnx(model.module)
                except Exception as err:  # noqa: BLE001 - reported to clients, who fall back
                    model._onnx_error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            if model._onnx is None:
                raise ProtocolError(f"the ONNX export of model {model.name} failed on this server "
                                    f"({model._onnx_error}); use the full mode or a local torch decoder",
                                    E_NOT_AVAILABLE, 404)
            return model._onnx

    def capabilities(self) -> Dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "device": self.config.device,
                "models": [m.describe() for m in self.models.values()], "limits": self.config.limits(),
                "codecs": available_codecs(), "auth": bool(self._keys)}

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            counters = dict(self.counters)
        return {"counters": counters, "inflight_bytes": self.inflight_bytes, "cache": self.cache.stats(),
                "encode_gate": self.gate.stats(),
                "rate_limit": self.rate.stats()}
