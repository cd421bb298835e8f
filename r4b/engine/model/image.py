"""AnyRes image preprocessing (tensor code) and the image-feature geometry shared by the model and the chat
template: best grid resolution, tile grid, unpadding and the resulting number of image tokens.

An image becomes a base view (the whole image resized to one tile) plus the tiles of the image resized into
the best grid resolution from ``image_grid_pinpoints`` (aspect ratio kept, centred, zero padded), as in
LLaVA-NeXT / LLaVA-OneVision.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import R4BConfig

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most image pixels when the image is fitted inside it,
    ties broken by the least wasted area."""
    best, best_eff, best_waste = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size of the image resized to fit inside (target_h, target_w) with its aspect ratio kept."""
    sw, sh = target_w / width, target_h / height
    if sw < sh:
        return min(math.ceil(height * sw), target_h), target_w
    return target_h, min(math.ceil(width * sh), target_w)


def tile_grid(height: int, width: int, pinpoints: list[list[int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of (height, width)."""
    bh, bw = select_best_resolution(height, width, pinpoints)
    return bh // tile, bw // tile


def unpadded_box(cur_h: int, cur_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the real image inside a padded (cur_h, cur_w) feature map of an image
    that was (height, width)."""
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def downsample_size(cur_h: int, cur_w: int, grid: int, max_num_patches: int) -> tuple[int, int] | None:
    """The size the unpadded feature map is bilinearly resized to when it holds more than about
    ``max_num_patches`` tiles of features (``anyres_max_N``), or None when it is kept."""
    ratio = math.sqrt(cur_h * cur_w / (max_num_patches * grid**2))
    if ratio > 1.1:
        return int(cur_h // ratio), int(cur_w // ratio)
    return None


def feature_map_size(height: int, width: int, cfg: R4BConfig) -> tuple[int, int]:
    """(rows, cols) of the tile features after unpadding and downsampling (before the newline column)."""
    g = cfg.vision_config.grid
    rows, cols = tile_grid(height, width, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    top, bottom, left, right = unpadded_box(rows * g, cols * g, height, width)
    h, w = bottom - top, right - left
    return downsample_size(h, w, g, cfg.max_num_patches) or (h, w)


def num_image_tokens(height: int, width: int, cfg: R4BConfig) -> int:
    """How many ``<image>`` tokens an image of (height, width) expands to: the base tile's features, then the
    unpadded tile features with one newline per row."""
    g = cfg.vision_config.grid
    h, w = feature_map_size(height, width, cfg)
    return g * g + h * (w + 1)


def to_chw_uint8(image) -> Tensor:
    """A PIL image or a uint8 tensor (3, H, W) / (H, W, 3) -> uint8 tensor (3, H, W), RGB."""
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or 3 not in (image.shape[0], image.shape[-1]):
            raise ValueError(f"image tensor must be uint8 (3, H, W) or (H, W, 3), got dtype={image.dtype} "
                             f"shape={tuple(image.shape)}")
        return image if image.shape[0] == 3 else image.permute(2, 0, 1)
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise TypeError("image must be a uint8 tensor (pillow is not installed)") from e
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image or a uint8 tensor, got {type(image).__name__}")
    rgb = image.convert("RGB")
    w, h = rgb.size
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(h, w, 3).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def resize(img: Tensor, height: int, width: int) -> Tensor:
    """Bicubic antialiased resize of a (3, H, W) float image in [0, 255], rounded and clamped like uint8."""
    if tuple(img.shape[-2:]) == (height, width):
        return img
    out = F.interpolate(img[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp_(0, 255).round_()


@dataclass(slots=True)
class ImageProcessor:
    """Image -> (pixel_values (1 + rows*cols, 3, S, S) float32, (height, width))."""

    tile_size: int = 384
    image_grid_pinpoints: tuple = ((384, 384),)
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD

    @classmethod
    def from_config(cls, cfg: R4BConfig, mean=SIGLIP_MEAN, std=SIGLIP_STD) -> ImageProcessor:
        return cls(cfg.vision_config.image_size, tuple(tuple(p) for p in cfg.image_grid_pinpoints), mean, std)

    @classmethod
    def from_pretrained(cls, path: str | Path, cfg: R4BConfig) -> ImageProcessor:
        """From the checkpoint's preprocessor_config.json when it has one (mean, std, pinpoints), else the
        config's geometry with SigLIP's mean/std."""
        p = Path(path) / "preprocessor_config.json"
        if not p.is_file():
            return cls.from_config(cfg)
        d = json.loads(p.read_text())
        pins = d.get("image_grid_pinpoints") or cfg.image_grid_pinpoints
        if [list(x) for x in pins] != [list(x) for x in cfg.image_grid_pinpoints]:
            raise ValueError(f"{p}: image_grid_pinpoints differ from the model config's; the token count would "
                             "not match the features")
        return cls(cfg.vision_config.image_size, tuple(tuple(x) for x in pins),
                   tuple(d.get("image_mean", SIGLIP_MEAN)), tuple(d.get("image_std", SIGLIP_STD)))

    def image_size(self, image) -> tuple[int, int]:
        if isinstance(image, Tensor):
            chw = to_chw_uint8(image)
            return int(chw.shape[1]), int(chw.shape[2])
        return image.size[1], image.size[0]  # PIL size is (width, height)

    def __call__(self, image) -> tuple[Tensor, tuple[int, int]]:
        img = to_chw_uint8(image).float()  # (3, H, W)
        H, W = int(img.shape[1]), int(img.shape[2])
        s = self.tile_size
        bh, bw = select_best_resolution(H, W, [list(p) for p in self.image_grid_pinpoints])
        nh, nw = fit_size(H, W, bh, bw)
        fitted = resize(img, nh, nw)
        top, left = (bh - nh) // 2, (bw - nw) // 2
        canvas = img.new_zeros(3, bh, bw)
        canvas[:, top : top + nh, left : left + nw] = fitted
        tiles = canvas.view(3, bh // s, s, bw // s, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)  # (n, 3, s, s)
        views = torch.cat([resize(img, s, s)[None], tiles], 0)  # (1 + n, 3, s, s)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (views / 255.0 - mean) / std, (H, W)
