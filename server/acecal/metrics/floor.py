"""The noise floor of hard-binned calibration errors: the expected ECE / ACE / MCE of a perfectly calibrated model.

Draw every voxel's label from the model's own probabilities p: that model is perfectly calibrated by construction, yet
its calibration error is not 0, because each bin holds finitely many voxels. The **floor** is the expected error of
such draws, with exactly the binning of :mod:`acecal.metrics.calibration` (M equal-width bins on the float32 value of
p, an edge value going to the lower bin), per image and per class, macro and micro as
:class:`acecal.metrics.CalibrationAccumulator` computes them. ``ACE - floor`` is what better calibration can remove.

Per (image, class c, bin m) with n voxels whose class-c probabilities are p_1..p_n: bin membership depends on p only,
so it is the same for every draw; the drawn number of class-c voxels S = sum_i y_i, y_i ~ Bernoulli(p_i) independent
(the class-c marginal of a voxel-wise categorical draw), is Poisson-binomial, and the bin's gap is |S/n - mean p|:

* E[ACE] = mean over occupied bins of E|S_m/n_m - mean p_m|     (the occupied bins are fixed)
* E[ECE] = sum_m n_m E|S_m/n_m - mean p_m| / N
* E[MCE] = E max_m |S_m/n_m - mean p_m|: the bins hold disjoint voxels, so their gaps are independent and
  P(max <= t) = prod_m P(gap_m <= t); computed exactly over the gaps' atoms (:func:`expected_max`).

The law of S (:class:`PositivesLaw`) is exact for n <= :data:`EXACT_MAX_VOXELS` (the coefficients of
prod_i (1 - p_i + p_i x), multiplied pairwise with batched FFTs, O(n log^2 n)); beyond, it is the normal law
N(sum p, sum p(1 - p)) put on the integers (continuity correction), whose error in E|S - sum p| stays below 0.1 voxel
(Testing/metrics/test_floor.py checks it against the exact law), i.e. below 0.1 / 65536 = 1.5e-6 in a bin's expected
gap. A law is kept on the window mean +- (12 sd + 50), outside of which Bernstein's inequality leaves a mass below
1e-30, and renormalised there.

**Macro** floor: per image, the mean over the classes present in the image's *true* label map (the classes that enter
its macro ACE; a draw misses a present class only with probability prod_i (1 - p_i), negligible for a structure of
more than a few voxels), then the mean over images. **Micro** floor: the pooled bins of all images; a pooled S is the
sum of the images' independent S, so its law is the convolution of theirs (exact while it fits in
:data:`EXACT_MAX_VOXELS` values, the normal law of the summed moments beyond); the mean over classes present in at
least one image. Memory: per image, three numbers per class; pooled, one law (a window of about 24 sd + 100 values)
per (class, bin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.special import ndtr

from acecal.binning import DEFAULT_NUM_BINS, bin_index
from acecal.errors import InvalidInputError
from acecal.metrics.accumulator import evaluated_class_names
from acecal.metrics.calibration import validate_probabilities

__all__ = [
    "EXACT_MAX_VOXELS",
    "FloorAccumulator",
    "PositivesLaw",
    "expected_errors",
    "expected_max",
    "floor_errors",
    "positives_law",
]

#: Bins with at most this many voxels get the exact Poisson-binomial law; larger ones the normal approximation.
EXACT_MAX_VOXELS = 1 << 16
#: Half-width of a law's window, in standard deviations plus a constant (mass outside < 1e-30).
_WINDOW_SD, _WINDOW_PAD = 12.0, 50.0
#: Coefficient polynomials shorter than this are multiplied directly, longer ones through the FFT.
_DIRECT_CONV = 32


@dataclass
class PositivesLaw:
    """The law of S, the number of drawn positives among ``n`` voxels: ``P(S = values[j]) = pmf[j]``.

    ``values`` is an increasing float64 grid of integers (step 1 for exact laws; a coarser step only for normal laws
    wider than :data:`EXACT_MAX_VOXELS` values), ``pmf`` sums to 1; ``mean`` = sum p and ``var`` = sum p (1 - p).
    """

    n: int
    mean: float
    var: float
    values: np.ndarray
    pmf: np.ndarray
    exact: bool

    def expected_gap(self) -> float:
        """E|S/n - mean/n|, the bin's expected calibration gap."""
        return float(np.abs(self.values - self.mean) @ self.pmf) / self.n if self.n else 0.0

    def gap_atoms(self) -> Tuple[np.ndarray, np.ndarray]:
        """(values, masses) of the gap |S/n - mean/n|."""
        return np.abs(self.values - self.mean) / max(self.n, 1), self.pmf


