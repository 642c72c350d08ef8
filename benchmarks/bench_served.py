"""What each way of serving the shipped models costs: one inference, side by side in one run.

    .venv/bin/python benchmarks/bench_served.py                      # the hippocampus fixture and a 160^3 volume
    .venv/bin/python benchmarks/bench_served.py --repeats 9 --json out.json

Rows (the calibration study's served table, docs/calibration-study.md, is what they buy):

- ``hippocampus-baseline`` raw (``use_calibrator=False``) - the reference;
- ``hippocampus-baseline`` with its local-temperature calibrator (the default way it is served);
- ``hippocampus-baseline`` with flip TTA over the 3 axes (``tta="axis_flips"``, 4 passes) and all 8 flips;
- ``hippocampus-ace``: two heads on one trunk (its default).

Each row is ``run_inference`` as ``acecal infer`` and ``POST /infer`` run it (read, model space, sliding window,
calibrator, back to the input grid, uncertainty maps, flags and regions) with a warm network, on: a real held-out
hippocampus MRI crop (Testing/fixtures, 36 x 50 x 31 voxels) and a larger synthetic 1 mm volume (``--large``,
default 160^3: the same structure size in a bigger field of view). Median wall time of ``--repeats`` interleaved runs
(one warm-up round first), and the working memory of one inference: in a fresh child process per row and volume,
the peak resident set (``ru_maxrss``) minus the resident set once the network is loaded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))
FIXTURE = ROOT / "Testing" / "fixtures" / "hippocampus" / "images" / "hippocampus_011.nii.gz"

ROWS = [  # (label, model id, inference options)
    ("baseline, raw softmax", "hippocampus-baseline", {"use_calibrator": False}),
    ("baseline + local temperature (served)", "hippocampus-baseline", {}),
    ("baseline + flip TTA, 3 axes (4 passes)", "hippocampus-baseline", {"use_calibrator": False, "tta": "axis_flips"}),
    ("baseline + flip TTA, all 8 flips", "hippocampus-baseline", {"use_calibrator": False, "tta": "all_flips"}),
    ("hippocampus-ace, two heads (served)", "hippocampus-ace", {}),
]


def large_volume(path: Path, edge: int) -> None:
    """The fixture's intensities pasted in the middle of an ``edge``^3 1 mm volume of background noise."""
    import SimpleITK as sitk

    small = sitk.GetArrayFromImage(sitk.ReadImage(str(FIXTURE))).astype(np.float32)
    rng = np.random.default_rng(0)
    big = rng.normal(float(np.percentile(small, 5)), 1.0, (edge, edge, edge)).astype(np.float32)
    z, y, x = (min(s, edge) for s in small.shape)
    o = [(edge - s) // 2 for s in (z, y, x)]
    big[o[0] : o[0] + z, o[1] : o[1] + y, o[2] : o[2] + x] = small[:z, :y, :x]
    img = sitk.GetImageFromArray(big)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")) / 1024  # kB


def working_memory_mb(models: Path, model_id: str, opts: dict, path: Path, threads: int) -> float:
    """Peak RSS minus RSS after loading, of one inference in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([str(models), model_id, opts, str(path), threads])],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def child(spec: str) -> None:
    import torch

    from acecal.bundles import ModelRegistry
    from acecal.inference.pipeline import InferenceOptions, run_inference
    from acecal.inference.predictor import Predictor

    models, model_id, opts, path, threads = json.loads(spec)
    torch.set_num_threads(threads)
    predictor = Predictor(ModelRegistry([Path(models)]).get(model_id), "cpu")
    _ = (predictor.network, predictor.calibrator)  # loaded before the baseline is taken
    loaded = rss_mb()
    run_inference(predictor, path, InferenceOptions(**opts))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - loaded)  # Linux: ru_maxrss in KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--large", type=int, default=160, help="edge of the large volume (0: skip)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one row's memory, in its own process
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return

    import torch
    from bench_losses import machine_line  # the machine line of every benchmark here

    from acecal.bundles import ModelRegistry
    from acecal.inference.pipeline import InferenceOptions, run_inference
    from acecal.inference.predictor import Predictor

    torch.set_num_threads(args.threads)
    reg = ModelRegistry([args.models])
    predictors = {m: Predictor(reg.get(m), "cpu") for m in {m for _, m, _ in ROWS}}
    with tempfile.TemporaryDirectory() as tmp:
        volumes = {"hippocampus crop": FIXTURE}
        if args.large:
            volumes[f"{args.large}^3"] = Path(tmp) / "large.nii.gz"
            large_volume(volumes[f"{args.large}^3"], args.large)
        results: dict = {}
        for vol, path in volumes.items():
            times: dict[str, list[float]] = {label: [] for label, _, _ in ROWS}
            for rep in range(args.repeats + 1):  # interleaved, so load changes hit every row alike
                for label, model_id, opts in ROWS:
                    t0 = time.perf_counter()
                    run_inference(predictors[model_id], path, InferenceOptions(**opts))
                    if rep > 0:
                        times[label].append(time.perf_counter() - t0)
            memory = {label: working_memory_mb(args.models, m, o, path, args.threads) for label, m, o in ROWS}
            ref = statistics.median(times[ROWS[0][0]])
            results[vol] = {
                label: {
                    "median_ms": 1000 * statistics.median(t),
                    "vs_raw": statistics.median(t) / ref,
                    "working_memory_mb": memory[label],
                }
                for label, t in times.items()
            }
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_line(torch.device("cpu"))
    print(f"# bench_served {stamp}: {machine}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"# median of {args.repeats} interleaved runs of run_inference (warm); "
        "working memory of one run (fresh process)"
    )
    for vol, rows in results.items():
        print(f"\n{vol}")
        print(f"{'served as':44s} {'median ms':>10s} {'vs raw':>7s} {'memory MB':>10s}")
        for label, r in rows.items():
            print(f"{label:44s} {r['median_ms']:10.0f} {r['vs_raw']:6.2f}x {r['working_memory_mb']:10.0f}")
    if args.json:
        args.json.write_text(json.dumps({"date": stamp, "machine": machine, "results": results}))


if __name__ == "__main__":
    main()
