"""Aspect-ratio buckets, with the algorithm of kohya sd-scripts so datasets train the same way.

make_bucket_resolutions: for widths from min_size to max_size in steps of `divisible`, the largest
height (a multiple of `divisible`, ≤ max_size) keeping width × height ≤ resolution², both ways
round, plus the square. An image goes to the bucket whose aspect ratio is closest, is scaled to
cover it and centre-cropped. With no_upscale, images smaller than the area keep their size and the
bucket is their size rounded down to `divisible`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def make_bucket_resolutions(resolution: int, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    max_area = resolution * resolution
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    bucket: tuple[int, int]  # (width, height) the image trains at
    resized: tuple[int, int]  # (width, height) after scaling, before the centre crop

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """Pixels removed at the top and left by the centre crop (SDXL's crop conditioning)."""
        return (self.resized[1] - self.bucket[1]) // 2, (self.resized[0] - self.bucket[0]) // 2


class BucketSelector:
    def __init__(self, resolution: int, *, enable: bool = True, min_size: int = 256, max_size: int = 1024,
                 steps: int = 64, no_upscale: bool = False):
        self.max_area = resolution * resolution
        self.steps = steps
        self.no_upscale = no_upscale and enable
        if enable:
            self.resos = make_bucket_resolutions(resolution, min_size, max_size, steps)
        else:  # one square bucket: every image is scaled to cover it and centre-cropped
            self.resos = [(resolution, resolution)]
        self._ratios = [w / h for w, h in self.resos]

    def select(self, width: int, height: int) -> BucketChoice:
        aspect = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self.resos:
                errors = [abs(r - aspect) for r in self._ratios]
                reso = self.resos[errors.index(min(errors))]  # first minimum, like numpy argmin
            if aspect > reso[0] / reso[1]:  # wider than the bucket: match heights
                scale = reso[1] / height
            else:
                scale = reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
            return BucketChoice(reso, resized)
        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * aspect)
            rh = self.max_area / rw
            bw = self._round(rw)
            bh_in_w = self._round(bw / aspect)
            bh = self._round(rh)
            bw_in_h = self._round(bh * aspect)
            if abs(bw / bh_in_w - aspect) < abs(bw_in_h / bh - aspect):
                resized = (bw, int(bw / aspect + 0.5))
            else:
                resized = (int(bh * aspect + 0.5), bh)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return BucketChoice(bucket, resized)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps
