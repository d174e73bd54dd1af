"""``RemoteBackend``: the backend interface (``backends.Backend``) over HTTP to ``sam3d serve`` servers.

The engine builds each 128^3 model input itself and calls ``encode``; only that array travels (float16 by
default, byte-shuffled and compressed), never the volume and never the region's geometry. Two modes:

* ``split`` — the server returns the embedding and clicks are decoded HERE, by the ONNX export of the
  prompt encoder + mask decoder (onnxruntime, no torch; fetched from the server once and checked by
  sha256) or by a local torch backend built from the same checkpoint. A click never crosses the network.
* ``full`` — the server decodes too; each click sends the points and the previous low-res logits
  (``decode`` is stateless). The client needs only numpy.

Servers are interchangeable (``remote/transport.py`` fails over between them). An embedding handle
remembers the server that made it; when that server is gone (or restarted) a full-mode decode resends the
region to another one, so nothing is lost.

Precision: ``wire_dtype="float16"`` (default) halves the bytes of the image and the embedding; the
masks then differ slightly from a local float32 run (measured in benchmarks/bench_remote.py and
docs/remote.md). ``wire_dtype="float32"`` is exact: logits equal a local run to float rounding.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from .errors import BadRequest, RemoteError, UnknownEmbedding, VersionMismatch
from .onnx_decoder import OnnxDecoderError
from .protocol import KEY_HEADER, PROTOCOL_VERSION, available_codecs, content_key, pack, unpack, wire_array
from .transport import Transport

MODES = ("auto", "split", "full")


@dataclass
class RemoteEmbedding:
    """Handle returned by :meth:`RemoteBackend.encode` (opaque to the engine)."""

    model: str
    key: str
    server: str
    embedding: Optional[np.ndarray] = None   # split mode: (1, C, g, g, g) float32
    image: Optional[np.ndarray] = None       # full mode: the wire array, kept to resend


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


class RemoteBackend:
    """Backend on remote servers (see the module docstring).

    ``servers``: one URL or several equivalent ones (fail-over). ``key``: the bearer key (None for a
    loopback server without keys). ``model``: a model name the servers offer (default: their first).
    ``mode``: ``auto`` (split with ONNX when onnxruntime is installed and the server offers the decoder,
    split with ``local_decoder`` when given, else full), ``split`` or ``full``. ``local_decoder``: an
    object with ``decode(embedding_numpy, points, labels, mask_logits)`` (a ``LocalBackend`` of the same
    checkpoint); ``expected_sha256``: the checkpoint sha256 the server's model must have.
    """

    def __init__(self, servers, key: Optional[str] = None, model: Optional[str] = None, mode: str = "auto",
                 local_decoder: Any = None, expected_sha256: Optional[str] = None, wire_dtype: str = "float16",
                 timeout_s: float = 60.0, connect_timeout_s: float = 5.0, ca_file: Optional[str] = None,
                 codec: Optional[str] = None, onnx_threads: Optional[int] = None, busy_retries: int = 2):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if wire_dtype not in ("float16", "float32"):
            raise ValueError(f"wire_dtype must be float16 or float32, got {wire_dtype!r}")
        if codec is not None and codec not in available_codecs():
            raise ValueError(f"codec {codec!r} is not available here; use one of {available_codecs()}")
        self.transport = Transport(servers, key, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                                   ca_file=ca_file, busy_retries=busy_retries)
        self.wire_dtype = wire_dtype
        self.codec = codec or available_codecs()[0]
        self.caps = self.capabilities()
        self.model_info = self._choose_model(model, expected_sha256)
        self.model = self.model_info["name"]
        self.image_size = int(self.model_info["image_size"])
        self.low_res_size = int(self.model_info["low_res_size"])
        self.decoder = None
        decoder_kind = "server"
        if mode in ("split", "auto") and local_decoder is not None:
            self.decoder, decoder_kind = local_decoder, "local torch"
        elif mode == "split":
            self.decoder, decoder_kind = self._onnx_decoder(onnx_threads), "local ONNX"
        elif mode == "auto" and self.model_info.get("decoder_onnx") and onnxruntime_available():
            try:
                self.decoder, decoder_kind = self._onnx_decoder(onnx_threads), "local ONNX"
            except (BadRequest, OnnxDecoderError) as err:  # e.g. the server's export failed: let it decode
                decoder_kind = f"server (no local ONNX decoder: {err})"
        self.mode = "full" if self.decoder is None else "split"
        n = len(self.transport.servers)
        where = self.transport.servers[0] + (f" (+{n - 1} more)" if n > 1 else "")
        self.name = (f"{self.model} on {self.caps.get('device', '?')} at {where}; {self.mode} mode, decoder: "
                     f"{decoder_kind}, wire {wire_dtype}")

    # ------------------------------------------------------------------ set-up
    def capabilities(self) -> Dict[str, Any]:
        reply = self.transport.request("GET", "/v1/capabilities")
        try:
            caps = reply.json()
        except ValueError:
            raise RemoteError(f"{reply.url} sent capabilities that are not JSON; is it a sam3d server?", reply.url)
        if caps.get("protocol") != PROTOCOL_VERSION:
            raise VersionMismatch(f"{reply.url} speaks protocol {caps.get('protocol')} (sam3dsegment "
                                  f"{caps.get('version')}), this client {PROTOCOL_VERSION}; install matching "
                                  "versions on both sides", reply.url)
        return caps

    def _choose_model(self, name: Optional[str], sha256: Optional[str]) -> Dict[str, Any]:
        models = self.caps.get("models") or []
        if sha256:
            found = [m for m in models if (m.get("sha256") or "").lower() == sha256.lower()]
            if not found:
                served = [(m["name"], (m.get("sha256") or "")[:12]) for m in models]
                raise VersionMismatch(f"the servers offer no model with sha256 {sha256[:12]}... (the local "
                                      f"checkpoint): they serve {served}; use the same checkpoint on both sides "
                                      "or the ONNX decoder")
            if name and name not in [m["name"] for m in found]:
                raise VersionMismatch(f"model {name!r} on the server is not the local checkpoint (sha256 differs)")
            return found[0]
        if name is None:
            if not models:
                raise RemoteError("the server offers no models")
            return models[0]
        for m in models:
            if m["name"] == name:
                return m
        raise RemoteError(f"the servers do not offer model {name!r}; they offer {[m['name'] for m in models]}")

    def _onnx_decoder(self, threads: Optional[int]):
        from .onnx_decoder import OnnxDecoder

        if not self.model_info.get("decoder_onnx"):
            raise RemoteError(f"the servers offer no ONNX decoder for {self.model}; use the full mode or a local "
                              "torch decoder")
        reply = self.transport.request("GET", f"/v1/models/{self.model}/decoder.onnx")
        digest = hashlib.sha256(reply.body).hexdigest()
        if reply.headers.get("x-sha256") != digest:
            raise RemoteError(f"the ONNX decoder from {reply.url} arrived damaged (sha256 mismatch); try again",
                              reply.url)
        dec = OnnxDecoder(reply.body, threads=threads)
        if list(dec.embedding_shape) != list(self.model_info.get("embedding_shape") or dec.embedding_shape) \
                or dec.low_res_size != self.low_res_size:
            raise VersionMismatch(f"the ONNX decoder from {reply.url} does not fit model {self.model}")
        return dec

    def _meta(self, **extra) -> Dict[str, Any]:
        meta = {"model": self.model, "accept_codecs": available_codecs()}
        if self.model_info.get("sha256"):
            meta["model_sha256"] = self.model_info["sha256"]
        meta.update(extra)
        return meta

    def _post(self, path: str, body: bytes, key: str, prefer: Optional[str] = None):
        limit = (self.caps.get("limits") or {}).get("max_request_bytes")
        if limit and len(body) > int(limit):  # refused here: a server closing mid-upload looks like a crash
            raise BadRequest(f"a request of {len(body)} bytes exceeds the server's limit of {limit} bytes; use "
                             "--wire-dtype float16 or ask the operator to raise --max-request-mb")
        # KEY_HEADER lets a load balancer route every request about one region to the same server
        # (e.g. nginx "hash $http_x_sam3d_key consistent"), so full-mode clicks find their embedding cached.
        return self.transport.request("POST", path, body, prefer=prefer, headers={KEY_HEADER: key})

    def _unpack(self, reply):
        try:
            return unpack(reply.body, max_array_bytes=256 << 20)
        except ValueError as err:
            raise RemoteError(f"{reply.url} sent a malformed answer ({err})", reply.url) from None

    # ------------------------------------------------------------------ Backend interface
    def encode(self, image: np.ndarray) -> RemoteEmbedding:
        s = self.image_size
        if np.shape(image) != (s, s, s):
            raise ValueError(f"image must have shape {(s, s, s)}, got {np.shape(image)}")
        img = wire_array(image, self.wire_dtype)
        key = content_key(img)
        split = self.mode == "split"
        body = pack(self._meta(return_embedding=split, embedding_dtype=self.wire_dtype), {"image": img}, self.codec)
        reply = self._post("/v1/encode", body, key)
        meta, arrays = self._unpack(reply)
        if meta.get("key") != key:
            raise RemoteError(f"{reply.url} answered for another input (content key mismatch)", reply.url)
        if not split:
            return RemoteEmbedding(self.model, key, reply.url, image=img)
        emb = arrays.get("embedding")
        want = tuple(self.model_info.get("embedding_shape") or ())
        if emb is None or (want and emb.shape != want):
            raise RemoteError(f"{reply.url} sent no embedding of shape {want}", reply.url)
        return RemoteEmbedding(self.model, key, reply.url, embedding=np.asarray(emb, dtype=np.float32))

    def decode(self, embedding: RemoteEmbedding, points, labels, mask_logits) -> np.ndarray:
        s = self.low_res_size
        if embedding.embedding is not None:
            return np.asarray(self.decoder.decode(embedding.embedding, points, labels, mask_logits),
                              dtype=np.float32).reshape(s, s, s)
        arrays = {"points": np.asarray(points, dtype=np.float32).reshape(-1, 3),
                  "labels": np.asarray(labels, dtype=np.int32).reshape(-1)}
        if mask_logits is not None:
            arrays["mask_logits"] = np.asarray(mask_logits, dtype=np.float32).reshape(s, s, s)
        try:
            reply = self._post("/v1/decode", pack(self._meta(key=embedding.key), arrays, self.codec), embedding.key,
                               prefer=embedding.server)
        except UnknownEmbedding as err:  # evicted, restarted or another server: send the region itself
            body = pack(self._meta(key=embedding.key), {**arrays, "image": embedding.image}, self.codec)
            reply = self._post("/v1/decode", body, embedding.key, prefer=err.url)
        embedding.server = reply.url
        meta, out = self._unpack(reply)
        logits = out.get("logits")
        if logits is None or logits.shape != (s, s, s):
            raise RemoteError(f"{reply.url} sent no logits of shape {(s, s, s)}", reply.url)
        return logits

    # ------------------------------------------------------------------ extras
    def wire_stats(self) -> Dict[str, int]:
        """Requests and bytes on the wire so far (request and answer bodies plus headers)."""
        return dict(self.transport.stats)

    def close(self) -> None:
        self.transport.close()

