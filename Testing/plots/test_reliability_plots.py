"""acecal.plots: the figures are written as real PNGs of a sensible size, from real accumulated data."""

import struct

import pytest
import torch

from acecal.metrics import CalibrationAccumulator
from acecal.plots import plot_dataset_reliability_histogram, plot_reliability_diagram

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


@pytest.fixture(scope="module")
def accumulated():
    g = torch.Generator().manual_seed(0)
    acc = CalibrationAccumulator(3, class_names=["background", "liver", "tumour"])
    for i in range(4):
        labels = torch.randint(0, 3, (1, 1, 16, 16, 4), generator=g)
        if i == 2:
            labels[labels == 2] = 0  # tumour absent from one case
        onehot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
        probs = torch.softmax((onehot * 2 + torch.randn(1, 3, 16, 16, 4, generator=g)) * (1.5 + i), 1)
        acc.update(probs, labels, case_id=f"case{i}")
    return acc


def test_case_reliability_diagram(tmp_path, accumulated):
    mean_p, mean_y, count = accumulated.case_bins("case2")
    out = plot_reliability_diagram(
        mean_p, mean_y, count, accumulated.class_names, tmp_path / "sub" / "case2.png", title="case2"
    )
    assert out == tmp_path / "sub" / "case2.png"
    width, height, nbytes = png_size(out)
    assert width > 500 and height > 400 and width > height and nbytes > 20_000


def test_single_class_numpy_input_with_empty_bins(tmp_path):
    mean_p = torch.linspace(0.025, 0.975, 20).numpy()
    mean_y = mean_p * 0.7
    counts = torch.arange(20).numpy() * 1000  # bin 0 empty, counts span > 100x: log scale
    mean_p[0] = mean_y[0] = float("nan")
    width, height, _ = png_size(plot_reliability_diagram(mean_p, mean_y, counts, ["spleen"], tmp_path / "one.png"))
    assert width > 300 and height > 400


def test_pooled_diagram_and_dataset_histogram(tmp_path, accumulated):
    report = accumulated.aggregate()
    w1, h1, _ = png_size(
        plot_reliability_diagram(
            report.micro_mean_p, report.micro_mean_y, report.micro_count, report.class_names, tmp_path / "pooled.png"
        )
    )
    assert w1 > 500
    out = plot_dataset_reliability_histogram(
        report.histogram, report.class_names, tmp_path / "dataset.png", title="Test set"
    )
    width, height, nbytes = png_size(out)
    assert width > 600 and height > 300 and nbytes > 20_000


def test_bad_input(tmp_path):
    z = torch.zeros(2, 20)
    with pytest.raises(ValueError, match="same shape"):
        plot_reliability_diagram(z, z, torch.zeros(2, 19), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="class names"):
        plot_reliability_diagram(z, z, z, ["only one"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=".png"):
        plot_reliability_diagram(z, z, z, None, tmp_path / "x.pdf")
    with pytest.raises(ValueError, match=r"\(C, M, M\)"):
        plot_dataset_reliability_histogram(torch.zeros(2, 20, 19), None, tmp_path / "h.png")
    with pytest.raises(ValueError, match="non-negative"):
        plot_dataset_reliability_histogram(-torch.ones(1, 5, 5), None, tmp_path / "h.png")
    assert not list(tmp_path.iterdir())
