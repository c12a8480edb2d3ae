"""Hugging Face image models (`*ForImageClassification`: ViT, ResNet, ConvNeXt, ...): one input,
`pixel_values` (batch, channels, height, width) float32, at the size and normalisation of the
model's image processor config (preprocessor_config.json), read as JSON so that neither PIL nor
torchvision is needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.reference.samples import natural_images
from toolkit.spec import Dim, ModelSpec, TensorSpec

__all__ = ["image_spec"]

_SAMPLE_ROWS = 256
_PROCESSOR_FILE = "preprocessor_config.json"


def image_spec(path: Path, module: Any, config: Any, architecture: str) -> ModelSpec:
    """The spec of `module` (pixel_values → logits), with natural-looking images, normalised as the
    processor does, as held-out and calibration inputs."""
    channels, height, width, mean, std = _processor(path, config)

    def images(rows: int, seed: int) -> dict[str, np.ndarray]:
        pixels = natural_images(rows, channels, height, width, seed=seed)
        return {"pixel_values": ((pixels - mean[:, None, None]) / std[:, None, None]).astype(np.float32)}

    return ModelSpec(
        module=module.eval(),
        inputs=[TensorSpec("pixel_values", "float32", ("batch", channels, height, width))],
        outputs=["logits"],
        dims=[Dim("batch", export=2, check=(1, 3))],
        task="classify",
        description=f"{architecture} from {path} (logits over {config.num_labels} classes, {channels}×{height}×{width} images)",
        sample_data=lambda: images(_SAMPLE_ROWS, seed=1),
        calibration_data=lambda n: images(n, seed=2),
    )


def _processor(path: Path, config: Any) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """(channels, height, width, mean, std) of the images the model takes: the size after the
    processor's resize and centre crop, else the config's image_size."""
    settings = json.loads((path / _PROCESSOR_FILE).read_text()) if (path / _PROCESSOR_FILE).is_file() else {}
    channels = int(getattr(config, "num_channels", 3))
    size = _size(settings.get("crop_size") if settings.get("do_center_crop", "crop_size" in settings) else None) or \
        _size(settings.get("size")) or _size(getattr(config, "image_size", None))
    if size is None:
        raise ToolkitError(f"hf:{path}: no image size: neither {_PROCESSOR_FILE} (size, crop_size) nor the config (image_size) gives one.")
    normalise = settings.get("do_normalize", True)
    mean = np.asarray(settings.get("image_mean", 0.5) if normalise else 0.0, dtype=np.float32) * np.ones(channels, np.float32)
    std = np.asarray(settings.get("image_std", 0.5) if normalise else 1.0, dtype=np.float32) * np.ones(channels, np.float32)
    return channels, *size, mean, std


def _size(value: Any) -> tuple[int, int] | None:
    """(height, width) from a processor's size field ({"height", "width"}, {"shortest_edge"}, an int)
    or a config's image_size (an int or a pair)."""
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        edge = value.get("shortest_edge")
        return (int(edge), int(edge)) if edge else None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return (int(value), int(value)) if isinstance(value, int) else None
