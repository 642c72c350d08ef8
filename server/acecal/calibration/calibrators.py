"""Post-hoc calibrators: modules that rescale a frozen network's logits by a positive temperature per voxel.

Every calibrator computes

    calibrated_logits = logits / T(logits, image),   T > 0, shape (B, 1, spatial...) or a scalar

so for every voxel the calibrated logits are the raw ones times a positive number: the argmax, hence the label map
and its Dice, cannot change. Only the confidence does.

- :class:`TemperatureCalibrator`: one global T (Guo et al., ICML 2017), here fitted for ACE rather than NLL
  (:func:`acecal.calibration.fit_ace_temperature`).
- :class:`LocalTemperatureCalibrator`: local temperature scaling (Ding et al., "Local Temperature Scaling for
  Probability Calibration", ICCV 2021): a small 3-D convolutional network on the logits (and the image) predicts a
  temperature per voxel, ``T(x) = t_min + softplus(f(x))``. The last layer starts at zero with the bias set so that
  ``T(x) = init_temperature`` everywhere: an untrained LTS is exactly the global temperature it starts from.

The LTS network sees the logits centred over the classes (``z - mean_c z``, to which the softmax is blind) and
scaled by ``logit_scale``, and, when ``use_image``, the normalised image. Its convolutions pad by replication, so a
volume can be processed in tiles with a halo of the receptive radius and give bit-for-bit the same temperatures as in
one piece (:meth:`Calibrator.calibrate` does that for large volumes; memory is then bounded by the tile).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from acecal.errors import InvalidInputError

__all__ = [
    "Calibrator",
    "TemperatureCalibrator",
    "LocalTemperatureCalibrator",
    "build_calibrator",
    "CALIBRATOR_KINDS",
]

#: Admissible range of a fitted global temperature and of every per-voxel temperature.
T_MIN = 0.05
T_MAX = 20.0
#: Largest tile (voxels per side, halo included) a calibrator network is run on in one piece.
DEFAULT_TILE = 96


def _inverse_softplus(y: float) -> float:
    """x with softplus(x) = y > 0 (stable for large y)."""
    return y + math.log(-math.expm1(-y))


class Calibrator(nn.Module):
    """Base class: ``forward(logits (B, C, spatial...), image (B, Cin, spatial...) or None)`` -> calibrated logits.

    Subclasses implement :meth:`temperature` (positive, broadcastable against the logits) and :meth:`spec` (the
    JSON-able constructor arguments stored in ``bundle.json``).
    """

    kind: ClassVar[str] = ""
    #: whether the calibrator has trainable weights that are stored in a file next to ``bundle.json``
    has_weights: ClassVar[bool] = False
    #: voxels of context each side a temperature depends on (0 = voxel-wise or global)
    receptive_radius: int = 0

    def temperature(self, logits: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Calibrated logits, same shape and dtype as ``logits`` (B, C, spatial...)."""
        return logits / self.temperature(logits, image).to(logits.dtype)

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def calibrate(
        self, logits: torch.Tensor, image: Optional[torch.Tensor] = None, *, tile: int = DEFAULT_TILE
    ) -> torch.Tensor:
        """Inference-time :meth:`forward` (no gradient, eval mode) with bounded memory on large volumes.

        A calibrator with spatial context runs over tiles of at most ``tile`` voxels per side, each read with a halo
        of :attr:`receptive_radius` voxels and cropped back, so the result equals the one-piece result exactly.

        Args:
            logits: (B, C, x, y, z) raw network logits in model space.
            image: (B, Cin, x, y, z) the normalised model-space image the logits came from (needed by calibrators
                that look at it; ignored by the others).
        """
        was_training = self.training
        self.eval()
        try:
            if self.receptive_radius == 0 or all(s <= tile for s in logits.shape[2:]):
                return self(logits, image)
            return self._tiled(logits, image, tile)
        finally:
            self.train(was_training)

    def _tiled(self, logits: torch.Tensor, image: Optional[torch.Tensor], tile: int) -> torch.Tensor:
        r = self.receptive_radius
        core = tile - 2 * r
        if core < 1:
            raise InvalidInputError(f"tile {tile} is too small for a receptive radius of {r} voxels")
        spatial = logits.shape[2:]
        out = torch.empty_like(logits)
        starts = [range(0, s, core) for s in spatial]
        for x0 in starts[0]:
            for y0 in starts[1]:
                for z0 in starts[2]:
                    lo = [max(0, a - r) for a in (x0, y0, z0)]
                    hi = [min(s, a + core + r) for a, s in zip((x0, y0, z0), spatial, strict=True)]
                    win = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
                    t = self.temperature(logits[win], None if image is None else image[win])
                    inner = tuple(
                        slice(a - low, min(a + core, s) - low)
                        for a, low, s in zip((x0, y0, z0), lo, spatial, strict=True)
                    )
                    dst = (slice(None), slice(None)) + tuple(
                        slice(a, min(a + core, s)) for a, s in zip((x0, y0, z0), spatial, strict=True)
                    )
                    out[dst] = logits[dst] / t[(slice(None), slice(None)) + inner].to(logits.dtype)
        return out


