"""One persistent worker thread for the model, and the engine it drives (pure Python: threading + queue).

Slicer's GUI thread submits jobs and pumps finished ones with :meth:`Worker.poll` (a ``qt.QTimer``); it is the
only thread that touches MRML or Qt. The worker thread owns the model, the backend and the
:class:`~SAM3DSegmentLib.inference.session.Session` (a fresh thread per click would pay the warm-up again).

* Errors never escape the thread: a failed job carries ``error`` (the exception) and ``traceback`` (text).
* Cancellation: a pending job is dropped before it runs; a running job sees ``job.cancel_requested`` and
  the engine abandons its computation before storing anything, so a cancelled click leaves the session
  exactly as it was (clicks, mask, undo and redo). A job that returns normally is DONE even if a cancel came
  too late: its change happened and the GUI must apply it. Jobs submitted with ``cancellable=False``
  (sending the volume) are never dropped by :meth:`Worker.cancel_all`, so engine and GUI agree on the volume.
* ``submit(..., tag="clicks", supersede=True)`` drops older pending jobs of the same tag: rapid clicks
  coalesce into one decode with the latest click list.

Nothing here imports torch, Slicer or Qt at module level.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback as _traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"


class Cancelled(Exception):
    """Raised inside a job that noticed ``job.cancel_requested``."""


class Job:
    """A unit of work for the worker thread. Read its fields on the GUI thread after :meth:`Worker.poll`."""

    _ids = itertools.count(1)

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, tag: Optional[str], pass_job: bool,
                 context: Any = None, cancellable: bool = True):
        self.id = next(Job._ids)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.tag = tag
        self.pass_job = pass_job
        #: Anything the GUI wants back with the result (e.g. the segment id the job was computed for).
        self.context = context
        #: False: :meth:`Worker.cancel_all` leaves this job alone (it still runs).
        self.cancellable = cancellable
        self.state = PENDING
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.traceback: str = ""
        self.submitted = time.perf_counter()
        self.started: Optional[float] = None
        self.finished: Optional[float] = None
        self._cancel = threading.Event()
        self._done = threading.Event()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    def cancel(self) -> None:
        """Ask the job to stop: a pending job never runs; a running one is told via ``cancel_requested``."""
        self._cancel.set()

    @property
    def finished_ok(self) -> bool:
        return self.state == DONE

    @property
    def wall_s(self) -> Optional[float]:
        return None if self.finished is None else self.finished - self.submitted

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.tag or getattr(self.fn, '__name__', '?')} {self.state}>"


class Worker:
    """A single daemon thread running submitted jobs in order."""

    def __init__(self, name: str = "SAM3DSegment-worker"):
        self.name = name
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._finished: "queue.Queue[Job]" = queue.Queue()
        self._pending: List[Job] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.current: Optional[Job] = None
        #: Called on the worker thread when a job starts running / has finished (the engine process sends them
        #: to the GUI from there: no extra thread hand-over per reply). With ``on_finish`` set, ``poll`` returns nothing.
        self.on_start: Optional[Callable[[Job], None]] = None
        self.on_finish: Optional[Callable[[Job], None]] = None

    # -------------------------------------------------------------------------- GUI-thread side
    def submit(self, fn: Callable, *args, tag: Optional[str] = None, supersede: bool = False,
               pass_job: bool = False, context: Any = None, cancellable: bool = True, **kwargs) -> Job:
        """Queue ``fn(*args, **kwargs)`` (``fn(job, *args, **kwargs)`` with ``pass_job``). Returns the Job."""
        if self._stopping:
            raise RuntimeError("the worker has been shut down")
        job = Job(fn, args, kwargs, tag, pass_job, context, cancellable)
        with self._lock:
            if supersede and tag is not None:
                for old in self._pending:
                    if old.tag == tag:
                        old.cancel()
            self._pending.append(job)
        self._ensure_thread()
        self._queue.put(job)
        return job

    def poll(self) -> List[Job]:
        """Jobs finished (done, failed or cancelled) since the last poll, in completion order."""
        out = []
        while True:
            try:
                out.append(self._finished.get_nowait())
            except queue.Empty:
                return out

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._pending) or self.current is not None

    def pending(self) -> List[Job]:
        with self._lock:
            return list(self._pending)

    def cancel_all(self) -> None:
        """Cancel every pending and running job except those submitted with ``cancellable=False``."""
        with self._lock:
            jobs = list(self._pending) + ([self.current] if self.current is not None else [])
        for job in jobs:
            if job.cancellable:
                job.cancel()

    def next_finished(self, timeout: Optional[float] = None) -> Optional[Job]:
        """Block (interpreter lock released) until a job finishes; None after ``timeout`` seconds."""
        try:
            return self._finished.get(timeout=timeout)
        except queue.Empty:
            return None

    def shutdown(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Cancel what is queued and stop the thread (after the running job finishes)."""
        self._stopping = True
        with self._lock:
            jobs = list(self._pending) + ([self.current] if self.current is not None else [])
        for job in jobs:
            job.cancel()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            if wait:
                self._thread.join(timeout)

    # -------------------------------------------------------------------------- worker-thread side
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
                if job.cancel_requested:
                    job.state = CANCELLED
                else:
                    job.state = RUNNING
                    self.current = job
            if job.state == RUNNING:
                job.started = time.perf_counter()
                if self.on_start is not None:
                    self.on_start(job)
                try:
                    result = job.fn(job, *job.args, **job.kwargs) if job.pass_job else job.fn(*job.args, **job.kwargs)
                    job.result = result
                    job.state = DONE  # it returned: whatever it changed is done (a late cancel changes nothing)
                except Cancelled:
                    job.state = CANCELLED
                except BaseException as exc:  # noqa: BLE001 - returned to the GUI thread, never raised here
                    job.error = exc
                    job.traceback = _traceback.format_exc()
                    job.state = FAILED
                finally:
                    with self._lock:
                        self.current = None
            job.finished = time.perf_counter()
            job._done.set()
            if self.on_finish is not None:
                self.on_finish(job)
            else:
                self._finished.put(job)


# ------------------------------------------------------------------------------------------- clicks
def plan_click_update(old: Sequence[Tuple[Sequence[float], bool]], new: Sequence[Tuple[Sequence[float], bool]],
                      atol: float = 1e-4):
    """How to bring a session from clicks ``old`` to ``new`` (lists of ``(ras, positive)``):
    ``("none",)``; ``("add", [clicks...])`` when ``new`` is ``old`` plus any number of clicks at the end
    (one decode per appended click, nothing replayed); else ``("set", new)`` (replay: a point was moved or
    removed, or a sign changed)."""
    def same(a, b):
        return bool(a[1]) == bool(b[1]) and np.allclose(np.asarray(a[0], float), np.asarray(b[0], float), atol=atol)

    prefix = len(old) <= len(new) and all(same(a, b) for a, b in zip(old, new))
    if prefix and len(new) == len(old):
        return ("none",)
    if prefix:
        return ("add", [tuple(c) for c in new[len(old):]])
    return ("set", list(new))


def describe_update(update, wall_s: Optional[float]) -> str:
    """One line for the per-click latency label."""
    t = getattr(update, "timings", {}) or {}
    total = f"{wall_s * 1000:.0f} ms" if wall_s is not None else "-"
    return (f"Last click: {total} (encode {t.get('encode_s', 0.0):.2f} s, decode {t.get('decode_s', 0.0):.2f} s, "
            f"{getattr(update, 'encoded_regions', 0)} new region(s))")


