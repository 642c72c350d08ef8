"""acecal.plots: reliability diagrams and dataset reliability histograms as PNG files (matplotlib, Agg)."""

from acecal.plots.reliability import plot_dataset_reliability_histogram, plot_reliability_diagram

__all__ = ["plot_dataset_reliability_histogram", "plot_reliability_diagram"]