def _window(n: int, mean: float, var: float) -> Tuple[int, int]:
    half = _WINDOW_SD * math.sqrt(max(var, 0.0)) + _WINDOW_PAD
    return max(0, int(math.floor(mean - half))), min(n, int(math.ceil(mean + half)))


def _convolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full linear convolution of the rows of ``a`` and ``b`` (k, la) x (k, lb) -> (k, la + lb - 1)."""
    la, lb = a.shape[-1], b.shape[-1]
    out_len = la + lb - 1
    if min(la, lb) <= _DIRECT_CONV:
        if la < lb:
            a, b, la, lb = b, a, lb, la
        res = np.zeros(a.shape[:-1] + (out_len,))
        for j in range(lb):
            res[..., j : j + la] += b[..., j : j + 1] * a
        return res
    nfft = 1 << (out_len - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(a, nfft) * np.fft.rfft(b, nfft), nfft)[..., :out_len]


def _poly_product(p: np.ndarray, max_degree: int) -> np.ndarray:
    """Coefficients 0..max_degree of prod_i (1 - p_i + p_i x): the exact Poisson-binomial pmf on 0..max_degree.

    Multiplied pairwise (a balanced tree, each level one batched convolution); coefficients above ``max_degree``
    never feed lower ones, so every product is cut there.
    """
    polys = np.stack([1.0 - p, p], axis=1)  # (k, d + 1): k polynomials of degree d
    while polys.shape[0] > 1:
        if polys.shape[0] % 2:  # pad with the polynomial 1
            one = np.zeros((1, polys.shape[1]))
            one[0, 0] = 1.0
            polys = np.concatenate([polys, one])
        polys = _convolve(polys[0::2], polys[1::2])[:, : max_degree + 1]
    return polys[0][: max_degree + 1]


def _normal_law(n: int, mean: float, var: float) -> PositivesLaw:
    """N(mean, var) on the integers 0..n (continuity correction), on the window, a coarser grid when it is wide."""
    lo, hi = _window(n, mean, var)
    sd = math.sqrt(max(var, 0.0))
    if sd == 0.0:
        k = float(min(max(round(mean), 0), n))
        return PositivesLaw(n, mean, var, np.array([k]), np.ones(1), exact=False)
    step = max(1, math.ceil((hi - lo + 1) / EXACT_MAX_VOXELS))
    values = np.arange(lo, hi + 1, step, dtype=np.float64)
    upper = ndtr((values + step / 2 - mean) / sd)
    lower = ndtr((values - step / 2 - mean) / sd)
    upper[-1], lower[0] = 1.0, 0.0  # the window's end cells take the tails
    pmf = np.clip(upper - lower, 0.0, None)
    return PositivesLaw(n, mean, var, values, pmf / pmf.sum(), exact=False)


def positives_law(p: Union[np.ndarray, Sequence[float]], *, exact_max_voxels: int = EXACT_MAX_VOXELS) -> PositivesLaw:
    """The law of S = sum_i y_i with independent y_i ~ Bernoulli(p_i).

    Args:
        p: (n,) probabilities (clipped to [0, 1]).
        exact_max_voxels: the largest n given the exact law (tests raise it to measure the normal law's error).

    Returns:
        the exact law for n <= :data:`EXACT_MAX_VOXELS`, the normal approximation beyond (module docstring).
    """
    p = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), 0.0, 1.0)
    n = int(p.size)
    mean, var = float(p.sum()), float((p * (1.0 - p)).sum())
    if n == 0:
        return PositivesLaw(0, 0.0, 0.0, np.zeros(1), np.ones(1), exact=True)
    if n > exact_max_voxels:
        return _normal_law(n, mean, var)
    lo, hi = _window(n, mean, var)
    if mean <= n / 2:
        pmf = _poly_product(p, hi)[lo:]
    else:  # S = n - S' with S' the count of 1 - p: the product is then cut at a low degree too
        pmf = _poly_product(1.0 - p, n - lo)[n - hi :][::-1]
    pmf = np.clip(pmf, 0.0, None)
    return PositivesLaw(n, mean, var, np.arange(lo, hi + 1, dtype=np.float64), pmf / pmf.sum(), exact=True)


def _add_laws(a: PositivesLaw, b: PositivesLaw) -> PositivesLaw:
    """The law of the sum of two independent counts (the pooled bin of two images)."""
    n, mean, var = a.n + b.n, a.mean + b.mean, a.var + b.var
    lo, hi = _window(n, mean, var)
    if not (a.exact and b.exact) or hi - lo + 1 > EXACT_MAX_VOXELS:
        return _normal_law(n, mean, var)
    pmf = np.clip(_convolve(a.pmf[None], b.pmf[None])[0], 0.0, None)
    start = int(a.values[0] + b.values[0])
    pmf = pmf[max(lo - start, 0) : hi - start + 1]
    first = max(lo, start)
    return PositivesLaw(n, mean, var, np.arange(first, first + pmf.size, dtype=np.float64), pmf / pmf.sum(), exact=True)


def expected_max(atom_sets: Sequence[Tuple[np.ndarray, np.ndarray]]) -> float:
    """E[max_m X_m] of independent discrete X_m >= 0, each given as (values, masses) with masses summing to 1.

    Sweeps the atoms of all X_m in increasing order, keeping P(max <= v) = prod_m F_m(v) (in logs, with a count of
    the factors still 0): E max = sum over atoms of v * (P after the atom - P before it).
    """
    sets = [(np.asarray(v, np.float64), np.asarray(m, np.float64)) for v, m in atom_sets]
    sets = [(v[m > 0], m[m > 0]) for v, m in sets]
    sets = [s for s in sets if s[0].size]
    if not sets:
        return float("nan")
    vals = np.concatenate([v for v, _ in sets])
    mass = np.concatenate([m for _, m in sets])
    which = np.concatenate([np.full(v.size, i) for i, (v, _) in enumerate(sets)])
    order = np.argsort(vals, kind="stable")
    vals, mass, which = vals[order], mass[order], which[order]
    # cumulative mass of each variable up to and including each atom, in the global order
    by_var = np.argsort(which, kind="stable")
    cum = np.cumsum(mass[by_var])
    starts = np.searchsorted(which[by_var], np.arange(len(sets)))
    group_base = np.concatenate([[0.0], cum])[starts][which[by_var]]
    f_new = np.empty_like(cum)
    f_new[by_var] = cum - group_base
    first = np.zeros(vals.size, bool)
    first[by_var[starts]] = True
    # log F_new - log F_old, stable when F_old is close to F_new
    with np.errstate(divide="ignore"):
        step = np.where(
            first,
            np.log(np.maximum(f_new, 1e-320)),
            -np.log1p(-np.minimum(mass / np.maximum(f_new, 1e-320), 1.0 - 1e-16)),
        )
    zeros_left = len(sets) - np.cumsum(first)
    prob = np.where(zeros_left == 0, np.exp(np.minimum(np.cumsum(step), 0.0)), 0.0)
    return float(np.sum(vals * np.diff(np.concatenate([[0.0], prob]))))


def expected_errors(laws: Sequence[PositivesLaw]) -> Dict[str, float]:
    """E[ECE], E[ACE], E[MCE] of one (image, class) from the laws of its occupied bins (NaN when there are none)."""
    laws = [law for law in laws if law.n > 0]
    if not laws:
        return {"ece": float("nan"), "ace": float("nan"), "mce": float("nan")}
    gaps = np.array([law.expected_gap() for law in laws])
    counts = np.array([law.n for law in laws], dtype=np.float64)
    return {
        "ece": float((gaps * counts).sum() / counts.sum()),
        "ace": float(gaps.mean()),
        "mce": expected_max([law.gap_atoms() for law in laws]),
    }


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _class_laws(p: np.ndarray, num_bins: int) -> List[Optional[PositivesLaw]]:
    """Laws of the M bins of one class (None for an empty bin). ``p``: (N,) float32 probabilities of the class."""
    idx = bin_index(torch.from_numpy(p), num_bins).numpy()  # exactly as the metric bins p
    counts = np.bincount(idx, minlength=num_bins)
    laws: List[Optional[PositivesLaw]] = [None] * num_bins
    big = counts > EXACT_MAX_VOXELS
    if big.any():  # normal laws need only the moments
        p64 = np.clip(p.astype(np.float64), 0.0, 1.0)
        s1 = np.bincount(idx, weights=p64, minlength=num_bins)
        s2 = np.bincount(idx, weights=p64 * (1.0 - p64), minlength=num_bins)
        for m in np.flatnonzero(big):
            laws[m] = _normal_law(int(counts[m]), float(s1[m]), float(s2[m]))
    small = (counts > 0) & ~big
    if small.any():  # the voxels of the small bins, grouped by bin
        keep = small[idx]
        sel_p, sel_idx = p[keep], idx[keep]
        order = np.argsort(sel_idx, kind="stable")
        sel_p, sel_idx = sel_p[order], sel_idx[order]
        bounds = np.searchsorted(sel_idx, np.arange(num_bins + 1))
        for m in np.flatnonzero(small):
            laws[m] = positives_law(sel_p[bounds[m] : bounds[m + 1]])
    return laws


def floor_errors(
    probs: Union[np.ndarray, torch.Tensor], num_bins: int = DEFAULT_NUM_BINS, include_background: bool = False
) -> Dict[str, np.ndarray]:
    """The expected ECE / ACE / MCE of one image under labels drawn from ``probs``, per class.

    Args:
        probs: (C, spatial...) probabilities of one image.

    Returns:
        ``{"ece", "ace", "mce"}``, each (C,) float64 (C - 1 without the background).
    """
    acc = FloorAccumulator(_to_numpy(probs).shape[0], num_bins, include_background)
    per_class = acc._image(probs)[0]
    return {k: np.array([e[k] for e in per_class]) for k in ("ece", "ace", "mce")}


class FloorAccumulator:
    """Stream images in; :meth:`aggregate` gives the macro and micro floor (module docstring).

    Args:
        num_classes: C, probability channels (background included).
        num_bins: M, as the metric (20).
        include_background: evaluate channel 0 too (default False, as :class:`acecal.metrics.CalibrationAccumulator`).
        class_names: names of all C channels or of the evaluated ones.

    Example::

        floor = FloorAccumulator(3, class_names=["background", "anterior", "posterior"])
        for case_id, probs, labels in cases:          # probs (C, z, y, x), labels (z, y, x)
            floor.update(probs, labels, case_id)
        floor.aggregate()["macro"]["ace"]
    """

    def __init__(
        self,
        num_classes: int,
        num_bins: int = DEFAULT_NUM_BINS,
        include_background: bool = False,
        class_names: Optional[Sequence[str]] = None,
    ) -> None:
        names = evaluated_class_names(num_classes, num_bins, include_background, class_names)
        self.num_classes, self.num_bins = num_classes, num_bins
        self.first_channel = 0 if include_background else 1
        self.num_eval = num_classes - self.first_channel
        self.class_names: List[str] = names
        self._cases: Dict[str, Tuple[List[Dict[str, float]], np.ndarray]] = {}
        self._pooled: List[List[Optional[PositivesLaw]]] = [[None] * num_bins for _ in range(self.num_eval)]

    def __len__(self) -> int:
        return len(self._cases)

    def _image(self, probs: Any) -> Tuple[List[Dict[str, float]], List[List[Optional[PositivesLaw]]]]:
        p = _to_numpy(probs)
        if p.ndim < 2 or p.shape[0] != self.num_classes:
            raise InvalidInputError(f"probs must have shape ({self.num_classes}, spatial...), got {tuple(p.shape)}")
        validate_probabilities(torch.from_numpy(np.ascontiguousarray(p))[None], min_ndim=3)
        p32 = p.reshape(self.num_classes, -1).astype(np.float32, copy=False)
        errors, laws = [], []
        for c in range(self.first_channel, self.num_classes):
            class_laws = _class_laws(np.ascontiguousarray(p32[c]), self.num_bins)
            errors.append(expected_errors([law for law in class_laws if law is not None]))
            laws.append(class_laws)
        return errors, laws

    def update(
        self, probs: Union[np.ndarray, torch.Tensor], labels: Union[np.ndarray, torch.Tensor], case_id: str
    ) -> None:
        """Add one image.

        Args:
            probs: (C, spatial...) probabilities (float32 is binned as the metric bins it).
            labels: the true label map, (spatial...) or (1, spatial...): only which classes are present is used.
            case_id: a new id (an image cannot arrive in pieces: its bins' laws need all its voxels).
        """
        case_id = str(case_id)
        if case_id in self._cases:
            raise InvalidInputError(f"case {case_id!r} was already added")
        lab = _to_numpy(labels).reshape(-1)
        if lab.size * self.num_classes != _to_numpy(probs).size:
            raise InvalidInputError("labels must have the spatial shape of probs")
        present_all = np.bincount(lab.astype(np.int64).clip(0, self.num_classes - 1), minlength=self.num_classes) > 0
        errors, laws = self._image(probs)
        self._cases[case_id] = (errors, present_all[self.first_channel :])
        for c, class_laws in enumerate(laws):
            for m, law in enumerate(class_laws):
                if law is not None:
                    pooled = self._pooled[c][m]
                    self._pooled[c][m] = law if pooled is None else _add_laws(pooled, law)

    def aggregate(self) -> Dict[str, Any]:
        """The floor: ``macro`` / ``micro`` {ece, ace, mce}, ``per_class`` rows, ``per_case`` rows (NaN if undefined).

        ``per_class``: {name: {"macro_<m>", "micro_<m>", "cases_present"}}; ``per_case``: {case_id: {"ece", "ace",
        "mce"} (mean over present classes), "classes": {name: {"present", "ece", "ace", "mce"}}}.
        """
        keys = ("ece", "ace", "mce")
        nan = float("nan")
        case_rows: Dict[str, Dict[str, Any]] = {}
        class_vals: Dict[str, List[List[float]]] = {k: [[] for _ in range(self.num_eval)] for k in keys}
        for cid, (errors, present) in self._cases.items():
            row: Dict[str, Any] = {}
            for k in keys:
                vals = [errors[c][k] for c in range(self.num_eval) if present[c] and math.isfinite(errors[c][k])]
                row[k] = float(np.mean(vals)) if vals else nan
                for c in range(self.num_eval):
                    if present[c] and math.isfinite(errors[c][k]):
                        class_vals[k][c].append(errors[c][k])
            row["classes"] = {
                n: {"present": bool(present[c]), **{k: errors[c][k] for k in keys}}
                for c, n in enumerate(self.class_names)
            }
            case_rows[cid] = row
        macro = {}
        for k in keys:
            vals = [r[k] for r in case_rows.values() if math.isfinite(r[k])]
            macro[k] = float(np.mean(vals)) if vals else nan
        seen = np.zeros(self.num_eval, bool)
        for _, present in self._cases.values():
            seen |= present
        micro_class = [
            expected_errors([law for law in self._pooled[c] if law is not None]) for c in range(self.num_eval)
        ]
        micro = {}
        for k in keys:
            vals = [micro_class[c][k] for c in range(self.num_eval) if seen[c] and math.isfinite(micro_class[c][k])]
            micro[k] = float(np.mean(vals)) if vals else nan
        per_class = {}
        for c, name in enumerate(self.class_names):
            per_class[name] = {
                "cases_present": len(class_vals["ace"][c]),
                **{f"macro_{k}": float(np.mean(class_vals[k][c])) if class_vals[k][c] else nan for k in keys},
                **{f"micro_{k}": micro_class[c][k] for k in keys},
            }
        return {
            "macro": macro,
            "micro": micro,
            "per_class": per_class,
            "per_case": case_rows,
            "num_cases": len(self._cases),
            "num_bins": self.num_bins,
        }
