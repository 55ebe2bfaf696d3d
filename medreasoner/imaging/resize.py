"""The exact map between original image pixels and the pixels a model saw."""

from __future__ import annotations

from dataclasses import dataclass

from medreasoner.imaging.geometry import Box, Point, scale_box, scale_point


@dataclass(frozen=True)
class ResizeMap:
    """Original (width, height) <-> model (width, height); pure scaling, no padding."""

    orig_w: int
    orig_h: int
    model_w: int
    model_h: int

    @property
    def sx(self) -> float:
        return self.orig_w / self.model_w

    @property
    def sy(self) -> float:
        return self.orig_h / self.model_h

    def box_to_orig(self, box: Box) -> Box:
        return scale_box(box, self.sx, self.sy)

    def point_to_orig(self, point: Point) -> Point:
        return scale_point(point, self.sx, self.sy)

    def box_to_model(self, box: Box) -> Box:
        return scale_box(box, 1.0 / self.sx, 1.0 / self.sy)

    def point_to_model(self, point: Point) -> Point:
        return scale_point(point, 1.0 / self.sx, 1.0 / self.sy)


def target_size(orig_w: int, orig_h: int, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """Size to resize to before the processor: a square side, an explicit (w, h), or unchanged."""
    if image_size is None:
        return orig_w, orig_h
    if isinstance(image_size, int):
        return image_size, image_size
    w, h = image_size
    return int(w), int(h)
