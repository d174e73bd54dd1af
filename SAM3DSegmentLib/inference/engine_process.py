"""The engine in a child process that the Slicer module starts and owns (docs/slicer.md, "How the engine runs").

Why: inside Slicer the GUI thread holds the Python interpreter lock while Qt idles, so a worker THREAD only
runs while the GUI runs Python and clicks crawl. A child process has its own interpreter (nothing to starve),
and torch, CUDA and out-of-memory crashes stay out of Slicer's process.

* :class:`ProcessEngine` (GUI side, torch-free) has the job API of :class:`~SAM3DSegmentLib.inference.worker.ThreadEngine`:
  ``submit(op, *args, tag=, supersede=, context=, cancellable=) -> Job``, ``poll(wait)``, ``busy``, ``current``,
  ``cancel_all()``, ``call(op, ...)``, ``shutdown()``. The child starts on the first ``submit``.
* The child (``python -c ... engine_process.main()``: ``sys.executable``, or ``PythonSlicer`` inside Slicer,
  or ``$SAM3DSEGMENT_PYTHON``) runs a ``ThreadEngine``. It listens on a private loopback port
  (127.0.0.1, port chosen by the OS) with a random 32-byte key (``multiprocessing.connection``: HMAC
  challenge, so no other program can talk to it), tells the parent the port on its stdout, and accepts one
  connection. The key travels on the child's stdin, never on the command line; a remote server's key travels
  inside the ``load_remote`` request on the authenticated connection, never on a command line either.
* The child exits when the parent goes away: its stdin (kept open by the parent) reaches end of file, or the
  connection closes. Its stderr goes to a log file (``ProcessEngine.log_path``).
* If the child dies (out of memory, segfault, killed), every job in flight fails with :class:`EngineCrashed`
  (exit code and the end of the log) and the next ``submit`` starts a new child and re-sends, in order, the
  model load, the volume and each object's initial mask and clicks (nothing is lost; undo history restarts).

The messages and the child's request loop: :mod:`~SAM3DSegmentLib.inference.protocol`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Listener
from typing import Any, Dict, List, Optional

from .protocol import PROTOCOL, EngineError, decode, encode, no_delay, serve
from .worker import CANCELLED, DONE, FAILED, LOAD_OPS, PENDING, RUNNING, OPS, Job, _job_result
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class EngineCrashed(RuntimeError):
    """The engine process stopped unexpectedly; the next request restarts it."""


def main() -> None:
    """Child entry point: read {"authkey", "options"} (one JSON line) on stdin, listen, serve, exit."""
    config = json.loads(sys.stdin.buffer.readline().decode("utf-8"))
    authkey = bytes.fromhex(config["authkey"])
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    sys.stdout.write(json.dumps({"port": listener.address[1]}) + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # later prints go to the log, never block on a pipe

    def parent_watch():  # end of file on stdin: the parent closed it or died -> leave now
        try:
            sys.stdin.buffer.read()
        finally:
            os._exit(0)

    threading.Thread(target=parent_watch, name="SAM3DSegment-parent-watch", daemon=True).start()
    while True:
        try:
            conn = listener.accept()
            no_delay(conn)
            break
        except Exception as exc:  # noqa: BLE001 - a stranger failed the key challenge: keep waiting
            print(f"SAM3DSegment engine: refused a connection ({exc})", file=sys.stderr, flush=True)
    listener.close()
    options = None
    if config.get("options"):
        from .options import SessionOptions
        opts = dict(config["options"])
        if opts.get("clamp_hu") is not None:
            opts["clamp_hu"] = tuple(opts["clamp_hu"])
        options = SessionOptions(**opts)
    serve(conn, options)
    os._exit(0)  # do not wait for a running job: nobody is left to read its result


# ------------------------------------------------------------------------------------------ parent side
def default_python() -> str:
    """The interpreter for the child: ``$SAM3DSEGMENT_PYTHON``; inside the Slicer application ``PythonSlicer``
    (there ``sys.executable`` is Slicer itself); else ``sys.executable``."""
    configured = os.environ.get("SAM3DSEGMENT_PYTHON")
    if configured:
        return configured
    if getattr(sys.modules.get("slicer"), "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if not found:
            raise RuntimeError("PythonSlicer was not found next to Slicer; set SAM3DSEGMENT_PYTHON to a Python "
                               "that has this extension's dependencies")
        return found
    return sys.executable


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "still running but not answering"
    if code < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ProcessEngine:
    """GUI side of the child-process engine (no torch). See the module docstring for the protocol."""

    def __init__(self, session_options=None, python: Optional[str] = None, start_timeout: float = 120.0):
        self.session_options = session_options
        self.python = python
        self.start_timeout = float(start_timeout)
        self.download = None
        self.current: Optional[Job] = None
        self.log_path: Optional[str] = None
        self.pid: Optional[int] = None
        #: Set (to the error text) when the child died; the next submit restarts it.
        self.crashed: Optional[str] = None
        self.restarts = 0
        self._proc: Optional[subprocess.Popen] = None
        self._conn = None
        self._log = None
        self._ids = 0
        self._inflight: Dict[int, Job] = {}
        self._ready: List[Job] = []
        # what a restart re-sends: the last load, the volume (and its token), each object's initial mask and clicks
        self._load: Optional[tuple] = None
        self._volume: Optional[tuple] = None
        self._clicks: Dict[str, list] = {}
        self._init: Dict[str, tuple] = {}

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._conn is not None

    def start(self) -> None:
        """Start the child and connect (blocks until it answers, at most ``start_timeout`` seconds)."""
        if self.running:
            return
        python = self.python or default_python()
        authkey = os.urandom(32)
        fd, self.log_path = tempfile.mkstemp(prefix="SAM3DSegment-engine-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        code = f"import sys; sys.path.insert(0, {_ROOT!r}); from SAM3DSegmentLib.inference.engine_process import main; main()"
        try:
            self._proc = subprocess.Popen([python, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._log, cwd=tempfile.gettempdir())
        except OSError as exc:
            raise RuntimeError(f"cannot start the engine process with {python!r}: {exc}; set SAM3DSEGMENT_PYTHON "
                               "to a working Python") from exc
        options = dataclasses.asdict(self.session_options) if self.session_options is not None else None
        self._proc.stdin.write((json.dumps({"authkey": authkey.hex(), "options": options}) + "\n").encode())
        self._proc.stdin.flush()   # stdin stays open: the child exits when it closes
        line: List[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self._proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout)
        if not line or not line[0]:
            self._kill()
            raise RuntimeError(f"the engine process did not start ({_exit_text(self._proc.poll())}): "
                               f"{self._log_tail() or 'no output'}; log: {self.log_path}")
        port = json.loads(line[0].decode("utf-8"))["port"]
        self._conn = Client(("127.0.0.1", port), authkey=authkey)
        no_delay(self._conn)
        hello = self._conn.recv() if self._conn.poll(self.start_timeout) else {}
        if hello.get("protocol") != PROTOCOL:
            self._kill()
            raise RuntimeError(f"the engine process speaks protocol {hello.get('protocol')}, this module "
                               f"{PROTOCOL}: the extension is half-updated; restart Slicer")
        self.pid = hello.get("pid")
        self.crashed = None

    def shutdown(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Stop the child (it exits at once, abandoning any running job) and fail what was in flight."""
        proc = self._proc
        if proc is None:
            return
        try:
            if self._conn is not None:
                self._conn.send({"op": "shutdown"})
        except (OSError, EOFError):
            pass
        self._close_pipes()
        if wait:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        for job in list(self._inflight.values()):
            self._finish(job, CANCELLED)
        self._proc = None

    def _close_pipes(self) -> None:
        for closer in (getattr(self._conn, "close", None), getattr(getattr(self._proc, "stdin", None), "close", None),
                       getattr(getattr(self._proc, "stdout", None), "close", None)):
            try:
                if closer is not None:
                    closer()
            except OSError:
                pass
        self._conn = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._close_pipes()

    def _log_tail(self, n: int = 6) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
            return " | ".join(lines[-n:])
        except (OSError, TypeError):
            return ""

    # ------------------------------------------------------------------ job API
    def submit(self, op: str, *args, tag: Optional[str] = None, supersede: bool = False, context: Any = None,
               cancellable: bool = True, **kwargs) -> Job:
        if op not in OPS:
            raise ValueError(f"unknown engine operation {op!r}; known: {', '.join(OPS)}")
        if not self.running:
            self._restart(replay=op not in LOAD_OPS)
        return self._send(op, args, kwargs, tag, supersede, context, cancellable)

    def _send(self, op, args, kwargs, tag, supersede, context, cancellable) -> Job:
        self._ids += 1
        job = Job(op, args, kwargs, tag, False, context, cancellable)
        job.remote_id = self._ids
        if op in LOAD_OPS:
            self.download = None
        if supersede and tag is not None:
            for old in self._inflight.values():
                if old.tag == tag and old.state == PENDING:
                    old.cancel()   # the child drops it too (same rule there)
        self._inflight[job.remote_id] = job
        try:
            self._conn.send({"op": "call", "id": job.remote_id, "name": op, "args": encode(list(args)),
                             "kwargs": encode(kwargs), "tag": tag, "supersede": supersede,
                             "cancellable": cancellable})
        except (OSError, EOFError):
            self._crash()
        return job

    def _restart(self, replay: bool) -> None:
        was_crashed = self.crashed is not None or self._proc is not None
        self._kill()
        self._proc = None
        self.start()
        if was_crashed:
            self.restarts += 1
        if not replay or self._load is None:
            return
        load, volume, clicks, inits = self._load, self._volume, dict(self._clicks), dict(self._init)
        restore = {"kind": "restore"}
        self._send(load[0], load[1], load[2], None, False, restore, False)
        if volume is not None:
            self._send("set_volume", volume, {}, None, False, restore, False)
            for key, (args, kwargs) in inits.items():
                self._send("set_initial_mask", (key,) + tuple(args), kwargs, None, False, restore, False)
            for key, cl in clicks.items():
                if cl:
                    self._send("sync_clicks", (key, cl, volume[1]), {}, None, False, restore, False)

    def poll(self, wait: float = 0.0) -> List[Job]:
        """Finished jobs in completion order. With ``wait`` > 0 and work in flight, first wait up to ``wait``
        seconds for a reply with the interpreter lock released (``Connection.poll``)."""
        self._receive(wait)
        out = [j for j in self._ready if not getattr(j, "silent", False)]
        self._ready = []
        return out

    def _receive(self, wait: float) -> None:
        if self._conn is None:
            return
        deadline = time.perf_counter() + max(0.0, wait)
        try:
            while self._inflight:
                timeout = max(0.0, deadline - time.perf_counter())
                if not self._conn.poll(timeout):
                    if self._proc.poll() is not None:
                        raise EOFError
                    return
                got_result = self._handle(self._conn.recv())
                if got_result:
                    deadline = 0.0   # a reply arrived: hand it over now, drain the rest without waiting
        except (EOFError, OSError):
            self._crash()

    def _handle(self, msg: dict) -> bool:
        op = msg.get("op")
        if op == "progress":
            self.download = (msg["done"], msg["total"])
        elif op == "started":
            job = self._inflight.get(msg["id"])
            if job is not None:
                job.state, job.started = RUNNING, time.perf_counter()
                self.current = job
        elif op == "result":
            job = self._inflight.get(msg["id"])
            if job is None:
                return False
            if msg["state"] == DONE:
                job.result = decode(msg.get("result"))
                self._remember(job)
            elif msg["state"] == FAILED:
                job.error = EngineError(msg.get("error", ""), msg.get("error_type", "RuntimeError"))
                job.traceback = msg.get("traceback", "")
            self._finish(job, msg["state"])
            return True
        return False

    def _remember(self, job: Job) -> None:
        """Keep what a restart must re-send, from the results (they arrive in the order the engine ran them)."""
        op, args = job.fn, job.args
        if op in LOAD_OPS + ("set_volume", "forget_volume"):
            self._clicks, self._init, self._volume = {}, {}, None
        if op in LOAD_OPS:   # (a remote load's key stays in this process's memory, for the replay only)
            self._load = (op, args, dict(job.kwargs))
        elif op == "set_volume":
            self._volume = (args[0], args[1] if len(args) > 1 else job.kwargs.get("token"))
        elif op == "set_initial_mask":
            self._init[args[0]], self._clicks[args[0]] = (args[1:], dict(job.kwargs)), []
        elif op == "sync_clicks":
            self._clicks[args[0]] = [tuple(c) for c in args[1]]
        elif op == "edit":
            self._clicks[args[1]] = list(job.result[1])
        elif op == "clicks":
            self._clicks[args[0]] = list(job.result)
        elif op == "forget_object":
            self._clicks.pop(args[0], None)
            self._init.pop(args[0], None)

    def _finish(self, job: Job, state: str) -> None:
        self._inflight.pop(getattr(job, "remote_id", None), None)
        job.state, job.finished = state, time.perf_counter()
        if self.current is job:
            self.current = None
        job._done.set()
        self._ready.append(job)

    def _crash(self) -> None:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
        tail = self._log_tail()
        self.crashed = (f"the engine process stopped unexpectedly ({_exit_text(code)})"
                        + (f": {tail}" if tail else "")
                        + "; nothing is lost: the next click or 'Load model' restarts it and re-sends the volume "
                          f"and clicks (log: {self.log_path})")
        self._close_pipes()
        for job in list(self._inflight.values()):
            job.error, job.traceback = EngineCrashed(self.crashed), tail
            self._finish(job, FAILED)

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    def cancel_all(self) -> None:
        ids = [i for i, j in self._inflight.items() if j.cancellable]
        for i in ids:
            self._inflight[i].cancel()
        if ids and self._conn is not None:
            try:
                self._conn.send({"op": "cancel", "ids": ids})
            except (OSError, EOFError):
                self._crash()

    def call(self, op: str, *args, timeout: float = 600.0, **kwargs):
        """Run ``op`` and wait for its result (raises its error); ``poll`` never returns this job."""
        job = self.submit(op, *args, **kwargs)
        job.silent = True
        deadline = time.perf_counter() + timeout
        while job.state in (PENDING, RUNNING) and time.perf_counter() < deadline:
            self._receive(min(0.05, max(0.0, deadline - time.perf_counter())))
        self._ready = [j for j in self._ready if j is not job]
        if job.state in (PENDING, RUNNING):
            raise TimeoutError(f"the engine did not answer {op!r} within {timeout:.0f} s")
        return _job_result(job)

    def __del__(self):  # best effort; the child also exits when our end of its stdin closes
        try:
            self.shutdown(wait=False)
        except Exception:  # noqa: BLE001
            pass
