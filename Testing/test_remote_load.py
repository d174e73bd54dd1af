"""The load benchmark's small version (benchmarks/bench_remote.py --quick): two `sam3d serve` processes on
loopback, three concurrent clients failing over between them: no errors, both servers used, caches within
their byte budget, and the per-click wire figures the docs quote have the expected shape (split-mode later
clicks send nothing; full-mode later clicks carry only points and logits, not the region)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_remote.py"


def test_quick_load_benchmark_has_no_errors_and_bounded_caches():
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--cache-mb", "0.5"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout)
    load = report["load"]
    assert load["errors"] == 0, load["error_samples"]
    assert load["encode"]["n"] == 3 * 2 and load["decode"]["n"] == 3 * 6
    assert 0 < load["decode"]["p50_ms"] <= load["decode"]["p95_ms"] <= load["decode"]["max_ms"]
    servers = load["servers"]
    assert all(s["counters"]["encodes"] >= 1 for s in servers)          # the clients spread over both
    assert sum(s["counters"]["encodes"] for s in servers) >= 6
    for s in servers:
        assert s["cache"]["bytes"] <= s["cache"]["max_bytes"] == 512 * 1024
    sessions = {(x["mode"], x["wire_dtype"]): x for x in report["session"]}
    split16, full16, full32 = sessions["split", "float16"], sessions["full", "float16"], sessions["full", "float32"]
    assert all(x["later_click"]["regions_encoded"] == 0 for x in sessions.values())
    assert split16["later_click"]["bytes_sent_mean"] == 0 and split16["later_click"]["bytes_received_mean"] == 0
    assert full16["first_click"]["bytes_sent"] > 10 * full16["later_click"]["bytes_sent_mean"] > 0
    assert full32["first_click"]["bytes_sent"] > 1.8 * full16["first_click"]["bytes_sent"]
    assert full16["first_click"]["bytes_sent"] < 128 ** 3 * 2          # compressed below raw float16
