"""Sample grids as PNG (what people would rather look at than numbers)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path, cols: int | None = None, scale: int | None = None, pad: int = 1) -> Path:
    """Write ``images`` as one PNG grid; small images are enlarged (nearest) to at least 32 px per tile."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    scale = scale or max(1, 32 // max(h, w))
    th, tw = h * scale + pad, w * scale + pad
    grid = np.full((rows * th + pad, cols * tw + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        tile = x[i].repeat(scale, axis=0).repeat(scale, axis=1)
        r, k = divmod(i, cols)
        grid[pad + r * th: pad + r * th + h * scale, pad + k * tw: pad + k * tw + w * scale] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path
