"""Wire format shared by the remote server and client (numpy + the standard library; torch-free).

A request or response that carries arrays is one binary message (media type :data:`MEDIA_TYPE`)::

    b"S3DA" | format version (1 byte) | 3 zero bytes | header length (uint32 LE) | header | payloads

The header is UTF-8 JSON ``{"meta": {...}, "arrays": [{"name", "dtype", "shape", "codec", "shuffle",
"nbytes"}, ...]}``; the payloads follow in the order listed. Arrays are little-endian, C order, one of
:data:`DTYPES`; each payload is the raw bytes, optionally byte-shuffled (all first bytes of every element,
then all second bytes, ... — the HDF5/Blosc filter, which lets a compressor see the slowly varying exponent
bytes together) and compressed with zstd (when the ``zstandard`` package is installed) or zlib (standard
library). Nothing in a message is executed or unpickled; :func:`unpack` checks every field, bounds every
size before allocating and decompressing (no decompression bombs) and raises :class:`ProtocolError`, which
the server turns into a 4xx answer with the reason.

Errors travel as JSON ``{"error": CODE, "detail": "one line"}`` with a 4xx/5xx status.

:func:`content_key` is the cache key of a model input: the sha256 of its dtype, shape and bytes as sent.
Client and server compute it independently from the same array, so a key names exactly one input and a
client can never make a server cache an embedding under someone else's key.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

#: Version of the HTTP API (paths, fields, semantics). A client refuses a server with another major version.
PROTOCOL_VERSION = 1
#: Media type of binary messages.
MEDIA_TYPE = "application/x-sam3d-arrays"
#: Request header carrying the client's protocol version.
PROTOCOL_HEADER = "X-SAM3D-Protocol"
#: Request header carrying the content key of the region a request is about (for load balancers' routing).
KEY_HEADER = "X-SAM3D-Key"

MAGIC = b"S3DA"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sB3xI")
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 8
MAX_NDIM = 5
#: Element types allowed on the wire (little-endian).
DTYPES = {"float16": "<f2", "float32": "<f4", "int32": "<i4", "int64": "<i8", "uint8": "u1"}

# Error codes (the ``error`` field of JSON error answers).
E_AUTH = "unauthorized"
E_BAD_REQUEST = "bad_request"
E_TOO_LARGE = "too_large"
E_UNSUPPORTED_MEDIA = "unsupported_media_type"
E_PROTOCOL = "protocol_mismatch"
E_UNKNOWN_MODEL = "unknown_model"
E_UNKNOWN_EMBEDDING = "unknown_embedding"
E_MODEL_MISMATCH = "model_mismatch"
E_RATE = "rate_limited"
E_BUSY = "server_busy"
E_TIMEOUT = "request_timeout"
E_INTERNAL = "internal_error"
E_NOT_AVAILABLE = "not_available"


class ProtocolError(ValueError):
    """A message or field that breaks the protocol; ``status`` is the HTTP status to answer with."""

    def __init__(self, detail: str, code: str = E_BAD_REQUEST, status: int = 400):
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.status = status


# ------------------------------------------------------------------------------------------ codecs
def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def available_codecs() -> List[str]:
    """Codecs this process can read and write, best first (zstd needs the ``zstandard`` package)."""
    return (["zstd"] if _zstd() is not None else []) + ["zlib", "none"]


def choose_codec(accepted: Optional[Sequence[str]]) -> str:
    """The best codec both sides have (``accepted`` from the peer; None = anything we have)."""
    ours = available_codecs()
    if not accepted:
        return ours[0]
    for codec in ours:
        if codec in accepted:
            return codec
    return "none"


def _compress(raw: bytes, codec: str, level: Optional[int]) -> bytes:
    if codec == "none":
        return raw
    if codec == "zlib":
        return zlib.compress(raw, 1 if level is None else level)
    if codec == "zstd":
        zstd = _zstd()
        if zstd is None:
            raise ProtocolError("codec 'zstd' needs the zstandard package; pip install zstandard or use zlib",
                                E_UNSUPPORTED_MEDIA, 415)
        return zstd.ZstdCompressor(level=3 if level is None else level).compress(raw)
    raise ProtocolError(f"unknown codec {codec!r}; use one of {available_codecs()}", E_UNSUPPORTED_MEDIA, 415)


def _decompress(data: bytes, codec: str, expected: int) -> bytes:
    """Decompress at most ``expected`` bytes; anything longer or shorter is refused."""
    if codec == "none":
        out = data
    elif codec == "zlib":
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, expected + 1)
        except zlib.error as err:
            raise ProtocolError(f"corrupt zlib payload ({err})") from None
        if d.unconsumed_tail or not d.eof:
            raise ProtocolError("zlib payload is longer than its declared shape or truncated")
    elif codec == "zstd":
        zstd = _zstd()
        if zstd is None:
            raise ProtocolError("this server cannot read zstd payloads (zstandard is not installed); send zlib",
                                E_UNSUPPORTED_MEDIA, 415)
        chunks, got = [], 0
        try:
            with zstd.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                while got <= expected:
                    chunk = reader.read(expected + 1 - got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
        except zstd.ZstdError as err:
            raise ProtocolError(f"corrupt zstd payload ({err})") from None
        out = b"".join(chunks)
    else:
        raise ProtocolError(f"unknown codec {codec!r}; use one of {available_codecs()}", E_UNSUPPORTED_MEDIA, 415)
    if len(out) != expected:
        raise ProtocolError(f"payload holds {len(out)} bytes after decompression, its shape needs {expected}")
    return out


def _shuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


# ------------------------------------------------------------------------------------------ messages
def wire_array(array: np.ndarray, dtype: Optional[str] = None) -> np.ndarray:
    """``array`` as the contiguous little-endian array that goes on the wire (cast to ``dtype`` if given)."""
    a = np.asarray(array)
    name = dtype or a.dtype.name
    if name not in DTYPES:
        raise ProtocolError(f"dtype {name} cannot be sent; use one of {sorted(DTYPES)}")
    return np.ascontiguousarray(a, dtype=np.dtype(DTYPES[name]))


def content_key(array: np.ndarray) -> str:
    """sha256 (hex) of a wire array's dtype, shape and bytes — the cache key of a model input."""
    a = wire_array(array)
    h = hashlib.sha256()
    h.update(f"{a.dtype.name}:{','.join(str(int(n)) for n in a.shape)}:".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def pack(meta: Mapping[str, Any], arrays: Optional[Mapping[str, np.ndarray]] = None, codec: str = "zlib",
         shuffle: bool = True, level: Optional[int] = None) -> bytes:
    """One binary message of ``meta`` (JSON-serialisable) and named arrays (dtypes from :data:`DTYPES`)."""
    descs, payloads = [], []
    for name, array in (arrays or {}).items():
        a = wire_array(array)
        raw = a.tobytes()
        shuf = bool(shuffle and codec != "none" and a.itemsize > 1)
        if shuf:
            raw = _shuffle(raw, a.itemsize)
        data = _compress(raw, codec, level)
        descs.append({"name": str(name), "dtype": a.dtype.name, "shape": [int(n) for n in a.shape],
                      "codec": codec, "shuffle": shuf, "nbytes": len(data)})
        payloads.append(data)
    header = json.dumps({"meta": dict(meta), "arrays": descs}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError("message header too large")
    return b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header, *payloads])


