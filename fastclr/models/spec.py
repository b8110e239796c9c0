"""What rebuilds an encoder and feeds it: the typed record saved with every checkpoint and export."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# Runs saved before the stage spec was recorded all had a 32-channel first stage and a flattened
# 7 x 7 last map, so their h width names the second stage's channels.
_LEGACY_28PX = "32|{}|flat0"
FILE_FACTS = ("weights_sha256",)
"""Keys an export's record holds about that file's weights, not about the network: not carried into a spec
that other weights (a fine-tuned copy, a checkpoint) are saved with."""


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder's architecture and input standardisation."""

    encoder: str
    """cnn, resnet18, resnet34, resnet50, or custom (a module given in Python: not rebuildable by name)."""
    in_channels: int
    image_size: int
    """Side of the square input the encoder was trained on."""
    width: float
    cifar_stem: str
    """on, off (ResNets), n/a (others)."""
    feature_dim: int
    """Dimension of h."""
    mean: tuple[float, ...]
    """Per-channel mean of the training images in [0, 1]."""
    std: tuple[float, ...]
    stages: str = ""
    """The cnn stage spec (fastclr.models.cnn.parse_stages); empty for other encoders."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Keys of a saved record this version does not know (kept, never read)."""

    @property
    def rebuildable(self) -> bool:
        """Whether `build` can make this architecture (false for a custom module)."""
        return self.encoder != "custom"

    def mean_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 (C,) on `device`."""
        return torch.tensor(self.mean, dtype=torch.float32, device=device)

    def std_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 (C,) on `device`."""
        return torch.tensor(self.std, dtype=torch.float32, device=device)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the `model_info` of checkpoints, the metadata of exports)."""
        d = asdict(self)
        extra = d.pop("extra")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        """Inverse of `to_dict`; also reads the records of earlier versions (no `stages` key)."""
        known = {"encoder", "in_channels", "image_size", "width", "cifar_stem", "feature_dim", "mean", "std", "stages"}
        stages = str(d.get("stages", ""))
        dim, image_size = int(d.get("feature_dim", 0)), int(d["image_size"])
        if not stages and d["encoder"] == "cnn" and image_size == 28 and dim % 49 == 0:
            # The recorded dimension has the width applied: the stage spec names the channels before it.
            width, channels = float(d["width"]), dim // 49
            named = round(channels / width)
            if max(8, int(round(named * width))) == channels:
                stages = _LEGACY_28PX.format(named)
        spec = cls(encoder=str(d["encoder"]), in_channels=int(d["in_channels"]), image_size=image_size,
                   width=float(d["width"]), cifar_stem=str(d["cifar_stem"]), feature_dim=dim,
                   mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]), stages=stages,
                   extra={k: v for k, v in d.items() if k not in known and k not in FILE_FACTS})
        # What no network has (a damaged or crafted record): said here, not as a failure to build one
        if not (1 <= spec.in_channels <= 64 and 1 <= spec.image_size <= 65536 and 0 < spec.width <= 64
                and len(spec.mean) == len(spec.std) == spec.in_channels and all(v > 0 for v in spec.std)):
            raise ValueError(f"{spec.in_channels} channels of {spec.image_size} px at width {spec.width:g} with "
                             f"{len(spec.mean)} means and {len(spec.std)} deviations")
        return spec
