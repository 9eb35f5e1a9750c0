"""Augmentations taken from the winning solutions, as albumentations 2.0 transforms usable by name in the config.

- `DateStamp` and `RedDot` (10th place, "artifact augmentation", reported +0.01 on the private LB): about a quarter
  of the competition photos carry a camera's orange date overlay and some carry small red markers; drawing them at
  random on any training image teaches the model that they say nothing about the biomass.
- `VerticalStripShuffle` (3rd place): cut the image into a few vertical strips of equal width and permute them.
  Biomass is a property of the whole quadrat, not of where the grass sits in it.

`build_augment` (biomass.data.images) looks a `name` up in `TRANSFORMS` first, then in albumentations. Every random
draw comes from the transform's own `py_random` / `random_generator`, which `Compose.set_random_seed` reseeds, so an
image's augmentation stays a function of (seed, epoch, image index). Arguments are validated by each class's pydantic
`InitSchema` (albumentations' metaclass runs it on construction), so a bad value fails with a message naming it.
Images are expected as uint8 RGB (H, W, 3); colours are RGB triples.
"""
from __future__ import annotations

from typing import Annotated, Any

import biomass  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations is imported)

import albumentations as A
import cv2
import numpy as np
from albumentations.core.pydantic import check_range_bounds, nondecreasing
from albumentations.core.transforms_interface import BaseTransformInitSchema
from pydantic import AfterValidator

