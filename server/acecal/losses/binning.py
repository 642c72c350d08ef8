"""Hard and soft per-(image, class) calibration binning with compact custom autograd functions.

Both binnings work per image and per class channel ("marginal" calibration): for a probability map ``probs`` of
shape ``(B, C, spatial...)`` they return three ``(B, C, num_bins)`` tensors ``(mean_p, mean_y, counts)``.
They are the building blocks of :class:`~acecal.losses.HardL1ACELoss` and :class:`~acecal.losses.SoftL1ACELoss`.

Implementation notes (see ``shared/reference/calibration.md`` sections 2, 3, 8 and 12):

- No Python loop over batch or class: every per-bin statistic is one ``scatter_add_`` along the flattened
  spatial axis into a ``(B, C, bins)`` accumulator. Statistics are accumulated in **float64** whatever the input
  dtype (float32 accumulation of counts stalls at 2**24 = 16,777,216).
- A label-map target ``(B, 1, spatial...)`` is used directly: the bin of each voxel's own class is gathered, so a
  float one-hot target is never materialised.
- Custom ``torch.autograd.Function``\\ s with closed-form backward passes. Hard binning saves one ``uint8`` bin
  index per element; soft binning saves nothing per element beyond the probabilities (usually the softmax output,
  already kept by autograd) and, for a label map, a ``uint8`` copy of the labels; its weights are recomputed.
- The element-wise work runs over chunks of the spatial axis (about 2**20 elements per chunk on the CPU), so its
  scratch memory is bounded whatever the volume size, and the CPU allocator recycles it instead of faulting in fresh
  pages for every large temporary.
- One fused validation (a handful of reductions, a single host synchronisation) per call; the binning itself
  never synchronises with the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["hard_binned_calibration", "soft_binned_calibration"]

_EPS32 = float(torch.finfo(torch.float32).eps)
_EDGE_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# validation (one fused host synchronisation)
# ----------------------------------------------------------------------------------------------------------------


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A tensor subclass (e.g. MONAI's MetaTensor) as a plain tensor view, still attached to the autograd graph:
    the element-wise work then runs without per-operation metadata handling."""
    if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor:
        return t.as_subclass(torch.Tensor)
    return t


