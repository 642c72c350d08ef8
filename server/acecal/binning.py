"""Calibration binning, written once: the bin rule, the hard per-bin sums and the soft (triangular) kernel.

Used by both :mod:`acecal.losses` (which wraps the sums in autograd functions) and :mod:`acecal.metrics` (which
reduces them to ECE / ACE / MCE). Everything works per image and per class channel ("marginal" calibration) on a
probability tensor of shape ``(B, C, N)`` (spatial axes flattened) and returns float64 ``(B, C, M)`` sums.

**Hard bins** are MONAI's (:func:`monai.metrics.calibration_binning`): float32 edges
``e = linspace(0, 1 + eps32, M + 1)``, bin ``bucketize(float32(p), e[1:], right).clamp(max=M - 1)``. So bin ``m``
holds ``m/M < p <= (m+1)/M``: a value exactly on an edge goes to the *lower* bin, 0 to bin 0, 1 to bin M - 1.
:func:`bin_index` computes it without a binary search (two table lookups at most, see :func:`_bin_index`).

**Soft bins** have centres ``c_k = (k + 1/2) / M``; a value is shared linearly between its two neighbouring centres
(a triangular kernel of half-width ``1/M``) and values below ``c_0`` / from ``c_{M-1}`` up go wholly to the end bins
(:func:`soft_cells`).

Implementation:

- No Python loop over batch or class: every statistic is one ``scatter_add_`` along the flattened spatial axis into a
  ``(B, C, M)`` accumulator, in **float64** whatever the input dtype (float32 counts stall at 2**24 = 16,777,216).
- A label-map target ``(B, 1, N)`` is used directly: each voxel adds to the bin of its own class's probability, so a
  one-hot target is never built.
- The element-wise work runs over chunks of the spatial axis (:func:`spatial_chunks`, about 2**20 elements per chunk
  on the CPU): scratch memory stays bounded whatever the volume size, and the CPU allocator recycles it instead of
  faulting in fresh pages for every large temporary. Nothing here synchronises with the device (the edge tables are
  built once per (M, device) and cached).

References: Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
IEEE TMI, arXiv:2506.03942; Barfoot et al., MICCAI 2024, arXiv:2403.06759.
"""

from __future__ import annotations

import math

import torch

from acecal.tensor_checks import check_num_bins

__all__ = [
    "DEFAULT_NUM_BINS",
    "bin_edges",
    "bin_index",
    "bin_means",
    "hard_bin_sums",
    "index_dtype",
    "prepare_labels",
    "soft_bin_sums",
    "soft_cells",
    "spatial_chunks",
]

#: The papers' number of bins, for the losses and the metrics alike.
DEFAULT_NUM_BINS = 20

_EPS32 = float(torch.finfo(torch.float32).eps)
_EDGE_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

# Elements per chunk of the element-wise work. Chunking bounds the scratch memory of the binning (about 20 bytes per
# element of a chunk instead of per element of the volume) and, on the CPU, lets the allocator recycle the scratch
# buffers instead of mapping fresh pages for every large temporary (page faults dominate otherwise). It is a loop over
# memory blocks of the spatial axis, independent of batch and class; a 2 x 4 x 64^3 input is two chunks on the CPU.
_CHUNK_CPU = 1 << 20
_CHUNK_CUDA = 1 << 26


# ----------------------------------------------------------------------------------------------------------------
# the hard bin rule
# ----------------------------------------------------------------------------------------------------------------


def bin_edges(num_bins: int = DEFAULT_NUM_BINS, device: torch.device | str | None = None) -> torch.Tensor:
    """The M + 1 float32 bin edges MONAI uses: ``linspace(0, 1 + eps32, M + 1)``, shape (M + 1,)."""
    check_num_bins(num_bins)
    return torch.linspace(0.0, 1.0 + _EPS32, num_bins + 1, device=device, dtype=torch.float32)


