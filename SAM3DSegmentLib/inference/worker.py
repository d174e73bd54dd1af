"""One persistent worker thread for the model, and the engine on it (pure Python: threading + queue).

A :class:`Worker` runs submitted jobs in order on one daemon thread; :class:`ThreadEngine` puts the
:class:`~SAM3DSegmentLib.inference.engine.Engine` on it. The Slicer module runs this inside the engine's child
process (:mod:`~SAM3DSegmentLib.inference.engine_process`); scripts, tests and benchmarks use it in their own
process. The worker thread owns the model, the backend and the
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
from typing import Any, Callable, List, Optional, Tuple

from .engine import Engine

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


# ------------------------------------------------------------------------------------------- GUI text
def describe_update(update, wall_s: Optional[float]) -> str:
    """One line for the per-click latency label."""
    t = getattr(update, "timings", {}) or {}
    total = f"{wall_s * 1000:.0f} ms" if wall_s is not None else "-"
    return (f"Last click: {total} (encode {t.get('encode_s', 0.0):.2f} s, decode {t.get('decode_s', 0.0):.2f} s, "
            f"{getattr(update, 'encoded_regions', 0)} new region(s))")


# ------------------------------------------------------------------------------------------- job API
#: What the GUI may ask of an engine (Engine method names); ``sync_clicks`` also gets its Job (cancellation).
OPS = ("load", "load_remote", "check_servers", "set_volume", "forget_volume", "sync_clicks", "edit", "clicks", "mask",
       "forget_object", "set_initial_mask")
#: The ops that choose the model (a restarted engine process replays the last one).
LOAD_OPS = ("load", "load_remote")


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