def _check_desc(d: Any, max_array_bytes: int) -> Tuple[str, np.dtype, Tuple[int, ...], str, bool, int]:
    if not isinstance(d, dict):
        raise ProtocolError("each array description must be a JSON object")
    name, dtype, shape = d.get("name"), d.get("dtype"), d.get("shape")
    codec, shuf, nbytes = d.get("codec", "none"), d.get("shuffle", False), d.get("nbytes")
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise ProtocolError("array name must be a string of 1 to 64 characters")
    if dtype not in DTYPES:
        raise ProtocolError(f"array {name!r}: dtype {dtype!r} is not allowed; use one of {sorted(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ProtocolError(f"array {name!r}: shape must be a list of at most {MAX_NDIM} non-negative integers")
    if codec not in ("zstd", "zlib", "none") or not isinstance(shuf, bool):
        raise ProtocolError(f"array {name!r}: unknown codec {codec!r} (use zstd, zlib or none)",
                            E_UNSUPPORTED_MEDIA, 415)
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ProtocolError(f"array {name!r}: nbytes must be a non-negative integer")
    dt = np.dtype(DTYPES[dtype])
    count = 1
    for n in shape:
        count *= n
        if count * dt.itemsize > max_array_bytes:
            raise ProtocolError(f"array {name!r} of shape {shape} is larger than this server's limit of "
                                f"{max_array_bytes} bytes per array", E_TOO_LARGE, 413)
    return name, dt, tuple(shape), codec, shuf, count * dt.itemsize


def unpack(data: bytes, max_array_bytes: int = 64 << 20) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a message made by :func:`pack`; every field checked (see the module doc)."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise ProtocolError(f"body too short for a {MEDIA_TYPE} message ({len(view)} bytes)")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(f"body is not a {MEDIA_TYPE} message (bad magic bytes)", E_UNSUPPORTED_MEDIA, 415)
    if version != FORMAT_VERSION:
        raise ProtocolError(f"message format version {version} is not supported (this side reads "
                            f"{FORMAT_VERSION}); update the older of client and server", E_PROTOCOL, 400)
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(view):
        raise ProtocolError("message header length is invalid")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("message header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("meta", {}), dict) \
            or not isinstance(header.get("arrays", []), list):
        raise ProtocolError("message header must be {\"meta\": {...}, \"arrays\": [...]}")
    descs = header.get("arrays", [])
    if len(descs) > MAX_ARRAYS:
        raise ProtocolError(f"too many arrays in one message ({len(descs)} > {MAX_ARRAYS})")
    checked = [_check_desc(d, max_array_bytes) for d in descs]
    names = [c[0] for c in checked]
    if len(set(names)) != len(names):
        raise ProtocolError("duplicate array names in one message")
    offset = _PREFIX.size + hlen
    if offset + sum(d["nbytes"] for d in descs) != len(view):
        raise ProtocolError("message length does not match the array sizes in its header")
    arrays: Dict[str, np.ndarray] = {}
    for (name, dt, shape, codec, shuf, expected), d in zip(checked, descs):
        payload = bytes(view[offset:offset + d["nbytes"]])
        offset += d["nbytes"]
        if codec == "none" and shuf:
            raise ProtocolError(f"array {name!r}: shuffle needs a codec")
        raw = _decompress(payload, codec, expected)
        if shuf:
            raw = _unshuffle(raw, dt.itemsize)
        arrays[name] = np.frombuffer(bytearray(raw), dtype=dt).reshape(shape)
    return header.get("meta", {}), arrays


def error_body(code: str, detail: str) -> Dict[str, str]:
    """JSON body of an error answer (``detail`` is one line)."""
    return {"error": code, "detail": " ".join(str(detail).split())}


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (the only binds allowed without a key)."""
    import ipaddress

    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
