"""Remote inference on loopback: load test, bytes on the wire and click latency. Prints one JSON object.

Starts ``--servers`` ``sam3d serve`` processes (127.0.0.1 only, stopped at the end) and measures:

* ``load``: ``--clients`` concurrent clients (threads, each its own RemoteBackend over the list of all
  server URLs), each encoding ``--regions`` distinct 128^3 regions of the slicerio sample chest CT and
  sending ``--clicks`` clicks spread over them (a point + the previous low-res logits, as the engine
  does). Reports errors, p50/p95 latency of encode and of decode requests, requests per server, the
  servers' cache statistics and their resident memory (before the load and at its peak, sampled every
  0.1 s from /proc) against the configured cache size.
* ``session``: one Session on the chest CT per client mode (full / split with the ONNX decoder) and wire
  precision: bytes on the wire and latency of the first click (encode + decode) and of later clicks.

The model is the bundled demo model (``--model``; any name the servers can load). CPU servers here; on a
GPU box pass ``--device cuda`` (the servers then run one per ``--device`` as given). Timings are
wall-clock on a shared machine. ``--quick`` is the small version the tests run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from SAM3DSegmentLib.inference.regions import Region, model_input  # noqa: E402
from SAM3DSegmentLib.remote.client import RemoteBackend  # noqa: E402
from SAM3DSegmentLib.data.sample_data import chest_ct, chest_segments  # noqa: E402


def launch_server(args):
    cmd = [sys.executable, "-m", "SAM3DSegmentLib", "serve", "--host", "127.0.0.1", "--port", "0", "--model",
           args.model, "--device", args.device, "--cache-mb", str(args.cache_mb), "--rate", "0",
           "--max-queue", str(4 * args.clients), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_listening(proc, index: int):
    """(process, url) once the server printed its URL."""
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on " in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.rsplit("listening on ", 1)[1].strip()
    proc.kill()
    raise RuntimeError(f"server {index} did not start: {''.join(lines)}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class RssMonitor:
    """Samples each process's resident memory every ``period_s``; ``halves(pid)`` gives the peak of the
    first and of the second half of the run (a bounded server has the same peak in both)."""

    def __init__(self, pids: List[int], period_s: float = 0.1):
        self.pids, self.period_s = pids, period_s
        self.samples: Dict[int, List[float]] = {p: [] for p in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for p in self.pids:
                try:
                    self.samples[p].append(rss_mb(p))
                except OSError:
                    pass
            self._stop.wait(self.period_s)

    def peak(self, pid: int) -> float:
        return max(self.samples[pid], default=float("nan"))

    def halves(self, pid: int):
        x = self.samples[pid]
        h = len(x) // 2
        return (max(x[:h], default=float("nan")), max(x[h:], default=float("nan")))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def pct(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(values: List[float]) -> Dict[str, float]:
    return {"n": len(values), "p50_ms": 1000 * pct(values, 50), "p95_ms": 1000 * pct(values, 95),
            "max_ms": 1000 * max(values) if values else float("nan")}


def region_images(volume, n: int, seed: int) -> List[np.ndarray]:
    """``n`` distinct model inputs of the CT around random centres inside it."""
    rng = np.random.default_rng(seed)
    shape = np.asarray(volume.shape_ijk, dtype=float)
    out = []
    for _ in range(n):
        ijk = rng.uniform(0.2, 0.8, size=3) * (shape - 1)
        out.append(model_input(volume, Region.around(volume, volume.ijk_to_ras_points(ijk)), clamp_hu=(-1000, 1000)))
    return out


def client_load(urls, args, cid: int, volume, results: dict, lock: threading.Lock):
    enc, dec, errors = [], [], []
    rng = np.random.default_rng(1000 + cid)
    try:
        rb = RemoteBackend(urls, mode=args.mode, wire_dtype=args.wire_dtype, timeout_s=120)
    except Exception as err:  # noqa: BLE001 - counted and reported
        with lock:
            results["errors"].append(f"client {cid} connect: {err}")
        return
    images = region_images(volume, args.regions, seed=cid)
    per_region = [args.clicks // args.regions + (1 if r < args.clicks % args.regions else 0)
                  for r in range(args.regions)]
    s = rb.low_res_size
    for img, n_clicks in zip(images, per_region):
        try:
            t = time.perf_counter()
            handle = rb.encode(img)
            enc.append(time.perf_counter() - t)
            logits = np.zeros((s, s, s), np.float32)
            for c in range(n_clicks):
                pt = (64 + rng.uniform(-20, 20, size=(1, 3))).astype(np.float32)
                t = time.perf_counter()
                logits = rb.decode(handle, pt, np.array([1 if c % 4 != 3 else 0]), logits)
                dec.append(time.perf_counter() - t)
        except Exception as err:  # noqa: BLE001 - counted and reported
            errors.append(f"client {cid}: {type(err).__name__}: {err}")
    with lock:
        results["encode"] += enc
        results["decode"] += dec
        results["errors"] += errors
        results["wire"].append(rb.wire_stats())
    rb.close()


def run_load(urls, procs, args, volume) -> dict:
    results = {"encode": [], "decode": [], "errors": [], "wire": []}
    lock = threading.Lock()
    baseline = {p.pid: rss_mb(p.pid) for p in procs}
    t0 = time.perf_counter()
    with RssMonitor([p.pid for p in procs]) as mon:
        threads = [threading.Thread(target=client_load, args=(urls, args, c, volume, results, lock))
                   for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.time_limit_s)
    wall = time.perf_counter() - t0
    import httpx

    servers = []
    for p, url in zip(procs, urls):
        stats = httpx.get(url + "/v1/stats", timeout=10).json()
        first, second = mon.halves(p.pid)
        servers.append({"url": url, "rss_before_mb": baseline[p.pid], "rss_peak_mb": mon.peak(p.pid),
                        "rss_peak_first_half_mb": first, "rss_peak_second_half_mb": second,
                        "rss_growth_mb": mon.peak(p.pid) - baseline[p.pid],
                        "cache_limit_mb": args.cache_mb, "cache": stats["cache"], "counters": stats["counters"],
                        "encode_refused": stats["encode_gate"]["refused"]})
    return {"clients": args.clients, "clicks_per_client": args.clicks, "regions_per_client": args.regions,
            "mode": args.mode, "wire_dtype": args.wire_dtype, "wall_s": wall, "errors": len(results["errors"]),
            "error_samples": results["errors"][:5], "encode": summary(results["encode"]),
            "decode": summary(results["decode"]), "servers": servers,
            "bytes_sent": sum(w["bytes_sent"] for w in results["wire"]),
            "bytes_received": sum(w["bytes_received"] for w in results["wire"])}


def run_session(urls, mode: str, wire_dtype: str, volume, target, later: int) -> dict:
    from SAM3DSegmentLib.inference.session import Session, SessionOptions

    rb = RemoteBackend(urls[:1], mode=mode, wire_dtype=wire_dtype, timeout_s=120)
    s = Session(rb, SessionOptions(clamp_hu=(-1000, 1000), extend=False))
    s.set_volume(volume)
    s.new_object()
    # first click: the target voxel nearest its centroid; later clicks: target voxels within 40 mm of it,
    # so they stay inside the first 192 mm region (a click outside it would encode a new region)
    kji = np.argwhere(target > 0)
    ras = volume.ijk_to_ras_points(kji[:, ::-1].astype(float))
    first = int(np.argmin(np.linalg.norm(ras - ras.mean(axis=0), axis=1)))
    near = np.flatnonzero(np.linalg.norm(ras - ras[first], axis=1) < 40.0)
    rng = np.random.default_rng(7)
    picks = [first] + list(rng.choice(near, size=later, replace=False))
    rows = []
    for n, i in enumerate(picks):
        before = rb.wire_stats()
        t = time.perf_counter()
        update = s.add_click(ijk=tuple(float(v) for v in kji[i][::-1]), positive=True)
        dt = time.perf_counter() - t
        after = rb.wire_stats()
        rows.append({"s": dt, "sent": after["bytes_sent"] - before["bytes_sent"], "encoded": update.encoded_regions,
                     "received": after["bytes_received"] - before["bytes_received"]})
    first, rest = rows[0], rows[1:]
    out = {"mode": rb.mode, "wire_dtype": wire_dtype, "backend": rb.name,
           "first_click": {"latency_ms": 1000 * first["s"], "bytes_sent": first["sent"],
                           "bytes_received": first["received"]},
           "later_click": {"latency_p50_ms": 1000 * statistics.median(r["s"] for r in rest),
                           "latency_p95_ms": 1000 * pct([r["s"] for r in rest], 95),
                           "bytes_sent_mean": statistics.mean(r["sent"] for r in rest),
                           "bytes_received_mean": statistics.mean(r["received"] for r in rest), "n": len(rest),
                           "regions_encoded": sum(r["encoded"] for r in rest)}}
    rb.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--clicks", type=int, default=50)
    p.add_argument("--regions", type=int, default=10)
    p.add_argument("--mode", choices=("full", "split"), default="full", help="client mode of the load test")
    p.add_argument("--wire-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--cache-mb", type=float, default=4.0,
                   help="each server's embedding cache (MiB; default 4 = 20 demo-model embeddings, fewer than the "
                        "regions each server gets, so entries are evicted and clients resend)")
    p.add_argument("--later-clicks", type=int, default=10, help="later clicks in the session measurement")
    p.add_argument("--time-limit-s", type=float, default=600)
    p.add_argument("--quick", action="store_true", help="small version for tests: 3 clients x 6 clicks + 2 regions")
    p.add_argument("--no-session", action="store_true", help="skip the per-click session measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.clicks, args.regions, args.later_clicks = 3, 6, 2, 3
    volume = chest_ct()
    target = np.asarray(chest_segments()["right lung"].array)
    launched = [launch_server(args) for _ in range(args.servers)]   # start together, then wait for each
    try:
        started = [wait_listening(proc, i) for i, proc in enumerate(launched)]
    except RuntimeError:
        for proc in launched:
            proc.kill()
        raise
    procs, urls = [s[0] for s in started], [s[1] for s in started]
    try:
        report = {"machine": {"cpus": os.cpu_count(), "device": args.device, "servers": args.servers,
                              "torch_threads_per_server": args.threads, "model": args.model,
                              "load_average_1min_before": os.getloadavg()[0]}}
        report["load"] = run_load(urls, procs, args, volume)
        if not args.no_session:
            report["session"] = [run_session(urls, mode, wd, volume, target, args.later_clicks)
                                 for mode in ("full", "split") for wd in ("float16", "float32")]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
    report["machine"]["load_average_1min_after"] = os.getloadavg()[0]  # other jobs inflate the latencies
    print(json.dumps(report, indent=1))
    return 0 if report["load"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
