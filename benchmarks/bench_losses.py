"""Benchmark of the L1-ACE losses: time (forward + backward) and autograd-saved bytes per element.

For each size it compares, side by side and in one run:

- ``DiceCE``: MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)`` (the reference point of the budgets),
- ``loop hard`` / ``loop soft``: a straightforward per-(image, class) loop implementation of the same losses, written
  below with plain autograd (one-hot target, float32 scatter sums, autograd through everything),
- ``hard`` / ``soft``: :class:`acecal.losses.HardL1ACELoss` / :class:`acecal.losses.SoftL1ACELoss`,

all on logits ``(B, C, spatial)`` float32 with a label-map target ``(B, 1, spatial)`` and softmax inside the loss.
"saved B/elem" counts the unique storages autograd saves for the backward pass (softmax output included) divided
by ``B * C * voxels``. Time is the median of ``--repeats`` interleaved runs of ``loss(logits, labels).backward()``.
Budgets (benchmarks/RESULTS.md): saved B/elem hard <= 6, soft <= 8 at (2, 4, 64^3); CPU time hard <= 2x and soft
<= 3x DiceCE, both <= 0.7x the loop implementation.

Usage: ``python benchmarks/bench_losses.py [--threads 1] [--repeats 9] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from monai.losses import DiceCELoss
from monai.networks.utils import one_hot

from acecal.losses import HardL1ACELoss, SoftL1ACELoss
from acecal.losses.memory import saved_bytes_per_element

NUM_BINS = 20


# ----------------------------------------------------------------------------------------------------------------
# straightforward per-(image, class) loop implementations (the comparison point)
# ----------------------------------------------------------------------------------------------------------------


class _LoopL1ACELoss(torch.nn.Module):
    """Softmax, one-hot target, then a Python loop over (image, class): the subclasses compute one class's ACE."""

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        super().__init__()
        self.num_bins = num_bins

    def class_ace(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, 1)
        target = one_hot(labels, num_classes=logits.shape[1])
        bsz, nch = probs.shape[:2]
        per_class = []
        present = []
        for b in range(bsz):
            for c in range(nch):
                y = target[b, c].reshape(-1)
                per_class.append(self.class_ace(probs[b, c].reshape(-1), y))
                present.append(y.sum() > 0)
        ace = torch.stack(per_class)
        valid = torch.stack(present).to(ace.dtype)
        return (ace * valid).sum() / valid.sum().clamp(min=1)


class LoopHardL1ACELoss(_LoopL1ACELoss):
    """hL1-ACE the obvious way: bucketize + scatter sums per image and class."""

    def class_ace(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        edges = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, self.num_bins + 1, device=p.device)
        idx = torch.bucketize(p.detach(), edges[1:]).clamp(max=self.num_bins - 1)
        zeros = torch.zeros(self.num_bins, device=p.device, dtype=p.dtype)
        counts = zeros.scatter_add(0, idx, torch.ones_like(p))
        sum_p = zeros.scatter_add(0, idx, p)
        sum_y = zeros.scatter_add(0, idx, y)
        nonempty = counts > 0
        gap = (sum_p / counts.clamp(min=1) - sum_y / counts.clamp(min=1)).abs()
        return gap[nonempty].mean()