__all__ = ["DateStamp", "RedDot", "VerticalStripShuffle", "TRANSFORMS"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_HEIGHT = cv2.getTextSize("0123456789", _FONT, 1.0, 1)[0][1]  # digit height in pixels at fontScale 1


def _hw(params: dict[str, Any]) -> tuple[int, int]:
    return int(params["shape"][0]), int(params["shape"][1])


class DateStamp(A.ImageOnlyTransform):
    """Orange camera date overlay (`2015/09/04`) drawn in a random corner of the image.

    From the 10th place solution's artifact augmentation (date stamps and red dots, +0.01 private LB): about a quarter
    of the real photos carry such a stamp, so the model should learn to ignore it. Each application draws a date
    (`year_range`, any month, day 1-28), a corner, a margin of 1-3% of the image side, a text height of
    `height_range` times the image height, and an orange colour (R 215-255, G 100-160, B 0-45). The digits are
    drawn anti-aliased with OpenCV's Hershey simplex font, shrunk if the text would be wider than the image.

    Args:
        height_range: text height as a fraction of the image height, (min, max) in (0, 0.5].
        year_range: years to draw the date from, (min, max).
        p: probability of applying the transform.
    """

    class InitSchema(BaseTransformInitSchema):
        height_range: Annotated[tuple[float, float], AfterValidator(check_range_bounds(0, 0.5, min_inclusive=False)),
                                AfterValidator(nondecreasing)]
        year_range: Annotated[tuple[int, int], AfterValidator(check_range_bounds(1900, 2099)),
                              AfterValidator(nondecreasing)]

    def __init__(self, height_range: tuple[float, float] = (0.035, 0.06), year_range: tuple[int, int] = (2014, 2017),
                 p: float = 0.5):
        super().__init__(p=p)
        self.height_range = height_range
        self.year_range = year_range

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = _hw(params)
        rnd = self.py_random
        text = f"{rnd.randint(*self.year_range):04d}/{rnd.randint(1, 12):02d}/{rnd.randint(1, 28):02d}"
        corner = rnd.randrange(4)  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
        margin_x, margin_y = round(rnd.uniform(0.01, 0.03) * w), round(rnd.uniform(0.01, 0.03) * h)
        height = max(3.0, rnd.uniform(*self.height_range) * h)
        color = (rnd.uniform(215, 255), rnd.uniform(100, 160), rnd.uniform(0, 45))
        thickness = max(1, round(height / 8))
        scale = height / _FONT_HEIGHT
        (tw, th), _ = cv2.getTextSize(text, _FONT, scale, thickness)
        if tw > w - 2 * margin_x:  # too wide for a narrow image: shrink to fit
            scale *= max(w - 2 * margin_x, 1) / tw
            (tw, th), _ = cv2.getTextSize(text, _FONT, scale, thickness)
        x = margin_x if corner in (0, 2) else w - margin_x - tw
        y = margin_y + th if corner in (0, 1) else h - margin_y - thickness
        return {"text": text, "org": (int(x), int(y)), "scale": scale, "thickness": thickness, "color": color}

    def apply(self, img: np.ndarray, text: str, org: tuple[int, int], scale: float, thickness: int,
              color: tuple[float, float, float], **params: Any) -> np.ndarray:
        out = np.ascontiguousarray(img).copy()
        cv2.putText(out, text, org, _FONT, scale, color, thickness, cv2.LINE_AA)
        return out


class RedDot(A.ImageOnlyTransform):
    """A few small filled red circles at random positions, like the markers seen on some of the photos.

    From the 10th place solution's artifact augmentation (date stamps and red dots, +0.01 private LB). Each
    application draws a number of dots from `count_range`, for each a radius of `radius_range` times the image's
    short side (at least 1 pixel) and a centre that keeps the whole dot inside the image, and one red colour for all
    of them (R 190-255, G 0-50, B 0-50). Dots are drawn anti-aliased.

    Args:
        count_range: number of dots, (min, max), at least 1.
        radius_range: dot radius as a fraction of the image's short side, (min, max) in (0, 0.5].
        p: probability of applying the transform.
    """

    class InitSchema(BaseTransformInitSchema):
        count_range: Annotated[tuple[int, int], AfterValidator(check_range_bounds(1)), AfterValidator(nondecreasing)]
        radius_range: Annotated[tuple[float, float], AfterValidator(check_range_bounds(0, 0.5, min_inclusive=False)),
                                AfterValidator(nondecreasing)]

    def __init__(self, count_range: tuple[int, int] = (1, 3), radius_range: tuple[float, float] = (0.006, 0.015),
                 p: float = 0.5):
        super().__init__(p=p)
        self.count_range = count_range
        self.radius_range = radius_range

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = _hw(params)
        rnd = self.py_random
        color = (rnd.uniform(190, 255), rnd.uniform(0, 50), rnd.uniform(0, 50))
        dots = []
        for _ in range(rnd.randint(*self.count_range)):
            r = max(1, round(rnd.uniform(*self.radius_range) * min(h, w)))
            cx = rnd.randint(min(r, w - 1), max(w - 1 - r, min(r, w - 1)))
            cy = rnd.randint(min(r, h - 1), max(h - 1 - r, min(r, h - 1)))
            dots.append((cx, cy, r))
        return {"dots": dots, "color": color}

    def apply(self, img: np.ndarray, dots: list[tuple[int, int, int]], color: tuple[float, float, float],
              **params: Any) -> np.ndarray:
        out = np.ascontiguousarray(img).copy()
        for cx, cy, r in dots:
            cv2.circle(out, (cx, cy), r, color, thickness=-1, lineType=cv2.LINE_AA)
        return out


class VerticalStripShuffle(A.ImageOnlyTransform):
    """Cut the image into N vertical strips of (nearly) equal width and put them back in a random order.

    The 3rd place solution's idea: the targets describe the whole quadrat, so rearranging its columns keeps the
    label while breaking the spatial layout the model could memorise. N is drawn from `strips_range`; strip
    boundaries are `round(k * W / N)`, so when W is not a multiple of N widths differ by at most one pixel and the
    output keeps the input's shape exactly. When applied, the order always changes (a uniform draw among the
    non-identity permutations); `p` alone decides how often the image is left as it is. With the dual-image
    `halves` layout the strips cross the boundary between the two halves.

    Args:
        strips_range: number of strips, (min, max), at least 2; `[3, 3]` for a fixed count.
        p: probability of applying the transform.
    """

    class InitSchema(BaseTransformInitSchema):
        strips_range: Annotated[tuple[int, int], AfterValidator(check_range_bounds(2)), AfterValidator(nondecreasing)]

    def __init__(self, strips_range: tuple[int, int] = (2, 4), p: float = 0.5):
        super().__init__(p=p)
        self.strips_range = strips_range

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        w = _hw(params)[1]
        n = min(self.py_random.randint(*self.strips_range), w)
        bounds = [round(k * w / n) for k in range(n + 1)]
        identity = list(range(n))
        order = identity
        while n > 1 and order == identity:
            order = self.py_random.sample(identity, n)
        return {"bounds": bounds, "order": order}

    def apply(self, img: np.ndarray, bounds: list[int], order: list[int], **params: Any) -> np.ndarray:
        if len(order) < 2:
            return img
        return np.ascontiguousarray(np.concatenate([img[:, bounds[i]:bounds[i + 1]] for i in order], axis=1))


TRANSFORMS: dict[str, type[A.BasicTransform]] = {cls.__name__: cls for cls in (DateStamp, RedDot,
                                                                                VerticalStripShuffle)}
