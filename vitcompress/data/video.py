"""``video:[N:]SOURCE``: synthetic video clips with temporal redundancy, made from SOURCE's images (seeded).

No small, installable video set has labels that the image models here can be scored on, so the clips are
generated, and every table that uses them says *synthetic*. Clip ``i`` shows one SOURCE image (the object,
scaled to 3/4 of the frame, its label the clip's label) moving slowly (at most half a pixel per frame in each
direction, bouncing off the edges) over another SOURCE image upscaled 2x as the background: static in group 0
(``static``), slowly panning (a quarter to half a pixel per frame) in group 1 (``panning``). Frames are composed
from the preprocessed (normalised) images: pasting and resizing commute with the per-channel normalisation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError
from .base import ImageData

CLIPS_DEFAULT = 200
FRAMES = 16
GROUPS = ["static", "panning"]


def _bounce(start: float, v: float, t: int, span: int) -> int:
    """Position at frame t of a point moving at v px/frame from ``start`` inside [0, span], reflected at its ends."""
    if span <= 0:
        return 0
    p = (start + v * t) % (2 * span)
    return int(round(p if p <= span else 2 * span - p))


class SyntheticClips(Dataset):
    """Items ``(clip [T,3,H,W], label, group)``, each a deterministic function of its index and the source."""

    def __init__(self, source: Dataset, n: int, frames: int = FRAMES):
        self.source, self.n, self.frames = source, n, frames

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        gen = torch.Generator().manual_seed(i)
        m = len(self.source)  # type: ignore[arg-type]
        obj_img, label, _ = self.source[(i * 7919) % m]  # spread over the source (a prime stride)
        bg_img = self.source[(i * 7919 + 1 + int(torch.randint(m - 1, (1,), generator=gen))) % m][0]
        _, h, w = obj_img.shape
        s = max(1, round(0.75 * min(h, w)))
        obj = F.interpolate(obj_img[None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
        bg = F.interpolate(bg_img[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
        u = torch.rand(6, generator=gen).tolist()
        group = i % 2
        oy, ox = u[0] * (h - s), u[1] * (w - s)
        vy, vx = u[2] - 0.5, u[3] - 0.5
        by, bx = u[4] * h, u[5] * w
        angle = 2 * math.pi * u[4]
        speed = (0.25 + 0.25 * u[5]) if group == 1 else 0.0
        clip = torch.empty(self.frames, *obj_img.shape, dtype=obj_img.dtype)
        for t in range(self.frames):
            cy, cx = _bounce(by, speed * math.sin(angle), t, h), _bounce(bx, speed * math.cos(angle), t, w)
            frame = bg[:, cy:cy + h, cx:cx + w].clone()
            py, px = _bounce(oy, vy, t, h - s), _bounce(ox, vx, t, w - s)
            frame[:, py:py + s, px:px + s] = obj
            clip[t] = frame
        return clip, int(label), group


def load_video(spec: str, data_cfg: dict[str, Any], limit: int | None,
               load: Callable[[str, dict[str, Any], str | None, int | None, str], ImageData]) -> ImageData:
    """``video:[N:]SOURCE``: N (default 200) synthetic clips of 16 frames from SOURCE's evaluation images."""
    rest = spec[len("video:"):]
    head, _, tail = rest.partition(":")
    n, source = (int(head), tail) if head.isdigit() and tail else (CLIPS_DEFAULT, rest)
    if not source or n < 1:
        raise DataError(f"video data is video:[N:]SOURCE with N >= 1 (e.g. video:200:PATH), got '{spec}'")
    src = load(source, data_cfg, None, None, "eval")
    if not src.has_labels or len(src) < 2:
        raise DataError(f"video clips need a labelled SOURCE of 2 or more images; '{source}' is not")
    n = min(n, limit) if limit else n
    return dataclasses.replace(
        src, dataset=SyntheticClips(src.dataset, n), name=spec, split=f"synthetic video of {src.split}",
        groups=list(GROUPS), provenance={"synthetic": True, "source": src.describe(), "clips": n,
                                         "frames": FRAMES, "object": "3/4 of the frame"})
