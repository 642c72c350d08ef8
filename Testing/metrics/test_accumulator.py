"""acecal.metrics.CalibrationAccumulator: macro/micro definitions, tiles, state, merge and distributed reduction."""

import json
import math
import statistics

import pytest
import torch
import torch.distributed as dist

from acecal.metrics import (
    METRICS,
    CalibrationAccumulator,
    bin_edges,
    bin_means,
    binning_sums,
    calibration_errors,
    dice_counts,
    dice_scores,
)

SPATIAL = (12, 10, 6)
NAMES = ["background", "liver", "kidney", "tumour"]


def make_cases(n=5, c=4, seed=0):
    """Cases with different sharpness; class 2 absent from case 1, no foreground at all in case 3."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(n):
        labels = torch.randint(0, c, (1, 1, *SPATIAL), generator=g)
        if i == 1:
            labels[labels == 2] = 0
        if i == 3:
            labels.zero_()
        logits = torch.randn(1, c, *SPATIAL, generator=g) + 2.0 * torch.nn.functional.one_hot(labels[:, 0], c).movedim(
            -1, 1
        )
        probs = torch.softmax(logits * (1.0 + 0.7 * i), 1)
        cases.append((f"case{i}", probs, labels))
    return cases


def filled(cases, **kw):
    acc = CalibrationAccumulator(4, class_names=NAMES, **kw)
    for cid, probs, labels in cases:
        acc.update(probs, labels, case_id=cid)
    return acc


def direct_per_case(cases, first=1):
    """(4, N, C) metric values and (N, C) presence computed image by image with the functional API."""
    vals, present = [], []
    for _, probs, labels in cases:
        err = calibration_errors(probs, labels, include_background=first == 0)
        dice = dice_scores(probs, labels, 4, include_background=first == 0)
        vals.append(torch.stack([err["ece"][0], err["ace"][0], err["mce"][0], dice[0]]))
        present.append(torch.tensor([bool((labels == k).any()) for k in range(first, 4)]))
    return torch.stack(vals, 1), torch.stack(present)


def test_macro_is_mean_over_images_of_mean_over_present_classes():
    cases = make_cases()
    rep = filled(cases).aggregate()
    vals, present = direct_per_case(cases)
    assert rep.num_cases == 5 and rep.class_names == NAMES[1:]
    for i, name in enumerate(METRICS):
        per_image = [vals[i, n][present[n]].mean().item() for n in range(5) if present[n].any()]
        assert len(per_image) == 4  # case3 has no foreground class: left out
        assert rep.macro[name] == pytest.approx(statistics.mean(per_image), abs=1e-12)
        assert rep.macro[f"{name}_std"] == pytest.approx(statistics.stdev(per_image), abs=1e-9)
        assert rep.macro[f"{name}_cases"] == 4
        for c in range(3):
            col = [vals[i, n, c].item() for n in range(5) if present[n, c]]
            row = rep.per_class[c]
            assert row["cases_present"] == len(col)
            assert row[f"macro_{name}"] == pytest.approx(statistics.mean(col), abs=1e-12)
    assert rep.per_class[1]["cases_present"] == 3  # kidney absent from case1 and case3
    # per-case rows: absent classes are reported (computed as MONAI) but left out of the row's mean
    row1 = rep.per_case[1]
    assert row1["case_id"] == "case1" and row1["present_classes"] == 2
    assert row1["classes"]["kidney"]["present"] is False
    assert not math.isnan(row1["classes"]["kidney"]["ace"])
    assert row1["ace"] == pytest.approx((row1["classes"]["liver"]["ace"] + row1["classes"]["tumour"]["ace"]) / 2)
    assert math.isnan(rep.per_case[3]["ace"]) and rep.per_case[3]["present_classes"] == 0


def test_micro_pools_voxels_of_all_images():
    cases = make_cases()
    rep = filled(cases).aggregate()
    probs = torch.cat([p for _, p, _ in cases], dim=-1)  # all voxels of all cases as one image
    labels = torch.cat([lab for _, _, lab in cases], dim=-1)
    err = calibration_errors(probs, labels, include_background=False)
    dice = dice_scores(probs, labels, 4)
    for c in range(3):
        assert rep.per_class[c]["micro_ece"] == pytest.approx(err["ece"][0, c].item(), abs=1e-12)
        assert rep.per_class[c]["micro_ace"] == pytest.approx(err["ace"][0, c].item(), abs=1e-12)
        assert rep.per_class[c]["micro_mce"] == pytest.approx(err["mce"][0, c].item(), abs=1e-12)
        assert rep.per_class[c]["micro_dice"] == pytest.approx(dice[0, c].item(), abs=1e-12)
    assert rep.micro["ace"] == pytest.approx(err["ace"][0].mean().item(), abs=1e-12)
    count, sum_p, sum_y = binning_sums(probs, labels, include_background=False)
    assert torch.equal(rep.micro_count, count[0])
    mean_p, mean_y = bin_means(count[0], sum_p[0], sum_y[0])
    torch.testing.assert_close(rep.micro_mean_p, mean_p, equal_nan=True)
    torch.testing.assert_close(rep.micro_mean_y, mean_y, equal_nan=True)


def test_micro_mean_p_is_count_weighted_not_mean_of_means():
    # bin 1 holds 99 voxels at p = 0.06 in case a and 1 voxel at p = 0.09 in case b
    acc = CalibrationAccumulator(2, num_bins=10)
    pa = torch.full((1, 2, 99), 0.06)
    pa[:, 0] = 0.94
    pb = torch.full((1, 2, 1), 0.09)
    pb[:, 0] = 0.91
    acc.update(pa, torch.zeros(1, 1, 99, dtype=torch.long), "a")
    acc.update(pb, torch.ones(1, 1, 1, dtype=torch.long), "b")
    rep = acc.aggregate()
    pooled = (99 * 0.06 + 0.09) / 100
    assert rep.micro_mean_p[0, 0].item() == pytest.approx(pooled, abs=1e-7)
    assert abs(rep.micro_mean_p[0, 0].item() - (0.06 + 0.09) / 2) > 0.01  # the published (wrong) pooling
    assert rep.micro_mean_y[0, 0].item() == pytest.approx(0.01)
    assert rep.micro["ece"] == pytest.approx(abs(pooled - 0.01), abs=1e-7)


def test_dataset_reliability_histogram():
    cases = make_cases()
    acc = filled(cases)
    rep = acc.aggregate()
    m = 20
    expected = torch.zeros(3, m, m, dtype=torch.int64)
    edges = bin_edges(m)[1:]
    for cid, _, labels in cases:
        mean_p, mean_y, count = acc.case_bins(cid)
        for c in range(3):
            if not (labels == c + 1).any():
                continue
            for b in range(m):
                if count[c, b] > 0:
                    k = min(int(torch.bucketize(mean_y[c, b].float(), edges)), m - 1)
                    expected[c, k, b] += 1
    assert rep.histogram.shape == (3, m, m) and rep.histogram.dtype == torch.int64
    assert torch.equal(rep.histogram, expected)
    assert rep.histogram[1].sum(0).max() == 3  # kidney present in 3 cases


def test_tiles_and_precomputed_sums_equal_whole_images():
    cases = make_cases(n=3)
    whole = filled(cases).aggregate()
    tiled = CalibrationAccumulator(4, class_names=NAMES)
    sums = CalibrationAccumulator(4, class_names=NAMES)
    for cid, probs, labels in cases:
        for s in (slice(0, 2), slice(2, 5), slice(5, None)):  # disjoint chunks of one image
            tiled.update(probs[..., s], labels[..., s], case_id=cid)
            count, sum_p, sum_y = binning_sums(probs[..., s], labels[..., s])  # all 4 channels
            tp, n_pred, n_target = dice_counts(probs[..., s], labels[..., s], 4)
            sums.update_sums(
                count[0], sum_p[0], sum_y[0], tp=tp[0], n_pred=n_pred[0], n_target=n_target[0], case_id=cid
            )
    for acc in (tiled, sums):
        assert acc.case_ids == ["case0", "case1", "case2"]
        rep = acc.aggregate()
        for key in ("macro", "micro"):
            for name, value in getattr(whole, key).items():
                assert getattr(rep, key)[name] == pytest.approx(value, abs=1e-12, nan_ok=True), (key, name)
        assert torch.equal(rep.histogram, whole.histogram)


def test_batch_update_and_ids():
    cases = make_cases(n=3)
    probs = torch.cat([p for _, p, _ in cases])
    labels = torch.cat([lab for _, _, lab in cases])
    acc = CalibrationAccumulator(4, class_names=NAMES)
    assert acc.update(probs, labels, case_id=["case0", "case1", "case2"]) == ["case0", "case1", "case2"]
    one_by_one = filled(cases).aggregate()
    assert acc.aggregate().macro == pytest.approx(one_by_one.macro, nan_ok=True)
    auto = CalibrationAccumulator(4)
    onehot = torch.nn.functional.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
    ids = auto.update(probs, onehot)
    assert auto.aggregate().macro["ace"] == pytest.approx(one_by_one.macro["ace"], abs=1e-12)
    assert len(set(ids)) == 3 and auto.update(probs[:1], labels[:1])[0] not in ids
    with pytest.raises(ValueError, match="one case_id"):
        acc.update(probs, labels, case_id="x")
    with pytest.raises(ValueError, match="2 case ids"):
        acc.update(probs, labels, case_id=["x", "y"])
    with pytest.raises(ValueError, match="channels"):
        acc.update(probs[:, :3], labels)
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full_like(probs, float("nan")), labels)


def test_include_background_and_memory_per_case():
    cases = make_cases(n=2)
    acc = filled(cases, include_background=True)
    vals, present = direct_per_case(cases, first=0)
    rep = acc.aggregate()
    assert rep.class_names == NAMES and len(rep.per_class) == 4
    per_image = [vals[1, n][present[n]].mean().item() for n in range(2)]
    assert rep.macro["ace"] == pytest.approx(statistics.mean(per_image), abs=1e-12)
    state = acc.state_dict()
    assert state["count"].shape == (2, 4, 20) and state["sum_p"].shape == (2, 4, 20)
    assert state["tp"].shape == (2, 4)  # (classes x bins) numbers per case, nothing spatial


def test_state_dict_merge_and_duplicates(tmp_path):
    cases = make_cases()
    full = filled(cases).aggregate()
    a, b = filled(cases[:2]), filled(cases[2:])
    a.merge(b)
    merged = a.aggregate()
    assert [r["case_id"] for r in merged.per_case] == [c[0] for c in cases]
    assert merged.macro == pytest.approx(full.macro, nan_ok=True)
    assert torch.equal(merged.histogram, full.histogram)
    # round trip through torch.save (what all_gather_object pickles)
    torch.save(a.state_dict(), tmp_path / "acc.pt")
    again = CalibrationAccumulator.from_state_dict(torch.load(tmp_path / "acc.pt"))
    assert again.aggregate().micro == pytest.approx(full.micro, nan_ok=True)
    # duplicates: error by default, skip (DistributedSampler padding) or add (pieces of one image)
    c = filled(cases[:1])
    with pytest.raises(ValueError, match="on_duplicate"):
        c.merge(filled(cases[:2]))
    c.merge(filled(cases[:2]), on_duplicate="skip")
    assert c.aggregate().macro == pytest.approx(filled(cases[:2]).aggregate().macro, nan_ok=True)
    d = filled(cases[:1])
    d.merge(filled(cases[:1]), on_duplicate="add")
    assert int(d.state_dict()["count"].sum()) == 2 * int(filled(cases[:1]).state_dict()["count"].sum())
    with pytest.raises(ValueError, match="cannot merge"):
        c.merge(CalibrationAccumulator(4, num_bins=10))


def test_reduce_sums_summaries_across_ranks():
    cases = make_cases()
    full = filled(cases).aggregate()
    rank0, rank1 = filled(cases[:3]), filled(cases[3:])
    other = rank1.summary()
    keys = iter(other)  # the same fixed order on every rank
    seen = []

    def all_reduce(t):  # what torch.distributed.all_reduce(SUM) would give rank 0 with two ranks
        key = next(k for k in keys if other[k].shape == t.shape)
        seen.append(key)
        t += other[key]

    rank0.reduce(all_reduce)
    rep = rank0.aggregate()
    assert rep.reduced and rep.num_cases == 5
    assert rep.macro == pytest.approx(full.macro, nan_ok=True)
    assert rep.micro == pytest.approx(full.micro, nan_ok=True)
    assert torch.equal(rep.histogram, full.histogram)
    for got, want in zip(rep.per_class, full.per_class, strict=True):
        assert got == pytest.approx(want, nan_ok=True)
    assert [r["case_id"] for r in rep.per_case] == ["case0", "case1", "case2"]  # per-case rows stay local
    rank0.update(*cases[0][1:], case_id="new")
    assert not rank0.aggregate().reduced  # a later update discards the reduced summary


def test_reduce_with_torch_distributed(tmp_path):
    cases = make_cases(n=3)
    acc = filled(cases)
    before = acc.aggregate()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        acc.reduce(dist.all_reduce)
        gathered = [None]
        dist.all_gather_object(gathered, acc.state_dict())
    finally:
        dist.destroy_process_group()
    after = acc.aggregate()
    assert after.reduced and after.macro == pytest.approx(before.macro, nan_ok=True)
    total = CalibrationAccumulator(4, class_names=NAMES)
    for state in gathered:
        total.merge(state, on_duplicate="skip")
    assert total.aggregate().micro == pytest.approx(before.micro, nan_ok=True)


def test_update_sums_validation():
    acc = CalibrationAccumulator(3, num_bins=5)
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="shape"):
        acc.update_sums(torch.zeros(2, 4), z, z)
    with pytest.raises(ValueError, match="exceed"):
        acc.update_sums(torch.ones(2, 5), torch.full((2, 5), 3.0), z)
    with pytest.raises(ValueError, match="all three"):
        acc.update_sums(torch.ones(2, 5), z, z, tp=torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        acc.update_sums(torch.ones(2, 5), torch.full((2, 5), float("nan")), z)
    with pytest.raises(ValueError, match="whole numbers"):
        acc.update_sums(torch.full((2, 5), 0.5), z, z)
    # without Dice counts the case has Dice NaN but calibration numbers
    acc.update_sums(torch.ones(3, 5, dtype=torch.int64), torch.full((3, 5), 0.5), torch.ones(3, 5), case_id="s")
    row = acc.aggregate().per_case[0]
    assert math.isnan(row["dice"]) and row["ace"] == pytest.approx(0.5)


def test_constructor_and_report_serialisation():
    with pytest.raises(ValueError):
        CalibrationAccumulator(1)
    with pytest.raises(ValueError, match="class_names"):
        CalibrationAccumulator(4, class_names=["a", "b"])
    empty = CalibrationAccumulator(3).aggregate()
    assert empty.num_cases == 0 and math.isnan(empty.macro["ace"]) and empty.histogram.shape == (2, 20, 20)
    rep = filled(make_cases(n=2)).aggregate()
    text = json.dumps(rep.to_dict())
    assert '"macro"' in text and json.loads(text)["class_names"] == NAMES[1:]
    mean_p, mean_y, count = filled(make_cases(n=1)).case_bins("case0")
    assert mean_p.shape == mean_y.shape == count.shape == (3, 20)
    with pytest.raises(KeyError):
        CalibrationAccumulator(3).case_bins("nope")
