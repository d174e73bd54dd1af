"""The remote inference server: a FastAPI app that encodes model-input regions (and decodes clicks for
clients that cannot), run by uvicorn (``sam3d serve``, see ``remote/serve.py`` and docs/remote.md).

Endpoints (``{"error": CODE, "detail": ...}`` JSON on failure; arrays travel as ``remote/protocol.py``
messages):

* ``GET  /v1/health`` — liveness for load balancers; no key needed, no model work.
* ``GET  /v1/capabilities`` — protocol and project versions, models (name, sha256, shapes), device, limits.
* ``GET  /v1/stats`` — cache, queue, rate-limit and request counters.
* ``POST /v1/encode`` — ``image`` (S, S, S) float16/float32 -> ``key`` (+ ``embedding`` when asked).
* ``POST /v1/decode`` — ``key`` or ``image``, ``points`` (N, 3), ``labels`` (N,), optional ``mask_logits``
  (s, s, s) -> ``logits`` (s, s, s) float32.
* ``GET  /v1/models/{name}/decoder.onnx`` — the prompt encoder + mask decoder as ONNX (split clients).

Stateless: the only state is a byte-bounded LRU of embeddings keyed by (model, content hash of the input);
every request carries what it needs, so any server behind a plain round-robin balancer can answer it and a
restart loses nothing a client cannot resend. Models are chosen at start-up by the operator; a client picks
one by NAME only and can never make the server load a file.

Security: a bearer key is required on everything but ``/v1/health`` unless the server is bound to loopback
only; keys are compared in constant time (``hmac.compare_digest``) against every configured key and never
logged. The key and rate checks run before the request body is read, so a refused request does no work.
"""
# No "from __future__ import annotations": FastAPI reads the endpoints' annotations (Request) at runtime.
import asyncio
import hmac
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import __version__
from .limits import Busy, ByteLRU, EncodeGate, RateLimiter
from .protocol import (
    E_AUTH, E_BUSY, E_INTERNAL, E_MODEL_MISMATCH, E_NOT_AVAILABLE, E_PROTOCOL, E_RATE, E_TIMEOUT, E_TOO_LARGE,
    E_UNKNOWN_EMBEDDING, E_UNKNOWN_MODEL, E_UNSUPPORTED_MEDIA, MEDIA_TYPE, PROTOCOL_HEADER, PROTOCOL_VERSION,
    ProtocolError, available_codecs, choose_codec, content_key, error_body, is_loopback_host, pack, unpack)

log = logging.getLogger("sam3d.serve")

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


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

    def limits(self) -> Dict[str, Any]:
        return {"max_request_bytes": self.max_request_bytes, "max_points": self.max_points,
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
        self.counters = {"requests": 0, "refused_auth": 0, "encodes": 0, "decodes": 0, "bad_requests": 0}
        self._lock = threading.Lock()

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
                                f"{str(sha256)[:12]}...; serve the same checkpoint on every server", E_MODEL_MISMATCH, 409)
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
        with model._onnx_lock:
            if model._onnx is None:
                from ..models.onnx_export import export_decoder_onnx

                model._onnx = export_decoder_onnx(model.module)
            return model._onnx

    def capabilities(self) -> Dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "device": self.config.device,
                "models": [m.describe() for m in self.models.values()], "limits": self.config.limits(),
                "codecs": available_codecs(), "auth": bool(self._keys)}

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            counters = dict(self.counters)
        return {"counters": counters, "cache": self.cache.stats(), "encode_gate": self.gate.stats(),
                "rate_limit": self.rate.stats()}