def _check_num_bins(num_bins: int, who: str) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"{who}: num_bins must be an integer >= 1, got {num_bins!r}.")
    if num_bins > 32767:
        raise ValueError(f"{who}: num_bins must be <= 32767, got {num_bins}; 20 is the usual choice.")
    return num_bins


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Element-wise working precision: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused_checks(who: str, checks: Sequence[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """Evaluate named 0-d tensors with a single device -> host copy."""
    if not checks:
        return {}
    values = torch.stack([t.detach().to(torch.float64).reshape(()) for _, t in checks]).tolist()
    return {name: v for (name, _), v in zip(checks, values)}


def _range_checks(prefix: str, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    lo, hi = torch.aminmax(x.detach())
    return [(prefix + "_min", lo), (prefix + "_max", hi)]


def _label_checks(label: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    lab = label.detach()
    if lab.dtype == torch.bool:
        lab = lab.to(torch.uint8)
    checks = _range_checks("label", lab)
    if lab.is_floating_point():
        checks.append(("label_nonint", (lab != torch.round(lab)).any()))
    return checks


def _raise_if_bad(
    who: str,
    values: dict[str, float],
    *,
    input_name: str = "input",
    probs_name: str | None = None,
    num_classes: int | None = None,
) -> None:
    """Turn the fused check results into a ValueError that says what was wrong and what to do."""
    if "input_min" in values:
        lo, hi = values["input_min"], values["input_max"]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(
                f"{who}: {input_name} contains NaN or infinite values (min={lo}, max={hi}). Check the network output "
                "for divergence (lower the learning rate, use gradient clipping, or check AMP loss scaling)."
            )
    if "probs_min" in values:
        lo, hi = values["probs_min"], values["probs_max"]
        name = probs_name or "probabilities"
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(
                f"{who}: {name} contain NaN values. Check the network output for divergence (lower the learning "
                "rate, use gradient clipping, or check AMP loss scaling)."
            )
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"{who}: {name} must lie in [0, 1], got values in [{lo}, {hi}]. Pass probabilities, or pass logits "
                "with softmax=True (or sigmoid=True) so the loss applies the activation itself."
            )
    if "target_min" in values:
        lo, hi = values["target_min"], values["target_max"]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{who}: target contains NaN or infinite values (min={lo}, max={hi}).")
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"{who}: a one-hot / probability target must lie in [0, 1], got values in [{lo}, {hi}]. "
                "For a label map of shape (B, 1, spatial...) set to_onehot_y=True."
            )
    if "label_min" in values:
        lo, hi = values["label_min"], values["label_max"]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{who}: label map contains NaN or infinite values (min={lo}, max={hi}).")
        if values.get("label_nonint", 0.0) != 0.0:
            raise ValueError(
                f"{who}: label map contains non-integer values (range [{lo}, {hi}]). Resample label maps with "
                "nearest-neighbour interpolation, or round them, before the loss."
            )
        if num_classes is not None and not (lo >= 0 and hi <= num_classes - 1):
            raise ValueError(
                f"{who}: label map values must be class indices in [0, {num_classes - 1}] for an input with "
                f"{num_classes} channels, got values in [{int(lo)}, {int(hi)}]. Check the number of output channels "
                "of the network against the labels."
            )


def _check_same_shape(who: str, probs: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(f"{who}: probs and target must be torch.Tensor, got {type(probs)} and {type(target)}.")
    if probs.ndim < 3:
        raise ValueError(
            f"{who}: probs must have shape (B, C, spatial...) with at least one spatial dimension, "
            f"got shape {tuple(probs.shape)}."
        )
    if probs.shape != target.shape:
        raise ValueError(
            f"{who}: probs and target must have the same shape (B, C, spatial...), got {tuple(probs.shape)} and "
            f"{tuple(target.shape)}. One-hot encode a label map first (e.g. monai.networks.utils.one_hot)."
        )
    if probs.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{who}: probs must be a floating point tensor, got dtype {probs.dtype}.")
    if probs.numel() == 0:
        raise ValueError(f"{who}: probs must not be empty, got shape {tuple(probs.shape)}.")


def _validate_probs_and_target(who: str, probs: torch.Tensor, target: torch.Tensor) -> None:
    checks = _range_checks("probs", probs)
    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    checks += _range_checks("target", target)
    values = _fused_checks(who, checks)
    _raise_if_bad(who, values, probs_name="probs")


# ----------------------------------------------------------------------------------------------------------------
# hard binning: MONAI's edges and tie rule without a binary search
# ----------------------------------------------------------------------------------------------------------------


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
    """MONAI's bin edges ``linspace(0, 1 + eps32, M + 1)`` (float32, on ``device``) as lookup tables, cached."""
    key = (num_bins, str(device))
    tables = _EDGE_TABLES.get(key)
    if tables is None:
        edges = torch.linspace(0.0, 1.0 + _EPS32, num_bins + 1, dtype=torch.float32, device=device)
        tables = _edge_tables_from(edges)
        _EDGE_TABLES[key] = tables
    return tables


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
    is saved for the backward pass (uint8 for M <= 255), written into ``compact`` when given (it may be a strided
    slice). ``work``, if given, is scratch space of at least ``4 * v.numel()`` bytes.
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
        compact = g.to(_index_dtype(num_bins))
    else:
        compact.copy_(g)
    return g, compact


def _hard_bin_index(
    probs: torch.Tensor,
    num_bins: int,
    right: bool,
    work: torch.Tensor | None = None,
    compact: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin index of every element of ``probs`` (in [0, 1]), identical to ``monai.metrics.calibration_binning``.

    MONAI bins ``probs.float()``; so do we (for float64 input the float32-rounded value decides the bin).
    """
    lo, hi = _edge_tables(num_bins, probs.device)
    return _bin_index(probs.float(), num_bins, right, lo, hi, work=work, compact=compact)


# Elements per chunk of the element-wise work. Chunking bounds the scratch memory of the binning (about 20 bytes per
# element of a chunk instead of per element of the volume) and, on the CPU, lets the allocator recycle the scratch
# buffers instead of mapping fresh pages for every large temporary (page faults dominate otherwise). It is a loop over
# memory blocks of the spatial axis, independent of batch and class; a 2 x 4 x 64^3 input is two chunks on the CPU.
_CHUNK_CPU = 1 << 20
_CHUNK_CUDA = 1 << 26


def _spatial_chunks(shape: torch.Size, device: torch.device) -> list[slice]:
    bsz, nch, n = shape
    budget = _CHUNK_CUDA if device.type == "cuda" else _CHUNK_CPU
    step = max(1, budget // max(1, bsz * nch))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def _index_dtype(n: int) -> torch.dtype:
    return torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32


def _prepare_labels(label: torch.Tensor, label_offset: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 1, N) label map -> (int64 channel index clamped to >= 0, float64 validity mask or None)."""
    lab = label.long()
    if label_offset == 0:
        return lab, None
    lab = lab - label_offset
    valid = (lab >= 0).to(torch.float64)
    return lab.clamp_(min=0), valid


class _HardBinningFunction(torch.autograd.Function):
    """Per-(image, class, bin) sums of a hard binning; differentiable in the probabilities.

    forward(probs (B, C, N), target, num_bins, right, label_offset) -> (sum_p, counts, sum_y, y_total), the first
    three of shape (B, C, num_bins) and the last (B, C), all float64. ``target`` is either a one-hot / probability
    tensor of shape (B, C, N) (``label_offset < 0``) or a label map (B, 1, N) whose value ``l`` means channel
    ``l - label_offset`` (values below ``label_offset`` belong to no channel, e.g. background when it is excluded).

    Only ``sum_p`` depends on the probabilities (bin membership is piecewise constant), so
    ``d sum_p[b, c, m] / d p[b, c, i] = [bin(i) == m]`` and the backward is a gather of the incoming gradient by the
    saved ``uint8`` bin index. With the L1-ACE on top this is the closed form of the reference sheet, section 2:
    ``sign(mean_p_m - mean_y_m) / (K * n_m)``.
    """

    @staticmethod
    def forward(ctx, probs, target, num_bins, right, label_offset):  # type: ignore[override]
        bsz, nch, n = probs.shape
        p = probs.detach()
        dev = p.device
        sum_p = torch.zeros((bsz, nch, num_bins), dtype=torch.float64, device=dev)
        counts = torch.zeros_like(sum_p)
        sum_y = torch.zeros_like(sum_p)
        one = sum_p.new_ones(())
        compact = torch.empty((bsz, nch, n), dtype=_index_dtype(num_bins), device=dev)
        labels = _prepare_labels(target, label_offset) if label_offset >= 0 else None
        for sl in _spatial_chunks(p.shape, dev):
            pc = p[:, :, sl]
            # one float64 buffer: scratch for the bin index first, then the probabilities in float64 for the sums
            work = None if p.dtype == torch.float64 else torch.empty(pc.shape, dtype=torch.float64, device=dev)
            idx, _ = _hard_bin_index(pc, num_bins, right, work, compact[:, :, sl])
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
        y_total = sum_y.sum(-1)
        ctx.save_for_backward(compact)
        ctx.in_dtype = probs.dtype
        ctx.mark_non_differentiable(counts, sum_y, y_total)
        return sum_p, counts, sum_y, y_total

    @staticmethod
    def backward(ctx, grad_sum_p, *unused):  # type: ignore[override]
        (compact,) = ctx.saved_tensors
        if grad_sum_p is None:
            return None, None, None, None, None
        cd = _compute_dtype(ctx.in_dtype)
        table = grad_sum_p.to(cd)
        grad = torch.empty(compact.shape, dtype=ctx.in_dtype, device=compact.device)
        for sl in _spatial_chunks(compact.shape, compact.device):
            if cd == ctx.in_dtype:
                torch.gather(table, 2, compact[:, :, sl].long(), out=grad[:, :, sl])
            else:
                grad[:, :, sl] = table.gather(2, compact[:, :, sl].long())
        return grad, None, None, None, None


def _hard_sums(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int, right: bool, label_offset: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unvalidated entry point: probs (B, C, spatial...) in [0, 1] -> (sum_p, counts, sum_y, y_total)."""
    bsz, nch = probs.shape[:2]
    p = probs.reshape(bsz, nch, -1)
    t = target.reshape(target.shape[0], target.shape[1], -1)
    return _HardBinningFunction.apply(p, t, num_bins, right, label_offset)


# ----------------------------------------------------------------------------------------------------------------
# soft binning: triangular kernel, cells between neighbouring bin centres
# ----------------------------------------------------------------------------------------------------------------


def _soft_cells(p: torch.Tensor, num_bins: int, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell index ``J = floor(p * M + 0.5)`` in [0, M] (int64) and position ``f = p * M + 0.5 - J`` in [0, 1).

    Cell 0 (``p < c_0``) and cell M (``p >= c_{M-1}``) give all weight to the end bins; an inner cell j sits
    between the centres ``c_{j-1}`` and ``c_j`` and gives weight ``1 - f`` to bin j - 1 and ``f`` to bin j.
    Everywhere ``p = (J - 0.5 + f) / M``. Computed in ``p``'s dtype (exact in float64 for float32 input);
    ``inplace=True`` overwrites ``p`` with ``f``.
    """
    u = torch.add(p.new_full((), 0.5), p, alpha=num_bins, out=p if inplace else None)
    cell = u.long()  # u >= 0.5: truncation is floor
    return cell, u.frac_()


class _SoftBinningFunction(torch.autograd.Function):
    """Per-(image, class, bin) weighted sums of the triangular soft binning; differentiable in the probabilities.

    forward(probs (B, C, N), target, num_bins, label_offset) -> (W, sum_wp, sum_wy, y_total): ``W_k = sum_i w_ik``,
    ``sum_wp_k = sum_i w_ik p_i``, ``sum_wy_k = sum_i w_ik y_i`` (each (B, C, num_bins)), ``y_total`` (B, C); float64.
    Target conventions as in :class:`_HardBinningFunction`.

    Each voxel falls in a cell (see :func:`_soft_cells`); per cell only three sums over the probabilities are needed
    (count, sum f, sum f^2), because ``p`` is a linear function of ``f`` inside a cell. Backward: with incoming
    gradients gW, gP, gY per bin, an element in inner cell j gets
    ``gP_{j-1} + M (gW_j - gW_{j-1}) + (gP_j - gP_{j-1}) (j - 1/2) + 2 (gP_j - gP_{j-1}) f + M (gY_j - gY_{j-1}) y``
    (the chain rule through ``w_ik`` and ``w'_ik = -+M``), and an element in an end cell gets ``gP`` of its end bin.
    With the L1-ACE on top this is the closed form of the reference sheet, section 3. Nothing per element is saved
    except the probabilities themselves and, for a label map, a ``uint8`` copy of it; cells and weights are
    recomputed in the backward pass.
    """

    @staticmethod
    def forward(ctx, probs, target, num_bins, label_offset):  # type: ignore[override]
        bsz, nch, n = probs.shape
        m = num_bins
        p = probs.detach()
        dev = p.device
        acc = torch.zeros((5, bsz, nch, m + 1), dtype=torch.float64, device=dev)  # n, sum f, sum f^2, sum y, sum f y
        one = acc.new_ones(())
        labels = _prepare_labels(target, label_offset) if label_offset >= 0 else None
        for sl in _spatial_chunks(p.shape, dev):
            pc = p[:, :, sl]
            pd = pc.double()
            cell, f = _soft_cells(pd, m, inplace=pd.dtype != pc.dtype)  # pd is a fresh copy: reuse it
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
        if labels is not None:
            saved_target = target.detach().to(_index_dtype(nch + max(label_offset, 0)))
        else:
            saved_target = target.detach()
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
        y_total = ys.sum(-1)
        ctx.save_for_backward(probs, saved_target)
        ctx.num_bins = m
        ctx.label_offset = label_offset
        ctx.mark_non_differentiable(y_total)
        return stats[0], stats[1], stats[2], y_total

    @staticmethod
    def backward(ctx, g_w, g_p, g_y, _unused):  # type: ignore[override]
        probs, target = ctx.saved_tensors
        m = ctx.num_bins
        bsz, nch, n = probs.shape
        dev = probs.device
        cd = _compute_dtype(probs.dtype)
        zeros = None
        grads = []
        for g in (g_w, g_p, g_y):
            if g is None:
                if zeros is None:
                    zeros = torch.zeros((bsz, nch, m), dtype=torch.float64, device=dev)
                g = zeros
            grads.append(g.to(torch.float64))
        g_w, g_p, g_y = grads
        # per-cell tables (B, C, M + 1): grad_i = u[J_i] + v[J_i] * f_i + wy[J_i] * y_i
        u = g_p.new_zeros((bsz, nch, m + 1))
        v = torch.zeros_like(u)
        wy = torch.zeros_like(u)
        u[..., 0] = g_p[..., 0]
        u[..., m] = g_p[..., m - 1]
        if m > 1:
            beta = g_p[..., 1:] - g_p[..., :-1]
            j = torch.arange(1, m, dtype=torch.float64, device=dev) - 0.5
            u[..., 1:m] = g_p[..., :-1] + m * (g_w[..., 1:] - g_w[..., :-1]) + beta * j
            v[..., 1:m] = 2.0 * beta
            wy[..., 1:m] = m * (g_y[..., 1:] - g_y[..., :-1])
        u, v, wy = u.to(cd), v.to(cd), wy.to(cd)
        labels = _prepare_labels(target, ctx.label_offset) if ctx.label_offset >= 0 else None
        grad = torch.empty((bsz, nch, n), dtype=probs.dtype, device=dev)
        for sl in _spatial_chunks(probs.shape, dev):
            pc = probs.detach()[:, :, sl]
            cell, f = _soft_cells(pc.to(cd), m, inplace=pc.dtype != cd)
            gs = grad[:, :, sl] if cd == probs.dtype else torch.empty(f.shape, dtype=cd, device=dev)
            torch.gather(v, 2, cell, out=gs)
            gs.mul_(f)
            gs.add_(torch.gather(u, 2, cell, out=f))  # f is not needed any more
            del f
            if labels is not None:
                lab = labels[0][:, :, sl]
                own_cell = cell.gather(1, lab)
                flat = (lab * (m + 1)).add_(own_cell).view(bsz, -1)
                add = wy.view(bsz, -1).gather(1, flat).view_as(lab)
                if labels[1] is not None:
                    add.mul_(labels[1][:, :, sl].to(cd))
                gs.scatter_add_(1, lab, add)
            else:
                gs.addcmul_(wy.gather(2, cell), target[:, :, sl].to(cd))
            if gs.data_ptr() != grad[:, :, sl].data_ptr():
                grad[:, :, sl] = gs
        return grad, None, None, None


def _soft_sums(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int, label_offset: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unvalidated entry point: probs (B, C, spatial...) in [0, 1] -> (W, sum_wp, sum_wy, y_total)."""
    bsz, nch = probs.shape[:2]
    p = probs.reshape(bsz, nch, -1)
    t = target.reshape(target.shape[0], target.shape[1], -1)
    return _SoftBinningFunction.apply(p, t, num_bins, label_offset)


# ----------------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------------


def hard_binned_calibration(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int = 20, right: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard-binned reliability statistics per image, class and confidence bin.

    Bin-for-bin identical to ``monai.metrics.calibration_binning``: edges ``linspace(0, 1 + eps32, num_bins + 1)``
    in float32 and MONAI's tie rule, so bins are ``(k/M, (k+1)/M]`` and a value exactly on ``k/M`` goes to the
    lower bin (0 goes to bin 0, 1 to bin M - 1); ``right=True`` reproduces ``bucketize(..., right=True)``.
    Unlike MONAI there is no loop over batch and class and the sums are accumulated in float64.

    Args:
        probs: probabilities of shape ``(B, C, spatial...)``, values in [0, 1] (any float dtype; binned as float32,
            like MONAI).
        target: one-hot (or probability) target of the same shape, values in [0, 1].
        num_bins: number of equal-width bins M on [0, 1]. Defaults to 20.
        right: MONAI's ``right`` option (which side of an edge a value exactly on it goes to). Defaults to False.

    Returns:
        ``(mean_p, mean_y, counts)``, each of shape ``(B, C, num_bins)`` and dtype float64: mean probability,
        mean target (observed frequency) and number of elements per bin. ``mean_p`` and ``mean_y`` are NaN for empty
        bins. ``mean_p`` is differentiable with respect to ``probs``; ``mean_y`` and ``counts`` are not.

    Raises:
        ValueError: if shapes differ, ``probs`` has fewer than 3 dimensions or is empty, values are NaN/inf or
            outside [0, 1], or ``num_bins`` is not a positive integer.

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942. Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """
    who = "hard_binned_calibration"
    probs, target = _plain(probs), _plain(target)
    _check_num_bins(num_bins, who)
    _check_same_shape(who, probs, target)
    _validate_probs_and_target(who, probs, target)
    sum_p, counts, sum_y, _ = _hard_sums(probs, target, num_bins, bool(right))
    nonempty = counts > 0
    safe = torch.where(nonempty, counts, torch.ones_like(counts))
    nan = counts.new_full((), math.nan)
    mean_p = torch.where(nonempty, sum_p / safe, nan)
    mean_y = torch.where(nonempty, sum_y / safe, nan)
    return mean_p, mean_y, counts


def soft_binned_calibration(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int = 20, empty_weight: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-binned (triangular kernel) reliability statistics per image, class and confidence bin.

    Bin k has centre ``c_k = (k + 1/2) / M``; each value is shared linearly between its two neighbouring centres
    (a triangular kernel of half-width ``1/M``), and values below ``c_0`` / from ``c_{M-1}`` up go wholly to the
    first / last bin. So every element spreads a total weight of 1 over at most two bins. Examples (M = 20):
    0.05 -> bins 0 and 1 at 0.5 each; 0.0625 -> 0.25 / 0.75; 0.075 -> bin 1 only; 0.02 -> bin 0 only.

    Args:
        probs: probabilities of shape ``(B, C, spatial...)``, values in [0, 1].
        target: one-hot (or probability) target of the same shape, values in [0, 1].
        num_bins: number of bins M. Defaults to 20.
        empty_weight: a bin whose total weight ``W_k`` is below this (or zero) counts as empty. Defaults to 0.01.

    Returns:
        ``(mean_p, mean_y, counts)``, each ``(B, C, num_bins)`` float64: the weighted means
        ``sum_i w_ik p_i / W_k`` and ``sum_i w_ik y_i / W_k`` (NaN for empty bins) and the bin weights ``W_k``.
        All three are differentiable with respect to ``probs`` (the weights depend on the probabilities).

    Raises:
        ValueError: as :func:`hard_binned_calibration`, and for a negative or non-finite ``empty_weight``.

    References:
        Barfoot et al., IEEE TMI, arXiv:2506.03942 (soft-binned L1-ACE); arXiv:2403.06759 (MICCAI 2024).
    """
    who = "soft_binned_calibration"
    probs, target = _plain(probs), _plain(target)
    _check_num_bins(num_bins, who)
    _check_empty_weight(empty_weight, who)
    _check_same_shape(who, probs, target)
    _validate_probs_and_target(who, probs, target)
    weights, sum_p, sum_y, _ = _soft_sums(probs, target, num_bins)
    nonempty = (weights >= empty_weight) & (weights > 0)
    safe = torch.where(nonempty, weights, torch.ones_like(weights))
    nan = weights.new_full((), math.nan)
    mean_p = torch.where(nonempty, sum_p / safe, nan)
    mean_y = torch.where(nonempty, sum_y / safe, nan)
    return mean_p, mean_y, weights


def _check_empty_weight(empty_weight: float, who: str) -> float:
    try:
        value = float(empty_weight)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: empty_weight must be a non-negative number, got {empty_weight!r}.") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{who}: empty_weight must be a finite number >= 0, got {empty_weight!r} (default 0.01).")
    return value
