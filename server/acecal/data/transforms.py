"""The deterministic MONAI transform chain into a bundle's model space, shared by training, evaluation and inference.

Model space = the bundle's orientation (``Orientationd``), voxel spacing (``Spacingd``) and intensity normalisation.
Training appends patch sampling and augmentation to this chain; inference runs it, then maps predictions back with
MONAI's ``Invertd`` onto the input's exact grid. One chain, so the model sees the same thing in both.
"""

from __future__ import annotations

from typing import Optional

from monai import transforms as mt

from acecal.bundles import BundleConfig
from acecal.data.io import SimpleITKReader

IMAGE = "image"
LABEL = "label"


def intensity_transform(config: BundleConfig, key: str = IMAGE) -> mt.MapTransform:
    """The bundle's intensity normalisation as a MONAI dictionary transform on ``key``."""
    it = config.intensity
    if it.mode == "zscore_nonzero":
        return mt.NormalizeIntensityd(keys=key, nonzero=True, channel_wise=True)
    if it.mode == "zscore":
        return mt.NormalizeIntensityd(keys=key, nonzero=False, channel_wise=True)
    assert it.a_min is not None and it.a_max is not None  # IntensityConfig: clip_scale has both
    return mt.ScaleIntensityRanged(keys=key, a_min=it.a_min, a_max=it.a_max, b_min=it.b_min, b_max=it.b_max, clip=True)


def model_space_transforms(
    config: BundleConfig,
    *,
    label_key: Optional[str] = LABEL,
    load: bool = True,
) -> mt.Compose:
    """Load (optional) -> channel first -> orientation -> spacing -> intensity normalisation.

    Args:
        config: the bundle whose model space to map into.
        label_key: also carry a label map (nearest-neighbour resampling, integer values kept); None for images only.
        load: start from file paths (``LoadImaged`` with SimpleITK); False when the dict already holds
            channel-first ``MetaTensor`` s (inference builds them with :func:`acecal.data.io.to_metatensor`).

    Returns:
        a ``Compose`` whose output is {"image": (in_channels, x, y, z) float32 MetaTensor, "label": (1, x, y, z)}.
    """
    keys = [IMAGE] + ([label_key] if label_key else [])
    modes = ["bilinear"] + (["nearest"] if label_key else [])
    chain = []
    if load:
        chain += [
            # MONAI takes a reader instance too; its annotation names only classes and names
            mt.LoadImaged(keys=keys, reader=SimpleITKReader(), image_only=True),  # type: ignore[arg-type]
            mt.EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        ]
    chain += [
        mt.EnsureTyped(keys=IMAGE, dtype="float32", track_meta=True),
        mt.Orientationd(keys=keys, axcodes=config.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys=keys, pixdim=config.spacing, mode=modes),
        intensity_transform(config, IMAGE),
    ]
    if label_key:
        chain.append(
            mt.EnsureTyped(keys=label_key, dtype="uint8" if config.num_classes < 256 else "int64", track_meta=True)
        )
    return mt.Compose(chain)
