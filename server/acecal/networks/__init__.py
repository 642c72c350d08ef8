"""acecal.networks: networks beyond MONAI's own, by bundle name (see ``acecal.bundles.bundle.build_network``).

SegResNetTwoHead                 SegResNet with a segmentation head and a calibration head, output (B, 2C, ...)
split_heads(output, C)           (segmentation logits, calibration logits): the one place that splits them
is_two_head(name | config | net), num_outputs(network, C)
"""

from .twohead import TWO_HEAD_NETWORKS, SegResNetTwoHead, is_two_head, num_outputs, split_heads

__all__ = ["TWO_HEAD_NETWORKS", "SegResNetTwoHead", "is_two_head", "num_outputs", "split_heads"]
