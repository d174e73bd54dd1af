"""The engine process's message layer: what parent and child send each other, and the child's request loop.

Messages (one pickled dict each way; payloads hold only builtins and numpy arrays, see :func:`encode`, so the
same layer can back another transport)::

    parent -> child  {"op": "call", "id": n, "name": op, "args": [...], "kwargs": {...},
                      "tag": str|None, "supersede": bool, "cancellable": bool}
                     {"op": "cancel", "ids": [n, ...]}          {"op": "shutdown"}
    child -> parent  {"op": "hello", "protocol": 1, "pid": pid}
                     {"op": "started", "id": n}                 {"op": "progress", "done": b, "total": t|None}
                     {"op": "result", "id": n, "state": "done"|"failed"|"cancelled", "result": ...,
                      "error_type": str, "error": str, "traceback": str, "run_s": seconds}

The transport is a ``multiprocessing.connection`` (:mod:`~SAM3DSegmentLib.inference.engine_process` sets it up).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict

import numpy as np

from ..core.geometry import Volume
from ..core.types import MaskUpdate
from .worker import DONE, FAILED, Job, ThreadEngine

__all__ = ["PROTOCOL", "EngineError", "encode", "decode", "no_delay", "serve"]

#: Version of the messages; parent and child refuse to talk across versions.
PROTOCOL = 1


class EngineError(RuntimeError):
    """An error raised inside the engine process; ``type_name`` is the original exception's class name."""

    def __init__(self, message: str, type_name: str = "RuntimeError"):
        super().__init__(message)
        self.type_name = type_name


def encode(obj: Any) -> Any:
    """Builtins + numpy arrays only: ``Volume`` and ``MaskUpdate`` become tagged dicts, boxes lists of pairs."""
    if isinstance(obj, Volume):
        return {"__type__": "Volume", "array": obj.array, "ijk_to_ras": obj.ijk_to_ras,
                "meta": {k: v for k, v in obj.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    if isinstance(obj, MaskUpdate):
        return {"__type__": "MaskUpdate", "object_id": obj.object_id,
                "box": [[s.start, s.stop] for s in obj.box], "mask_box": np.asarray(obj.mask_box),
                "encoded_regions": int(obj.encoded_regions), "timings": dict(obj.timings),
                "regions": int(obj.regions), "truncated": bool(obj.truncated)}
    if isinstance(obj, tuple):
        return tuple(encode(v) for v in obj)
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    return obj


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, dict):
        kind = obj.get("__type__")
        if kind == "Volume":
            return Volume(obj["array"], obj["ijk_to_ras"], dict(obj.get("meta") or {}))
        if kind == "MaskUpdate":
            mask = np.asarray(obj["mask_box"])
            mask.flags.writeable = False
            return MaskUpdate(obj["object_id"], tuple(slice(a, b) for a, b in obj["box"]), mask,
                              obj["encoded_regions"], obj["timings"], obj["regions"], obj["truncated"])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(decode(v) for v in obj)
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def no_delay(conn) -> None:
    """Send small messages at once (TCP_NODELAY): with Nagle's algorithm a reply that follows another small
    message waits for the peer's delayed acknowledgement, about 40 ms per request."""
    import socket

    s = socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)   # a duplicate of the same socket
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        s.close()


def serve(conn, session_options=None) -> None:
    """Run requests from ``conn`` on a ThreadEngine until the connection closes or "shutdown" arrives."""
    runner = ThreadEngine(session_options)
    send_lock = threading.Lock()
    jobs: Dict[int, Job] = {}

    def send(msg):
        with send_lock:
            conn.send(msg)

    runner.on_download = lambda done, total: send({"op": "progress", "done": int(done),
                                                   "total": None if total is None else int(total)})
    runner.worker.on_start = lambda job: send({"op": "started", "id": job.context})

    def reply(job):  # on the worker thread, as soon as the job ends
        jobs.pop(job.context, None)
        msg = {"op": "result", "id": job.context, "state": job.state,
               "run_s": None if job.started is None else job.finished - job.started}
        if job.state == DONE:
            try:
                msg["result"] = encode(job.result)
            except Exception as exc:  # noqa: BLE001 - reported, never kills the engine
                msg.update(state=FAILED, error_type=type(exc).__name__, error=f"cannot send the result: {exc}")
        elif job.state == FAILED:
            msg.update(error_type=type(job.error).__name__, error=str(job.error), traceback=job.traceback)
        try:
            send(msg)
        except (OSError, EOFError):
            os._exit(0)

    runner.worker.on_finish = reply
    send({"op": "hello", "protocol": PROTOCOL, "pid": os.getpid()})
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op = msg.get("op")
        if op == "call":
            try:
                job = runner.submit(msg["name"], *decode(msg["args"]), tag=msg.get("tag"),
                                    supersede=bool(msg.get("supersede")), context=msg["id"],
                                    cancellable=bool(msg.get("cancellable", True)), **decode(msg["kwargs"]))
                jobs[msg["id"]] = job
            except Exception as exc:  # noqa: BLE001 - e.g. an unknown op: answered, the engine lives on
                send({"op": "result", "id": msg["id"], "state": FAILED, "error_type": type(exc).__name__,
                      "error": str(exc), "traceback": "", "run_s": 0.0})
        elif op == "cancel":
            for i in msg.get("ids", ()):
                job = jobs.get(i)
                if job is not None:
                    job.cancel()
        elif op == "shutdown":
            return