class TemperatureCalibrator(Calibrator):
    """One global temperature: ``logits / T``."""

    kind: ClassVar[str] = "temperature"
    t: torch.Tensor  # the registered buffer

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        try:
            t = float(temperature)
        except (TypeError, ValueError):
            raise InvalidInputError(f"temperature must be a number, got {temperature!r}") from None
        # any finite T > 0 (bundles written before calibrators may hold any fitted value); fitting is bounded
        if not math.isfinite(t) or t <= 0:
            raise InvalidInputError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.register_buffer("t", torch.tensor(t, dtype=torch.float32))

    @property
    def value(self) -> float:
        return float(self.t)

    def temperature(self, logits: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.t

    def spec(self) -> dict[str, Any]:
        return {"temperature": self.value}


class LocalTemperatureCalibrator(Calibrator):
    """Local temperature scaling: a per-voxel temperature from a small 3-D CNN on (centred logits, image).

    Args:
        num_classes: C, channels of the logits.
        in_channels: Cin, channels of the image (used when ``use_image``).
        hidden: feature channels of the hidden layers.
        layers: number of hidden 3x3x3 convolutions (each followed by a LeakyReLU), >= 1.
        kernel_size: odd kernel size of the hidden convolutions.
        dilation: dilation of the hidden convolutions after the first (a wider context for the same weights).
        use_image: feed the image next to the logits.
        logit_scale: the centred logits are multiplied by this before the network (keeps inputs O(1)).
        init_temperature: T(x) at initialisation, everywhere.
        t_min: lower bound of T(x) (T = t_min + softplus(f)).

    Shapes:
        logits (B, C, x, y, z), image (B, Cin, x, y, z) -> temperature (B, 1, x, y, z).
    """

    kind: ClassVar[str] = "local_temperature"
    has_weights: ClassVar[bool] = True

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        *,
        hidden: int = 8,
        layers: int = 2,
        kernel_size: int = 3,
        dilation: int = 1,
        use_image: bool = True,
        logit_scale: float = 0.1,
        init_temperature: float = 1.0,
        t_min: float = T_MIN,
    ):
        super().__init__()
        # bundle.json may come from anyone: bound the architecture so a config cannot ask for a huge network
        checks = {
            "num_classes": (num_classes, 2, 1024),
            "in_channels": (in_channels, 1, 64),
            "hidden": (hidden, 1, 128),
            "layers": (layers, 1, 8),
            "kernel_size": (kernel_size, 1, 7),
            "dilation": (dilation, 1, 8),
        }
        for name, (v, lo, hi) in checks.items():
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidInputError(f"local temperature: {name} must be an integer in [{lo}, {hi}], got {v!r}")
        if kernel_size % 2 == 0:
            raise InvalidInputError(f"local temperature: kernel_size must be odd, got {kernel_size}")
        for name, x in (("logit_scale", logit_scale), ("init_temperature", init_temperature), ("t_min", t_min)):
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x <= 0:
                raise InvalidInputError(f"local temperature: {name} must be a finite number > 0, got {x!r}")
        if not t_min < init_temperature <= T_MAX:
            raise InvalidInputError(
                f"local temperature: init_temperature must lie in ({t_min}, {T_MAX}], got {init_temperature}"
            )
        self.num_classes, self.in_channels = num_classes, in_channels
        self.hidden, self.layers, self.kernel_size, self.dilation = hidden, layers, kernel_size, dilation
        self.use_image, self.logit_scale = bool(use_image), float(logit_scale)
        self.init_temperature, self.t_min = float(init_temperature), float(t_min)
        mods: list[nn.Module] = []
        ch = num_classes + (in_channels if use_image else 0)
        radius = 0
        for i in range(layers):
            d = 1 if i == 0 else dilation
            pad = (kernel_size // 2) * d
            radius += pad
            mods += [
                nn.Conv3d(ch, hidden, kernel_size, padding=pad, dilation=d, padding_mode="replicate"),
                nn.LeakyReLU(0.1),
            ]
            ch = hidden
        self.body = nn.Sequential(*mods)
        self.head = nn.Conv3d(ch, 1, 1)
        self.receptive_radius = radius
        self.reset_head()

    def reset_head(self, init_temperature: Optional[float] = None) -> None:
        """Make T(x) = ``init_temperature`` (default: the constructor's) everywhere: zero head weights, fitted bias."""
        if init_temperature is not None:
            self.init_temperature = float(init_temperature)
        assert self.head.bias is not None  # built with a bias
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.fill_(_inverse_softplus(self.init_temperature - self.t_min))

    def features(self, logits: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
        if logits.ndim != 5 or logits.shape[1] != self.num_classes:
            raise InvalidInputError(
                f"local temperature: logits must be (B, {self.num_classes}, x, y, z), got {tuple(logits.shape)}"
            )
        z = logits.float()
        z = (z - z.mean(dim=1, keepdim=True)) * self.logit_scale
        if not self.use_image:
            return z
        if (
            image is None
            or image.ndim != 5
            or image.shape[1] != self.in_channels
            or image.shape[2:] != logits.shape[2:]
        ):
            raise InvalidInputError(
                f"local temperature: needs the image (B, {self.in_channels}, x, y, z) on the logits' grid "
                f"{tuple(logits.shape[2:])}, got {None if image is None else tuple(image.shape)}"
            )
        return torch.cat([z, image.to(z.device, z.dtype)], dim=1)

    def temperature(self, logits: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.t_min + nn.functional.softplus(self.head(self.body(self.features(logits, image))))

    def spec(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "hidden": self.hidden,
            "layers": self.layers,
            "kernel_size": self.kernel_size,
            "dilation": self.dilation,
            "use_image": self.use_image,
            "logit_scale": self.logit_scale,
            "init_temperature": self.init_temperature,
            "t_min": self.t_min,
        }


CALIBRATOR_KINDS: dict[str, type[Calibrator]] = {
    TemperatureCalibrator.kind: TemperatureCalibrator,
    LocalTemperatureCalibrator.kind: LocalTemperatureCalibrator,
}


def build_calibrator(kind: str, params: dict[str, Any]) -> Calibrator:
    """A calibrator from its kind and :meth:`Calibrator.spec` (unknown kinds or arguments are input errors)."""
    cls = CALIBRATOR_KINDS.get(kind)
    if cls is None:
        raise InvalidInputError(f"unknown calibrator kind {kind!r}; known: {sorted(CALIBRATOR_KINDS)}")
    if not isinstance(params, dict):
        raise InvalidInputError(f"calibrator parameters must be an object, got {type(params).__name__}")
    try:
        return cls(**params)
    except TypeError as e:
        raise InvalidInputError(f"bad parameters for calibrator {kind!r}: {e}") from None
