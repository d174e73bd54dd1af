"""The remote inference server: a FastAPI app that encodes model-input regions (and decodes clicks for
clients that cannot), run by uvicorn (``sam3d serve``: ``cli/serve.py`` and ``remote/serve.py``; docs/remote.md).

Endpoints (``{"error": CODE, "detail": ...}`` JSON on failure; arrays travel as ``remote/protocol.py``
messages):

* ``GET  /v1/health`` — liveness for load balancers; no key needed, no model work.
* ``GET  /v1/capabilities`` — protocol and project versions, models (name, sha256, shapes), device, limits.
* ``GET  /v1/stats`` — cache, queue, rate-limit and request counters.
* ``POST /v1/encode`` — ``image`` (S, S, S) float16/float32 -> ``key`` (+ ``embedding`` when asked).
* ``POST /v1/decode`` — ``key`` or ``image``, ``points`` (N, 3), ``labels`` (N,), optional ``mask_logits``
  (s, s, s) -> ``logits`` (s, s, s) float32.
* ``GET  /v1/models/{name}/decoder.onnx`` — the prompt encoder + mask decoder as ONNX (split clients).

Stateless (``remote/service.py``): every request carries what it needs, so any server behind a plain
round-robin balancer can answer it and a restart loses nothing a client cannot resend. Models are chosen
at start-up by the operator; a client picks one by NAME only and can never make the server load a file.

Security: a bearer key is required on everything but ``/v1/health`` unless the server is bound to loopback
only; keys are compared in constant time (``hmac.compare_digest``) against every configured key and never
logged. The key and rate checks run before the request body is read, so a refused request does no work;
bodies must declare their length, which counts against ``max_inflight_bytes`` (503 when over) until the
request is answered, so the memory held by requests in progress is bounded.
"""
# No "from __future__ import annotations": FastAPI reads the endpoints' annotations (Request) at runtime.
import asyncio
import hashlib
import logging
import re
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from .limits import Busy
from .protocol import (
    E_BAD_REQUEST, E_BUSY, E_INTERNAL, E_TIMEOUT, E_TOO_LARGE, E_UNKNOWN_EMBEDDING, E_UNSUPPORTED_MEDIA, MEDIA_TYPE,
    PROTOCOL_VERSION, ProtocolError, choose_codec, content_key, error_body, pack, unpack)
from .service import ServedModel, ServerConfig, ServerState, _Refused

__all__ = ["ServedModel", "ServerConfig", "ServerState", "ServerThread", "create_app"]

log = logging.getLogger("sam3d.serve")

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def _declared_length(request, limit: int) -> int:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != MEDIA_TYPE:
        raise ProtocolError(f"send the body as {MEDIA_TYPE} (got {ctype or 'no content type'})",
                            E_UNSUPPORTED_MEDIA, 415)
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise ProtocolError("send a Content-Length header (chunked uploads are not accepted)", E_BAD_REQUEST, 411)
    if int(declared) > limit:
        raise ProtocolError(f"request of {int(declared)} bytes exceeds this server's limit of {limit} bytes",
                            E_TOO_LARGE, 413)
    return int(declared)


async def _read_body(request, limit: int, timeout_s: float) -> bytes:

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
        request.state.reserved = 0
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
        finally:
            state.release(request.state.reserved)

    async def message(request: Request):
        """The request's (meta, arrays); its size counts against the in-flight budget until it is answered."""
        limit = state.config.max_request_bytes
        nbytes = _declared_length(request, limit)
        state.reserve(nbytes)
        request.state.reserved = nbytes
        body = await _read_body(request, limit, state.config.body_timeout_s)
        return await run_in_threadpool(unpack, body, limit)

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