class Engine:
    """Model + session, used ONLY from the worker thread (every method is a job body).

    Objects are keyed by the caller's key (the Slicer segment id), mapped to session object ids.
    """

    def __init__(self, session_options=None):
        self.session_options = session_options
        self.session = None
        self.backend = None
        self.volume_key: Optional[str] = None
        self.volume_token: Any = None
        self._objects: Dict[str, str] = {}

    # ------------------------------------------------------------------ model
    def load(self, checkpoint: str, device: str = "cpu", dtype: str = "float32",
             progress: Optional[Callable[[int, Optional[int]], None]] = None) -> str:
        """Resolve (download if needed) and load a checkpoint on ``device``; returns the backend's name."""
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("torch is not installed: in 3D Slicer press 'Install dependencies' (it installs the "
                               "PyTorch extension's torch); elsewhere pip install torch") from exc
        from .backends import LocalBackend
        from ..models import load_checkpoint
        from ..weights import resolve_checkpoint

        path = resolve_checkpoint(checkpoint, progress=progress if progress is not None else "auto")
        model = load_checkpoint(str(path), map_location="cpu")
        return self.set_backend(LocalBackend(model, device=device, dtype=dtype))

    def set_backend(self, backend) -> str:
        from .session import Session, SessionOptions

        options = self.session_options or SessionOptions(region_size=int(getattr(backend, "image_size", 128)))
        self.backend = backend
        self.session = Session(backend, options)
        self.volume_key = self.volume_token = None
        self._objects = {}
        return str(getattr(backend, "name", type(backend).__name__))

    # ------------------------------------------------------------------ volume and objects
    def set_volume(self, volume, token: Any = None) -> str:
        """Use ``volume`` (forgets every object). ``token`` is the caller's name for this volume: clicks sent
        with another token are refused (see :meth:`sync_clicks`), so engine and GUI cannot disagree on it."""
        self._require_session()
        self.volume_key = self.volume_token = None   # a failed set leaves no volume, never the previous one
        self._objects = {}
        self.volume_key = self.session.set_volume(volume)
        self.volume_token = token
        return self.volume_key

    def forget_volume(self) -> None:
        """Drop the volume, every object and the embedding cache (memory); the model stays loaded."""
        if self.backend is not None:
            self.set_backend(self.backend)

    def _object(self, key: str) -> str:
        oid = self._objects.get(key)
        if oid is None or oid not in self.session.object_ids():
            oid = self.session.new_object(name=key)
            self._objects[key] = oid
        self.session.select_object(oid)
        return oid

    def forget_object(self, key: str) -> None:
        oid = self._objects.pop(key, None)
        if oid is not None and self.session is not None and oid in self.session.object_ids():
            self.session.remove_object(oid)

    def clicks(self, key: str) -> List[Tuple[Tuple[float, float, float], bool]]:
        self._require_session()
        return [(tuple(c.ras), bool(c.positive)) for c in self.session.clicks(self._object(key))]

    # ------------------------------------------------------------------ edits (job bodies)
    def sync_clicks(self, job: Optional[Job], key: str, clicks: Sequence[Tuple[Sequence[float], bool]],
                    volume_token: Any = None):
        """Bring object ``key`` to exactly ``clicks``; returns a MaskUpdate or None when nothing changed.
        Clicks appended after the current ones are decoded one by one (nothing replayed).

        ``volume_token`` (when given) must be the token of the last :meth:`set_volume`, else RuntimeError.
        If the job is cancelled while it runs, ``Cancelled`` is raised before the session stores anything."""
        from .session import Click

        self._require_volume()
        if volume_token is not None and volume_token != self.volume_token:
            raise RuntimeError("the engine holds another volume than the one clicked on; click again "
                               "(the volume is re-sent)")
        oid = self._object(key)
        old = [(c.ras, c.positive) for c in self.session.clicks(oid)]
        plan = plan_click_update(old, clicks)
        check = job.check_cancelled if job is not None else None
        if check is not None:
            check()
        if plan[0] == "none":
            return None
        as_clicks = [Click(ras=tuple(float(v) for v in r), positive=bool(p)) for r, p in plan[1]]
        if plan[0] == "add":
            return self.session.add_clicks(as_clicks, check=check)
        return self.session.set_clicks(as_clicks, check=check)

    def edit(self, kind: str, key: str):
        """``kind`` in undo / redo / reset. Returns ``(MaskUpdate or None, clicks after, changed)``;
        ``changed`` is False (and the update None) when there was nothing to undo/redo or no session yet."""
        if kind not in ("undo", "redo", "reset"):
            raise ValueError(f"unknown edit {kind!r}")
        if self.session is None or self.volume_key is None:
            return None, [], False
        oid = self._object(key)
        possible = {"undo": self.session.can_undo, "redo": self.session.can_redo}.get(kind, lambda o: True)(oid)
        update = getattr(self, kind)(key) if possible else None
        return update, self.clicks(key), bool(possible)

    def mask(self, key: str) -> np.ndarray:
        """The object's mask (uint8 [k, j, i], full volume grid)."""
        self._require_volume()
        return self.session.mask(self._object(key))

    def undo(self, key: str):
        self._require_volume()
        return self.session.undo(self._object(key))

    def redo(self, key: str):
        self._require_volume()
        return self.session.redo(self._object(key))

    def reset(self, key: str):
        self._require_volume()
        return self.session.reset(self._object(key))

    def _require_session(self) -> None:
        if self.session is None:
            raise RuntimeError("no model loaded: choose a model and press 'Load model'")

    def _require_volume(self) -> None:
        self._require_session()
        if self.volume_key is None:
            raise RuntimeError("no volume: select the CT volume to segment")


