"""Two quick clicks after N clicks: incremental (any appended suffix) vs replaying the whole history.

Prints one JSON object. The GUI sends the full click list; when two clicks arrive before the engine is free
(they coalesce), the engine gets N+2 clicks against its N. ``plan_click_update`` now applies any appended
suffix incrementally (one decode per new click, ``Session.add_clicks``); before, only "+1" was incremental
and "+2" replayed every click (``Session.set_clicks``). Measured after ``--clicks`` N clicks on one object
(the bundled demo model by default, CPU): ``plus_1_s``, ``plus_2_s`` (through ``Engine.sync_clicks``) and
``plus_2_replay_s`` (``Session.set_clicks`` of the same N+2 clicks: the old path). Each is undone before the
next; each figure is the fastest of ``--repeats`` (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_gui_latency import click_list, phantom  # noqa: E402

from SAM3DSegmentLib.inference.session import Click  # noqa: E402
from SAM3DSegmentLib.inference.engine import Engine  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--clicks", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)

    vol = phantom()
    clicks = click_list(vol, args.clicks + 2)
    engine = Engine()
    engine.load(args.model, "cpu")
    engine.set_volume(vol, "v")
    t0 = time.perf_counter()
    for n in range(1, args.clicks + 1):
        engine.sync_clicks(None, "S", clicks[:n], "v")
    build_s = time.perf_counter() - t0
    timings = {"plus_1_s": [], "plus_2_s": [], "plus_2_replay_s": []}
    for _ in range(args.repeats):
        for name, k in (("plus_1_s", 1), ("plus_2_s", 2)):
            t = time.perf_counter()
            engine.sync_clicks(None, "S", clicks[:args.clicks + k], "v")
            timings[name].append(time.perf_counter() - t)
            engine.undo("S")
        t = time.perf_counter()
        engine.session.set_clicks([Click(ras=r, positive=p) for r, p in clicks[:args.clicks + 2]])
        timings["plus_2_replay_s"].append(time.perf_counter() - t)
        engine.undo("S")
    assert len(engine.clicks("S")) == args.clicks
    out = {name: round(min(v), 4) for name, v in timings.items()}
    out["replay_over_incremental"] = round(out["plus_2_replay_s"] / out["plus_2_s"], 1)
    print(json.dumps({"benchmark": "click_suffix", "model": str(engine.backend.name), "clicks_before": args.clicks,
                      "volume_shape": list(vol.array.shape), "regions": engine.session.region_count(),
                      "build_up_s": round(build_s, 2), "torch_threads": args.threads,
                      "python": platform.python_version(), "results": out}, indent=2))


if __name__ == "__main__":
    main()
