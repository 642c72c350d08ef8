"""Model bundles (self-describing, immutable folders) and the model registry."""

from acecal.bundles.bundle import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    Bundle,
    BundleConfig,
    CalibratorConfig,
    IntensityConfig,
    LossRecord,
    NetworkConfig,
    build_network,
    write_bundle,
)
from acecal.bundles.registry import ModelRegistry, default_data_dir, default_models_dir, resolve_bundle

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Bundle",
    "BundleConfig",
    "CalibratorConfig",
    "IntensityConfig",
    "LossRecord",
    "NetworkConfig",
    "build_network",
    "write_bundle",
    "ModelRegistry",
    "default_data_dir",
    "default_models_dir",
    "resolve_bundle",
]
