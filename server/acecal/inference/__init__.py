"""Inference: bundle -> segmentation, confidence, uncertainty and flagged regions on the input's exact grid."""
