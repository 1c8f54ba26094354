"""Pixel preprocessing as the official image processor does it, in numpy and PIL only (no torch), so
ingest can squash frames to the encoder's size without loading the model's dependencies."""

import functools

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def squash_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """One uint8 RGB frame [H, W, 3] -> [S, S, 3]: PIL bicubic in uint8, no crop, as the official processor.

    A frame already S x S is returned as is (PIL would copy it unchanged), so ingest can resize once,
    early, and the encoder's preprocessing stays exact.
    """
    if frame.shape[:2] == (size, size):
        return frame
    image = Image.fromarray(np.ascontiguousarray(frame))
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


@functools.cache
def _normalization_table() -> np.ndarray:
    """float32 ``[3, 256]``: the normalised value of every uint8 level in each channel.

    Rescaling and normalising act on each value independently, so a lookup gives
    bit-identical results to computing ``(x * (1/255) - mean) / std`` per pixel, as the
    official processor does (float64 rescale, float32 normalise), at a fraction of the cost.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None]
    table = (levels[None, :] - mean) / std
    table.flags.writeable = False
    return table


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB frames [T, S, S, 3] -> float32 [T, 3, S, S], rescaled to [0, 1] and ImageNet-normalised."""
    table = _normalization_table()
    out = np.empty((frames.shape[0], 3, *frames.shape[1:3]), dtype=np.float32)
    for channel in range(3):
        out[:, channel] = table[channel][frames[..., channel]]
    return out