class LoopSoftL1ACELoss(_LoopL1ACELoss):
    """sL1-ACE the obvious way: triangular weights to the two neighbouring bins, scatter sums per image and class."""

    def __init__(self, num_bins: int = NUM_BINS, empty_weight: float = 0.01) -> None:
        super().__init__(num_bins)
        self.empty_weight = empty_weight

    def class_ace(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.num_bins
        t = p * m - 0.5  # position in units of bins, centres at integers
        left = t.detach().floor().clamp(0, max(m - 2, 0)).long()
        frac = (t - left).clamp(0.0, 1.0)
        w_left = 1.0 - frac
        w_right = frac
        right = (left + 1).clamp(max=m - 1)
        zeros = torch.zeros(m, device=p.device, dtype=p.dtype)
        weight = zeros.scatter_add(0, left, w_left).scatter_add(0, right, w_right)
        sum_p = zeros.scatter_add(0, left, w_left * p).scatter_add(0, right, w_right * p)
        sum_y = zeros.scatter_add(0, left, w_left * y).scatter_add(0, right, w_right * y)
        nonempty = (weight >= self.empty_weight) & (weight > 0)
        safe = torch.where(nonempty, weight, torch.ones_like(weight))
        return ((sum_p - sum_y).abs() / safe)[nonempty].mean()


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fns: dict, logits: torch.Tensor, labels: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward, runs of the candidates interleaved so machine noise hits all alike."""
    device = logits.device
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            x = logits.detach().clone().requires_grad_()
            _sync(device)
            t0 = time.perf_counter()
            fn(x, labels).backward()
            _sync(device)
            if rep > 0:  # first round is warm-up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def machine_line(device: torch.device) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or cpu
    line = f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"
    if device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per loss and size (median reported)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--sizes", default=None, help="semicolon-separated B,C,S list, e.g. '2,4,32;2,4,64'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")]
    else:
        sizes = [(2, 4, 32), (2, 4, 64), (2, 16, 64)]
        if device.type == "cuda":
            sizes += [(2, 16, 128), (8, 16, 128)]
    print(f"# bench_losses on {device}: {machine_line(device)}")
    print("# time = median fwd+bwd ms; B/el = autograd-saved bytes per (voxel x class), softmax output included")
    header = (
        f"{'B,C,S^3':>10} | {'DiceCE ms':>9} {'B/el':>5} | {'loop hard':>9} {'B/el':>5} | {'hard':>7} {'B/el':>5} "
        f"{'/DiceCE':>7} {'/loop':>6} | {'loop soft':>9} {'B/el':>5} | {'soft':>7} {'B/el':>5} "
        f"{'/DiceCE':>7} {'/loop':>6}"
    )
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for bsz, nch, side in sizes:
        logits = torch.randn(bsz, nch, side, side, side, generator=gen).to(device)
        labels = torch.randint(0, nch, (bsz, 1, side, side, side), generator=gen).to(device)
        fns = {
            "dicece": DiceCELoss(to_onehot_y=True, softmax=True),
            "loop_hard": LoopHardL1ACELoss(),
            "hard": HardL1ACELoss(to_onehot_y=True, softmax=True),
            "loop_soft": LoopSoftL1ACELoss(),
            "soft": SoftL1ACELoss(to_onehot_y=True, softmax=True),
        }
        # the loop implementations compute the same losses: check before timing
        with torch.no_grad():
            for fast, slow in (("hard", "loop_hard"), ("soft", "loop_soft")):
                a, b = float(fns[fast](logits, labels)), float(fns[slow](logits, labels))
                if abs(a - b) > 1e-3:  # the loop sums in float32
                    raise SystemExit(f"{fast} and {slow} disagree at {(bsz, nch, side)}: {a} vs {b}")
        mem = {k: saved_bytes_per_element(fn, logits, labels) for k, fn in fns.items()}
        repeats = args.repeats if side * side * side * nch * bsz <= 2 * 16 * 64**3 or device.type == "cuda" else 3
        t = time_fwd_bwd(fns, logits, labels, repeats)
        ms = {k: 1e3 * v for k, v in t.items()}
        print(
            f"{f'{bsz},{nch},{side}':>10} | {ms['dicece']:9.1f} {mem['dicece']:5.1f} | "
            f"{ms['loop_hard']:9.1f} {mem['loop_hard']:5.1f} | {ms['hard']:7.1f} {mem['hard']:5.2f} "
            f"{t['hard'] / t['dicece']:6.2f}x {t['hard'] / t['loop_hard']:5.2f}x | "
            f"{ms['loop_soft']:9.1f} {mem['loop_soft']:5.1f} | {ms['soft']:7.1f} {mem['soft']:5.2f} "
            f"{t['soft'] / t['dicece']:6.2f}x {t['soft'] / t['loop_soft']:5.2f}x",
            flush=True,
        )
        del logits, labels, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
