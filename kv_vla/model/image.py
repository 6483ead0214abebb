"""Frame validation and preprocessing shared by the runtime and the training path.

Both paths must turn a camera frame into exactly the same pixel tensor, otherwise a policy trained
on whole episodes would see slightly different inputs when it runs step by step. Resizing uses
``torch.nn.functional.interpolate`` (bilinear, antialiased) so no PIL is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def validate_image(image: object) -> np.ndarray:
    """Return the frame as a contiguous ``HxWx3`` uint8 RGB array, or raise ValueError with the reason.

    Accepted: ``HxWx3`` uint8 RGB; ``HxWx4`` uint8 RGBA (alpha dropped); ``HxW`` uint8 greyscale
    (replicated to three channels). Everything else (other dtypes, float images, empty or
    non-finite shapes) is refused rather than guessed at, because a silently rescaled frame makes
    the policy act on an image it never saw in training.
    """
    if isinstance(image, torch.Tensor):
        raise ValueError("image must be a numpy uint8 array (HxWx3 RGB), got a torch.Tensor")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy uint8 array (HxWx3 RGB), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype must be uint8 (0..255 RGB), got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3:
        raise ValueError(f"image must be HxWx3 (or HxWx4 / HxW), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.shape[2] != 3:
        raise ValueError(f"image must have 3 (RGB) or 4 (RGBA) channels, got shape {image.shape}")
    return np.ascontiguousarray(image)


def frames_to_pixel_values(
    frames: np.ndarray | torch.Tensor,
    size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 frames ``[..., H, W, 3]`` -> normalised pixels ``[B, 3, size, size]`` (B = product of leading dims).

    Resizing happens in float32 before the cast to ``dtype`` so bf16 runs see the same interpolation.
    """
    x = torch.as_tensor(frames, device=device)
    if x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {x.dtype}")
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [..., H, W, 3], got {tuple(x.shape)}")
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)