def _edge_tables_from(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lookup tables for :func:`_bin_index` from float32 edges ``e_0 = 0 < e_1 < ... < e_M`` (``e_M > 1``).

    Returns ``lo`` of shape ``(M + 1,)`` with ``lo[g] = e_g`` and ``lo[0] = -inf``, and ``hi`` with
    ``hi[g] = e_{g+1}`` and ``hi[M] = +inf``, or None when every edge satisfies ``e_m >= m / M`` (then ``e_{g+1}``
    never decides). One host sync; callers cache the result.
    """
    num_bins = edges.numel() - 1
    lo = edges.clone()
    lo[0] = -math.inf
    exact = torch.arange(1, num_bins + 1, dtype=torch.float64, device=edges.device)
    below = bool((edges[1:].double() * num_bins < exact).any())  # e_m * M is exact in float64
    hi = torch.cat([edges[1:], edges.new_full((1,), math.inf)]) if below else None
    return lo, hi


def _edge_tables(num_bins: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MONAI's bin edges (float32, on ``device``) as lookup tables, cached per (M, device)."""
    key = (num_bins, str(device))
    tables = _EDGE_TABLES.get(key)
    if tables is None:
        tables = _edge_tables_from(bin_edges(num_bins, device))
        _EDGE_TABLES[key] = tables
    return tables


def index_dtype(n: int) -> torch.dtype:
    """The smallest integer dtype that holds 0..n - 1 (uint8 for the usual 20 bins): what the losses save."""
    return torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32


def _bin_index(
    v: torch.Tensor,
    num_bins: int,
    right: bool,
    lo: torch.Tensor,
    hi: torch.Tensor | None,
    fast: bool = True,
    work: torch.Tensor | None = None,
    compact: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``bucketize(v, e[1:], right).clamp(max=M - 1)`` for float32 ``v`` in [0, 1], without a binary search.

    ``bucketize`` gives ``#{m >= 1 : e_m < v}`` (``<=`` when ``right=True``). With ``g = floor(v * M)`` every edge
    ``e_m`` with ``m <= g - 1`` lies below ``v`` and every edge with ``m >= g + 2`` above it (an edge is within a few
    ulps of ``m / M``), so at most ``e_g`` and ``e_{g+1}`` need a comparison, one table lookup each; when ``hi`` is
    None only ``e_g`` can decide. Returns the index as int64 (contiguous, for scatter) and in the compact dtype that
    the losses save for the backward pass (uint8 for M <= 255), written into ``compact`` when given (it may be a
    strided slice). ``work``, if given, is scratch space of at least ``4 * v.numel()`` bytes.
    """
    if fast and hi is None and num_bins <= 255:
        # g = floor(fl32(v * M)) is floor(v * M) or, when the product rounds up to an integer, one more; in both
        # cases the bin is g - [e_g >= v], because m / M <= e_m < (m + 1) / M - 1 ulp for every edge.
        n = v.numel()
        idx = torch.empty(v.shape, dtype=torch.int64, device=v.device)
        if work is None:
            work = torch.empty(n, dtype=torch.float32, device=v.device)
        s = work.view(-1).view(torch.float32)[:n].view(v.shape)
        torch.mul(v, num_bins, out=s)
        if compact is None:
            compact = s.to(torch.uint8)  # floor
        else:
            compact.copy_(s)
        g = idx.view(-1).view(torch.int32)[:n]  # int32 scratch inside the int64 output
        g.copy_(s.view(-1))
        e = torch.index_select(lo, 0, g, out=s.view(-1)).view(v.shape)  # e_g, over s
        below = (e > v) if right else (e >= v)
        compact.sub_(below.view(torch.uint8))
        del below, e, s
        idx.copy_(compact)
        return idx, compact
    # general path: exact floor in float64, both neighbouring edges
    g = (v.double() * num_bins).long()
    e = lo.index_select(0, g.reshape(-1)).view(g.shape)
    below = (e > v) if right else (e >= v)
    if hi is not None:
        e2 = hi.index_select(0, g.reshape(-1)).view(g.shape)
        above = (e2 <= v) if right else (e2 < v)
        g.add_(above.long())
    g.sub_(below.long())
    if compact is None:
        compact = g.to(index_dtype(num_bins))
    else:
        compact.copy_(g)
    return g, compact


def bin_index(values: torch.Tensor, num_bins: int = DEFAULT_NUM_BINS, right: bool = False) -> torch.Tensor:
    """The hard bin of every value (int64, same shape): MONAI's rule on the float32 value (module docstring).

    Values outside [0, 1] go to the end bins, as MONAI's clamp puts them; NaN is not allowed.
    """
    check_num_bins(num_bins)
    v = torch.clamp(values.detach().float(), 0.0, 1.0)
    lo, hi = _edge_tables(num_bins, v.device)
    return _bin_index(v, num_bins, bool(right), lo, hi)[0]


# ----------------------------------------------------------------------------------------------------------------
# shared plumbing of the sums
# ----------------------------------------------------------------------------------------------------------------


def spatial_chunks(shape: torch.Size | tuple[int, int, int], device: torch.device) -> list[slice]:
    """Slices of the last axis of a ``(B, C, N)`` tensor: about 2**20 elements per chunk on the CPU, 2**26 on a GPU."""
    bsz, nch, n = shape
    budget = _CHUNK_CUDA if device.type == "cuda" else _CHUNK_CPU
    step = max(1, budget // max(1, bsz * nch))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def prepare_labels(label: torch.Tensor, label_offset: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 1, N) label map whose value ``l`` means channel ``l - label_offset`` -> (int64 channel index clamped to
    >= 0, float64 mask of the voxels that belong to a channel, or None when all do)."""
    lab = label.long()
    if label_offset == 0:
        return lab, None
    lab = lab - label_offset
    valid = (lab >= 0).to(torch.float64)
    return lab.clamp_(min=0), valid


def bin_means(
    count: torch.Tensor, sum_p: torch.Tensor, sum_y: torch.Tensor, empty_below: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean_p, mean_y)`` per bin (shape of the inputs, float64), NaN in empty bins.

    A bin is empty when its count (or soft weight) is 0 or below ``empty_below``. Differentiable where the inputs are.
    """
    count = count.to(torch.float64)
    occupied = (count > 0) & (count >= empty_below)
    safe = torch.where(occupied, count, torch.ones_like(count))
    nan = count.new_full((), math.nan)
    mean_p = torch.where(occupied, sum_p.to(torch.float64) / safe, nan)
    mean_y = torch.where(occupied, sum_y.to(torch.float64) / safe, nan)
    return mean_p, mean_y


# ----------------------------------------------------------------------------------------------------------------
# hard sums
# ----------------------------------------------------------------------------------------------------------------


def hard_bin_sums(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_bins: int,
    *,
    right: bool = False,
    label_offset: int = -1,
    clamp: bool = False,
    index_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(image, class, bin) sums of the hard binning; not differentiable (the losses wrap it).

    Args:
        probs: ``(B, C, N)`` probabilities in [0, 1] (not checked here), any float dtype; binned on the float32 value.
        target: a one-hot / probability target ``(B, C, N)`` (``label_offset < 0``), or a label map ``(B, 1, N)``
            whose value ``l`` means channel ``l - label_offset`` (values below ``label_offset`` belong to no channel,
            e.g. the background when it is excluded).
        num_bins: M.
        right: MONAI's ``right`` flag (which side of an edge a value exactly on it goes to).
        label_offset: see ``target``; -1 for a one-hot target.
        clamp: bin values outside [0, 1] in the end bins (for inputs that may overshoot by rounding); their sums keep
            the unclamped values.
        index_out: a ``(B, C, N)`` tensor of dtype ``index_dtype(num_bins)`` that receives every element's bin.

    Returns:
        ``(sum_p, count, sum_y)``, each ``(B, C, M)`` float64.
    """
    bsz, nch, _ = probs.shape
    p = probs.detach()
    dev = p.device
    sum_p = torch.zeros((bsz, nch, num_bins), dtype=torch.float64, device=dev)
    counts = torch.zeros_like(sum_p)
    sum_y = torch.zeros_like(sum_p)
    one = sum_p.new_ones(())
    lo, hi = _edge_tables(num_bins, dev)
    labels = prepare_labels(target.detach(), label_offset) if label_offset >= 0 else None
    for sl in spatial_chunks(p.shape, dev):
        pc = p[:, :, sl]
        # one float64 buffer: scratch for the bin index first, then the probabilities in float64 for the sums
        work = None if p.dtype == torch.float64 else torch.empty(pc.shape, dtype=torch.float64, device=dev)
        binned = torch.clamp(pc.float(), 0.0, 1.0) if clamp else pc.float()
        compact = None if index_out is None else index_out[:, :, sl]
        idx, _ = _bin_index(binned, num_bins, right, lo, hi, work=work, compact=compact)
        del binned
        pd = pc if work is None else work.copy_(pc)
        sum_p.scatter_add_(2, idx, pd)
        counts.scatter_add_(2, idx, one.expand_as(pd))
        del pd, work
        if labels is not None:
            lab, valid = labels[0][:, :, sl], labels[1]
            own_bin = idx.gather(1, lab)  # (B, 1, L): bin of each voxel in its own class channel
            flat = (lab * num_bins).add_(own_bin).view(bsz, -1)
            src = valid[:, :, sl].reshape(bsz, -1) if valid is not None else one.expand(flat.shape)
            sum_y.view(bsz, -1).scatter_add_(1, flat, src)
        else:
            sum_y.scatter_add_(2, idx, target.detach()[:, :, sl].double())
    return sum_p, counts, sum_y


# ----------------------------------------------------------------------------------------------------------------
# soft kernel and sums
# ----------------------------------------------------------------------------------------------------------------


def soft_cells(p: torch.Tensor, num_bins: int, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell index ``J = floor(p * M + 0.5)`` in [0, M] (int64) and position ``f = p * M + 0.5 - J`` in [0, 1).

    Cell 0 (``p < c_0``) and cell M (``p >= c_{M-1}``) give all weight to the end bins; an inner cell j sits
    between the centres ``c_{j-1}`` and ``c_j`` and gives weight ``1 - f`` to bin j - 1 and ``f`` to bin j.
    Everywhere ``p = (J - 0.5 + f) / M``. Computed in ``p``'s dtype (exact in float64 for float32 input);
    ``inplace=True`` overwrites ``p`` with ``f``.
    """
    u = torch.add(p.new_full((), 0.5), p, alpha=num_bins, out=p if inplace else None)
    cell = u.long()  # u >= 0.5: truncation is floor
    return cell, u.frac_()


def soft_bin_sums(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int, label_offset: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(image, class, bin) weighted sums of the soft binning; not differentiable (the losses wrap it).

    Args:
        probs: ``(B, C, N)`` probabilities in [0, 1] (not checked here).
        target, label_offset: as :func:`hard_bin_sums`.
        num_bins: M.

    Returns:
        ``(W, sum_wp, sum_wy)``, each ``(B, C, M)`` float64: ``W_k = sum_i w_ik``, ``sum_wp_k = sum_i w_ik p_i``,
        ``sum_wy_k = sum_i w_ik y_i``.

    Each voxel falls in a cell (:func:`soft_cells`); per cell only three sums over the probabilities are needed
    (count, sum f, sum f^2), because ``p`` is a linear function of ``f`` inside a cell.
    """
    bsz, nch, _ = probs.shape
    m = num_bins
    p = probs.detach()
    dev = p.device
    acc = torch.zeros((5, bsz, nch, m + 1), dtype=torch.float64, device=dev)  # n, sum f, sum f^2, sum y, sum f y
    one = acc.new_ones(())
    labels = prepare_labels(target.detach(), label_offset) if label_offset >= 0 else None
    for sl in spatial_chunks(p.shape, dev):
        pc = p[:, :, sl]
        pd = pc.double()
        cell, f = soft_cells(pd, m, inplace=pd.dtype != pc.dtype)  # pd is a fresh copy: reuse it
        acc[0].scatter_add_(2, cell, one.expand_as(f))
        acc[1].scatter_add_(2, cell, f)
        if labels is not None:
            lab = labels[0][:, :, sl]
            own_cell = cell.gather(1, lab)
            own_f = f.gather(1, lab).view(bsz, -1)
            flat = (lab * (m + 1)).add_(own_cell).view(bsz, -1)
            if labels[1] is None:
                acc[3].view(bsz, -1).scatter_add_(1, flat, one.expand(flat.shape))
            else:
                valid = labels[1][:, :, sl].reshape(bsz, -1)
                acc[3].view(bsz, -1).scatter_add_(1, flat, valid)
                own_f.mul_(valid)
            acc[4].view(bsz, -1).scatter_add_(1, flat, own_f)
        else:
            yd = target.detach()[:, :, sl].double()
            acc[3].scatter_add_(2, cell, yd)
            acc[4].scatter_add_(2, cell, f * yd)
        acc[2].scatter_add_(2, cell, f.mul_(f))  # f is not needed any more
        del cell, f, pd
    cnt, fs, f2s, ys, fys = acc.unbind(0)
    j = torch.arange(m + 1, dtype=torch.float64, device=dev) - 0.5  # p = (j + f) / M in cell j
    sum_p = (fs + j * cnt) / m
    sum_fp = (f2s + j * fs) / m
    stats = []
    for full, frac in ((cnt, fs), (sum_p, sum_fp), (ys, fys)):
        out = acc.new_zeros((bsz, nch, m))
        out[..., 0] += full[..., 0]  # lower end cell
        out[..., m - 1] += full[..., m]  # upper end cell
        if m > 1:
            out[..., : m - 1] += full[..., 1:m] - frac[..., 1:m]  # inner cell j -> bin j - 1 with weight 1 - f
            out[..., 1:m] += frac[..., 1:m]  # inner cell j -> bin j with weight f
        stats.append(out)
    return stats[0], stats[1], stats[2]