async def _read_body(request, limit: int, timeout_s: float) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != MEDIA_TYPE:
        raise ProtocolError(f"send the body as {MEDIA_TYPE} (got {ctype or 'no content type'})",
                            E_UNSUPPORTED_MEDIA, 415)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ProtocolError("invalid Content-Length")
        if int(declared) > limit:
            raise ProtocolError(f"request of {int(declared)} bytes exceeds this server's limit of {limit} bytes",
                                E_TOO_LARGE, 413)

    async def read() -> bytes:
        chunks: List[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ProtocolError(f"request exceeds this server's limit of {limit} bytes", E_TOO_LARGE, 413)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ProtocolError(f"request body not received within {timeout_s:g} s", E_TIMEOUT, 408) from None


def create_app(models: Sequence[ServedModel], config: Optional[ServerConfig] = None):
    """The FastAPI application serving ``models`` under ``config`` (see the module docstring)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    state = ServerState(models, config or ServerConfig())
    app = FastAPI(title="SAM3DSegment remote inference", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.sam3d = state

    def binary(meta: Dict[str, Any], arrays: Dict[str, np.ndarray], accepted) -> Response:
        return Response(pack(meta, arrays, choose_codec(accepted)), media_type=MEDIA_TYPE)

    async def guarded(request: Request, handler):
        try:
            state.authorize(request.headers)
            return await handler()
        except _Refused as err:
            return JSONResponse(error_body(err.code, err.detail), err.status, headers=err.headers)
        except ProtocolError as err:
            state.count("bad_requests")
            return JSONResponse(error_body(err.code, err.detail), err.status)
        except Busy as err:
            return JSONResponse(error_body(E_BUSY, str(err)), 503,
                                headers={"Retry-After": str(max(1, int(np.ceil(err.retry_after_s))))})
        except Exception:  # noqa: BLE001 - never crash the server; the traceback goes to its log
            log.exception("request %s %s failed", request.method, request.url.path)
            return JSONResponse(error_body(E_INTERNAL, "internal server error; see the server log"), 500)

    async def message(request: Request):
        body = await _read_body(request, state.config.max_request_bytes, state.config.body_timeout_s)
        return await run_in_threadpool(unpack, body, state.config.max_request_bytes)

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "protocol": PROTOCOL_VERSION}

    @app.get("/v1/capabilities")
    async def capabilities(request: Request):
        async def run():
            return JSONResponse(state.capabilities())
        return await guarded(request, run)

    @app.get("/v1/stats")
    async def stats(request: Request):
        async def run():
            return JSONResponse(state.stats())
        return await guarded(request, run)

    @app.post("/v1/encode")
    async def encode(request: Request):
        async def run():
            meta, arrays = await message(request)
            model = state.model(meta.get("model"), meta.get("model_sha256"))
            image = state.check_image(arrays.get("image"), model)
            key = content_key(image)
            emb, cached, seconds = await run_in_threadpool(state.embedding, model, key, image)
            out: Dict[str, np.ndarray] = {}
            if meta.get("return_embedding"):
                dtype = meta.get("embedding_dtype", "float32")
                if dtype not in ("float16", "float32"):
                    raise ProtocolError("embedding_dtype must be float16 or float32")
                out["embedding"] = emb.astype(dtype)
            resp = {"key": key, "model": model.name, "cached": cached, "encode_s": seconds}
            return await run_in_threadpool(binary, resp, out, meta.get("accept_codecs"))
        return await guarded(request, run)

    @app.post("/v1/decode")
    async def decode(request: Request):
        async def run():
            meta, arrays = await message(request)
            model = state.model(meta.get("model"), meta.get("model_sha256"))
            points, labels, mask = state.check_prompt(arrays, model)
            key, cached, enc_s = meta.get("key"), True, 0.0
            if key is not None and (not isinstance(key, str) or not _KEY_RE.match(key)):
                raise ProtocolError("'key' must be the 64-character hex content key an encode returned")
            if "image" in arrays:
                image = state.check_image(arrays["image"], model)
                own = content_key(image)
                if key is not None and key != own:
                    raise ProtocolError("'key' does not match the 'image' sent with it")
                key = own
                emb, cached, enc_s = await run_in_threadpool(state.embedding, model, key, image)
            elif key is not None:
                emb = state.cache.get((model.name, key))
                if emb is None:
                    raise ProtocolError(f"embedding {key[:12]}... is not in this server's cache (evicted, "
                                        "restarted or another server); resend the region", E_UNKNOWN_EMBEDDING, 404)
            else:
                raise ProtocolError("send the 'key' of an encoded region or the 'image' itself")
            logits, dec_s = await run_in_threadpool(state.decode, model, emb, points, labels, mask)
            resp = {"key": key, "cached": cached, "encode_s": enc_s, "decode_s": dec_s}
            return await run_in_threadpool(binary, resp, {"logits": logits}, meta.get("accept_codecs"))
        return await guarded(request, run)

    @app.get("/v1/models/{name}/decoder.onnx")
    async def decoder_onnx(name: str, request: Request):
        async def run():
            model = state.model(name)
            data = await run_in_threadpool(state.onnx_decoder, model)
            import hashlib

            return Response(data, media_type="application/octet-stream",
                            headers={"X-SHA256": hashlib.sha256(data).hexdigest()})
        return await guarded(request, run)

    return app


# ------------------------------------------------------------------------------------------ running
class ServerThread:
    """Run an app with uvicorn on ``host`` (port 0 = a free port): in a background thread (:meth:`start`,
    :meth:`stop`; tests and benchmarks) or in the calling thread (:meth:`serve_forever`; ``sam3d serve``).
    The socket is bound and listening from construction on, so ``url`` is usable at once."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, ssl_certfile: Optional[str] = None,
                 ssl_keyfile: Optional[str] = None, log_level: str = "warning"):
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        self.port = self._sock.getsockname()[1]
        scheme = "https" if ssl_certfile else "http"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{self.port}"
        cfg = uvicorn.Config(app, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, log_level=log_level,
                             timeout_keep_alive=30, limit_concurrency=512, lifespan="off")
        self.server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"sam3d-serve-{self.port}", daemon=True)

    def start(self, timeout_s: float = 20.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start within {timeout_s:g} s")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Run in THIS thread until SIGINT/SIGTERM (uvicorn's own graceful shutdown)."""
        try:
            self.server.run(sockets=[self._sock])
        finally:
            self._sock.close()

    def stop(self, grace_s: float = 1.0, timeout_s: float = 10.0) -> None:
        """Shut down: running requests get ``grace_s`` to finish, then the server exits (at most
        ``timeout_s`` in all)."""
        self.server.should_exit = True
        self._thread.join(grace_s)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(max(0.0, timeout_s - grace_s))
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d serve`` (argv without the sub-command); see ``remote/serve.py``."""
    from .serve import serve_main

    return serve_main(argv)
