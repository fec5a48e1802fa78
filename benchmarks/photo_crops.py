"""Calibration and evaluation inputs from photos that ship inside scikit-image and scikit-learn.

Random square crops, resized to the model's input size, normalised the way the model expects
(ImageNet mean/std on [0, 1] RGB for Paddle and torchvision models). Two seeds give two disjoint
draws of crops: one to calibrate, one to evaluate.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def bundled_photos() -> list[np.ndarray]:
    """The RGB photos of skimage.data and sklearn's sample images, as uint8 HxWx3 arrays."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    photos += list(load_sample_images().images)
    return [np.asarray(p)[..., :3] for p in photos]


def photo_crops(count: int, size: int | tuple[int, int], seed: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=1.0):
    """``count`` crops as float32 NCHW, ``(pixel / 255 * scale - mean) / std``."""
    from PIL import Image

    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    out = np.empty((count, 3, height, width), dtype=np.float32)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(crop, dtype=np.float32) / 255.0 * scale
        out[i] = ((pixels - mean) / std).transpose(2, 0, 1)
    return out
