"""Images as calibration data (Pillow): resized, scaled and normalised per channel, NCHW or NHWC."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np

from bnscope.data.batching import FileEntry, SampleSource, display_name, stream_entries
from bnscope.data.spec import (
    DataSource,
    Feed,
    InputSpec,
    format_shape,
    one_line,
    quoted_names,
)
from bnscope.errors import BnscopeError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


@dataclass(frozen=True)
class ImageOptions:
    """How images become an input tensor: ``(pixels * scale - mean) / std``, per channel.

    Attributes:
        size: (height, width) to resize to (bilinear). Defaults to the model's fixed H and W.
        layout: "NCHW" or "NHWC". Defaults to a guess: the axis (1 or 3) of size 3 or 1.
        mean: per-channel mean (or one value for all), applied after scaling. Defaults to 0.
        std: per-channel std (or one value for all). Defaults to 1.
        scale: pixel scale factor. Defaults to 1/255 (pixels in [0, 1]).
    """

    size: tuple[int, int] | None = None
    layout: str | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255


@dataclass(frozen=True)
class _ImagePlan:
    spec: InputSpec
    layout: str
    channels: int
    size: tuple[int, int]
    mean: np.ndarray
    std: np.ndarray
    scale: float


def open_images(where: Path, paths: list[Path], inputs: list[InputSpec], options: ImageOptions) -> DataSource:
    """A sample source of one image per sample, for a single-input model."""
    pil = _import_pil()
    if len(inputs) != 1:
        raise BnscopeError(
            f"images feed single-input models, but the model has inputs {quoted_names(inputs)}. "
            "Hint: use an .npz with one array per input, or a loader script"
        )
    plan = _image_plan(inputs[0], options)
    entries = [FileEntry(p, 1, {plan.spec.name: True}, partial(_load_image, p, pil, plan)) for p in paths]
    height, width = plan.size

    description = f"{display_name(where)} ({len(paths)} images, {height}x{width} {plan.layout})"
    return SampleSource(description, len(paths), False, inputs, partial(stream_entries, entries))


def _import_pil() -> ModuleType:
    try:
        from PIL import Image
    except ImportError as exc:
        raise BnscopeError(
            "reading images needs Pillow, which is not installed. Hint: pip install 'bnscope[images]'"
        ) from exc
    return Image


def _image_plan(spec: InputSpec, options: ImageOptions) -> _ImagePlan:
    if len(spec.shape) != 4:
        raise BnscopeError(
            f"input '{spec.name}' has shape {format_shape(spec.shape)}, not an image batch [N,C,H,W] or [N,H,W,C]. "
            "Hint: feed .npy/.npz data instead"
        )
    layout = options.layout or _guess_layout(spec)
    if layout not in ("NCHW", "NHWC"):
        raise BnscopeError(f"image layout {layout!r} is not NCHW or NHWC. Hint: choose NCHW or NHWC")
    channel_axis, hw_axes = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    channels = spec.shape[channel_axis] if isinstance(spec.shape[channel_axis], int) else 3
    if channels not in (1, 3):
        raise BnscopeError(
            f"input '{spec.name}' has {channels} channels in {layout}; images give 1 (grayscale) or 3 (RGB). "
            "Hint: check the layout, or feed .npy/.npz data"
        )
    size = options.size or tuple(spec.shape[a] for a in hw_axes)
    if len(size) != 2 or not all(isinstance(d, int) and d > 0 for d in size):
        raise BnscopeError(
            f"input '{spec.name}' has no fixed height and width {format_shape(spec.shape)}. "
            "Hint: give an image size (height, width)"
        )
    mean, std = (np.asarray(v, dtype=np.float32).reshape(-1) for v in (options.mean, options.std))
    if mean.size not in (1, channels) or std.size not in (1, channels) or not np.all(std != 0):
        raise BnscopeError(
            f"image mean {options.mean} / std {options.std} do not fit {channels} channels. "
            f"Hint: give 1 or {channels} values each, std nonzero"
        )
    return _ImagePlan(spec, layout, channels, (int(size[0]), int(size[1])), mean, std, options.scale)


def _guess_layout(spec: InputSpec) -> str:
    if spec.shape[1] in (1, 3):
        return "NCHW"
    if spec.shape[3] in (1, 3):
        return "NHWC"
    raise BnscopeError(
        f"cannot tell the image layout of input '{spec.name}' {format_shape(spec.shape)}. Hint: give the layout, NCHW or NHWC"
    )


def _load_image(path: Path, pil: ModuleType, plan: _ImagePlan) -> Feed:
    height, width = plan.size
    bilinear = getattr(pil, "Resampling", pil).BILINEAR
    try:
        with pil.open(path) as image:
            pixels = np.asarray(image.convert("RGB" if plan.channels == 3 else "L").resize((width, height), bilinear))
    except (OSError, ValueError, SyntaxError, pil.DecompressionBombError) as exc:
        raise BnscopeError(
            f"cannot read image {path}: {one_line(exc)}. Hint: check the file or remove it from the folder"
        ) from exc
    pixels = pixels.reshape(height, width, plan.channels)
    if plan.spec.dtype.kind == "f":
        pixels = (pixels.astype(np.float32) * plan.scale - plan.mean) / plan.std
    if plan.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return {plan.spec.name: pixels.astype(plan.spec.dtype)}  # one sample, no batch axis