# ------------------------------------------------------------------------------------------- job API
#: What the GUI may ask of an engine (Engine method names); ``sync_clicks`` also gets its Job (cancellation).
OPS = ("load", "set_volume", "forget_volume", "sync_clicks", "edit", "clicks", "mask", "forget_object")


class ThreadEngine:
    """An :class:`Engine` on a :class:`Worker` thread of THIS process, behind the job API the module uses:
    ``submit(op, *args, ...) -> Job``, ``poll(wait)``, ``busy``, ``current``, ``cancel_all()``, ``call()``,
    ``shutdown()``. The child process runs one of these (``engine_process``); the Slicer module talks to it
    through :class:`~SAM3DSegmentLib.inference.engine_process.ProcessEngine`, which has the same API. Used directly, it
    is for scripts, tests and benchmarks: inside Slicer a worker thread starves (docs/slicer.md)."""

    def __init__(self, session_options=None, backend=None):
        self.engine = Engine(session_options)
        if backend is not None:
            self.engine.set_backend(backend)
        self.worker = Worker()
        #: (bytes done, total or None) while a checkpoint downloads, else None.
        self.download: Optional[Tuple[int, Optional[int]]] = None
        self.on_download: Optional[Callable[[int, Optional[int]], None]] = None

    def _progress(self, done: int, total: Optional[int]) -> None:  # worker thread
        self.download = (done, total)
        if self.on_download is not None:
            self.on_download(done, total)

    def submit(self, op: str, *args, tag: Optional[str] = None, supersede: bool = False, context: Any = None,
               cancellable: bool = True, **kwargs) -> Job:
        if op not in OPS:
            raise ValueError(f"unknown engine operation {op!r}; known: {', '.join(OPS)}")
        if op == "load":
            kwargs["progress"] = self._progress
            self.download = None
        return self.worker.submit(getattr(self.engine, op), *args, tag=tag, supersede=supersede,
                                  pass_job=(op == "sync_clicks"), context=context, cancellable=cancellable, **kwargs)

    def poll(self, wait: float = 0.0) -> List[Job]:
        """Finished jobs (completion order). With ``wait`` > 0 and work in flight, first wait up to ``wait``
        seconds for one, with the interpreter lock released."""
        first = self.worker.next_finished(wait) if wait > 0 and self.worker.busy else None
        jobs = ([first] if first is not None else []) + self.worker.poll()
        return [j for j in jobs if not getattr(j, "silent", False)]

    @property
    def busy(self) -> bool:
        return self.worker.busy

    @property
    def running(self) -> bool:
        """Always True: the engine lives in this process (the thread starts on demand)."""
        return True

    @property
    def current(self) -> Optional[Job]:
        return self.worker.current

    def cancel_all(self) -> None:
        self.worker.cancel_all()

    def call(self, op: str, *args, timeout: float = 600.0, **kwargs):
        """Run ``op`` and wait for its result (raises its error); ``poll`` never returns this job."""
        job = self.submit(op, *args, **kwargs)
        job.silent = True
        if not job.wait(timeout):
            raise TimeoutError(f"the engine did not answer {op!r} within {timeout:.0f} s")
        return _job_result(job)

    def shutdown(self, wait: bool = True) -> None:
        self.worker.shutdown(wait=wait)


def _job_result(job: Job):
    if job.state == DONE:
        return job.result
    if job.state == FAILED:
        raise job.error
    raise Cancelled()
