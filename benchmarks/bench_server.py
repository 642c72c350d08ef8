"""Server overhead: end-to-end ``POST /infer`` + downloads against the same inference in-process.

    .venv/bin/python benchmarks/bench_server.py                # small 64^3 and 256^3 volumes, 8 concurrent clients
    .venv/bin/python benchmarks/bench_server.py --bundle models/<id> --large 192 --json out.json

What is compared, for each volume (a synthetic bright sphere in noise, 1 mm voxels):

- in-process: ``run_inference(predictor, path)`` with a warm network: read + model space + sliding window + invert +
  uncertainty maps and regions, the four volumes as numpy arrays;
- end-to-end: ``ACEClient.infer(path)`` against ``acecal serve`` running in a separate process (warm): upload,
  validation, the same inference, NRRD writing, the JSON reply, downloading and decoding the four volumes.

Reported: median times, the ratio end-to-end / in-process and the fixed cost (difference) per volume; because on a
shared machine the compute itself varies from run to run, also ``added_by_server_ms``: per request, the end-to-end
time minus the compute stages the server timed inside that same request (upload, saving, NRRD writing, HTTP, download
and decoding remain), and the ratio that gives at equal compute. With
``--clients`` threads each sending ``--requests`` small volumes at once, throughput and p50/p95 latency.
The in-process runs use one worker thread, as the server's device queue does, and both processes the same number of
torch threads, so the comparison isolates what the server adds.

Without ``--bundle`` a SegResNet with random weights is used (init_filters 8, 2 mm model spacing, ROI 64^3): the
weights do not change the cost, and a small network makes the server's share look *larger* than with a production
model, so the ratio is conservative. ``--threads`` sets torch's CPU threads in both processes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(models_dir: Path):
    import torch

    from acecal.bundles import BundleConfig, NetworkConfig, build_network, write_bundle

    torch.manual_seed(0)
    cfg = BundleConfig(
        id="bench-random",
        description="random weights, for timing only",
        labels={"0": "background", "1": "sphere"},
        network=NetworkConfig(
            name="SegResNet", args={"init_filters": 8, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]}
        ),
        spacing=(2.0, 2.0, 2.0),
        roi_size=(64, 64, 64),
        sw_batch_size=1,
        sw_overlap=0.25,
    )
    return write_bundle(models_dir, cfg, build_network(cfg).state_dict(), "# bench-random\n", overwrite=True)


def make_volume(n: int, path: Path, seed: int = 0) -> Path:
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:n, :n, :n]
    c = (n - 1) / 2
    sphere = ((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2) <= (n / 5) ** 2
    img = (sphere.astype(np.float32) + rng.normal(0, 0.15, (n, n, n)).astype(np.float32)) * 20
    im = sitk.GetImageFromArray(img)
    im.SetOrigin((-n / 2, -n / 2, -n / 2))
    sitk.WriteImage(im, str(path))  # uncompressed NRRD: what Slicer sends
    return path


def start_server(models_dir: Path, data_dir: Path, threads: int, queue: int):
    port = free_port()
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        ACECAL_QUEUE_SIZE=str(queue),
        PYTHONPATH=str(ROOT / "server") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        "-m",
        "acecal.cli.main",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--models",
        str(models_dir),
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    from acecal.client import ACEClient, ServerUnreachableError

    c = ACEClient(url, retries=0, timeout=(1, 5))
    for _ in range(600):
        try:
            c.health()
            return proc, url
        except ServerUnreachableError:
            if proc.poll() is not None:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not answer in time")


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="a model bundle folder (default: random-weight SegResNet)")
    ap.add_argument("--small", type=int, default=64, help="edge of the small volume (voxels)")
    ap.add_argument("--large", type=int, default=256, help="edge of the large volume (0: skip)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per mode for the small volume")
    ap.add_argument("--large-repeats", type=int, default=2, help="timed runs per mode for the large volume")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per concurrent client")
    ap.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "0")) or 1,
        help="torch CPU threads, in both processes (default 1: stable figures on a shared machine)",
    )
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, as in the server process

    import torch

    torch.set_num_threads(args.threads)
    from acecal.bundles import Bundle
    from acecal.client import ACEClient
    from acecal.inference.pipeline import run_inference
    from acecal.inference.predictor import Predictor

    work = Path(tempfile.mkdtemp(prefix="acecal-bench-"))
    if args.bundle:
        bundle = Bundle.load(args.bundle)
        models_dir = bundle.path.parent
    else:
        models_dir = work / "models"
        bundle = make_bundle(models_dir)
    predictor = Predictor(bundle, "cpu")
    proc, url = start_server(models_dir, work / "data", args.threads, queue=max(16, args.clients * 2))
    client = ACEClient(url, timeout=(5, 3600))
    results: dict = {
        "date": _dt.datetime.now().isoformat(timespec="minutes"),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "bundle": bundle.id,
        "network": bundle.config.network.model_dump(),
        "model_spacing": list(bundle.config.spacing),
        "roi_size": list(bundle.config.roi_size),
        "volumes": {},
    }
    try:
        sizes = [("small", args.small, args.repeats)] + (
            [("large", args.large, args.large_repeats)] if args.large else []
        )
        for label, n, reps in sizes:
            path = make_volume(n, work / f"{label}.nrrd")
            # in-process runs on one worker thread, like the server's device worker: same torch threading
            worker = cf.ThreadPoolExecutor(1)

            def local(worker=worker, path=path):
                return worker.submit(run_inference, predictor, path).result()

            local()  # warm: network loaded, allocator primed
            client.infer(path, bundle.id)  # warm the server the same way
            server_timings = []

            def remote(path=path, server_timings=server_timings):
                res = client.infer(path, bundle.id)
                server_timings.append(res.raw["timings"])

            # interleave so both modes see the same background load
            t_in, t_e2e = [], []
            for _ in range(reps):
                t_in += timed(local, 1)
                t_e2e += timed(remote, 1)
            med_in, med_e2e = statistics.median(t_in), statistics.median(t_e2e)
            srv_total = statistics.median(t["total_s"] for t in server_timings)
            # what the server adds, measured inside each request (robust to load changes between runs): the
            # end-to-end time minus the compute stages the in-process path also runs
            compute = ("read_s", "preprocess_s", "inference_s", "invert_s", "analyse_s")
            added = [e - sum(t.get(k, 0.0) for k in compute) for e, t in zip(t_e2e, server_timings, strict=True)]
            med_added = statistics.median(added)
            results["volumes"][label] = {
                "shape": [n, n, n],
                "upload_mb": round(path.stat().st_size / 2**20, 1),
                "repeats": reps,
                "in_process_s": round(med_in, 4),
                "end_to_end_s": round(med_e2e, 4),
                "ratio": round(med_e2e / med_in, 3),
                "fixed_cost_ms": round((med_e2e - med_in) * 1000, 1),
                "server_handler_s": round(srv_total, 4),
                "added_by_server_ms": round(med_added * 1000, 1),
                "ratio_same_compute": round((med_in + med_added) / med_in, 3),
                "load_average": [round(v, 2) for v in os.getloadavg()],
                "server_stages_s": {
                    k: round(statistics.median(t.get(k, 0.0) for t in server_timings), 4) for k in server_timings[0]
                },
                "all_in_process_s": [round(v, 4) for v in t_in],
                "all_end_to_end_s": [round(v, 4) for v in t_e2e],
            }
            worker.shutdown()
            print(json.dumps({label: results["volumes"][label]}, indent=1), flush=True)

        # throughput and latency with concurrent clients (small volume)
        path = work / "small.nrrd"
        lat: list[float] = []

        def one_client(_):
            mine = []
            with ACEClient(url, timeout=(5, 3600)) as c:
                for _ in range(args.requests):
                    t = time.perf_counter()
                    c.infer(path, bundle.id)
                    mine.append(time.perf_counter() - t)
            return mine

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as ex:
            for mine in ex.map(one_client, range(args.clients)):
                lat += mine
        wall = time.perf_counter() - t0
        seq = statistics.median(results["volumes"]["small"]["all_in_process_s"])
        results["concurrent"] = {
            "clients": args.clients,
            "requests": len(lat),
            "wall_s": round(wall, 3),
            "throughput_rps": round(len(lat) / wall, 3),
            "in_process_sequential_rps": round(1 / seq, 3),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p95_s": round(float(np.percentile(lat, 95)), 3),
            "latency_max_s": round(max(lat), 3),
        }
        print(json.dumps({"concurrent": results["concurrent"]}, indent=1), flush=True)
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
