"""The ASM contract: (image, box, points) -> mask + score, batched where the model allows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medreasoner.geometry import Box, Point


@dataclass
class SegmentResult:
    mask: np.ndarray  # bool (H, W), same size as the input image
    score: float  # the model's own quality estimate for the chosen mask
    prompt: str = "box+points"  # which prompts the model actually used
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


class ASM(ABC):
    """A frozen promptable segmenter. Images are RGB uint8 (H, W, 3)."""

    name: str = "asm"
    checkpoint: str = ""
    is_tiny: bool = False

    def segment(self, image: np.ndarray, box: Box, points: Sequence[Point] | None = None) -> SegmentResult:
        return self.segment_batch([image], [box], [points])[0]

    @abstractmethod
    def segment_batch(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[Box],
        points: Sequence[Sequence[Point] | None],
    ) -> list[SegmentResult]:
        """One prompt set per image; images are encoded in batches."""

    def describe(self) -> dict[str, Any]:
        from medreasoner.fingerprint import model_fingerprint

        return {"name": self.name, "checkpoint": self.checkpoint, "fingerprint": model_fingerprint(self.checkpoint),
                "tiny_test_model": self.is_tiny}

    def propagate(self, frames: Sequence[np.ndarray], key_index: int, key_mask: np.ndarray,
                  min_area: int = 10, cancel=None, progress=None) -> dict[int, np.ndarray]:
        """Carry the key slice's mask through neighbouring slices, both ways, until the object ends.

        ``frames[i]`` is an RGB uint8 slice (loaded on demand). This default tracks the box: each
        next slice is prompted with the previous mask's box grown by 10%; it stops where the mask
        vanishes (fewer than ``min_area`` pixels). Video-capable ASMs (SAM2) override it.
        """
        from tqdm import tqdm

        masks = {key_index: np.asarray(key_mask, bool)}
        bar = tqdm(total=len(frames) - 1, desc="propagate (box tracking)", unit="slice", leave=False)
        for step in (1, -1):
            prev = masks[key_index]
            i = key_index + step
            while 0 <= i < len(frames) and prev.sum() >= min_area:
                if cancel is not None and cancel.is_set():
                    from medreasoner.errors import CancelledError

                    raise CancelledError("cancelled during propagation")
                frame = frames[i]
                r = self.segment(frame, grown_box(prev, frame.shape[:2]))
                if r.area < min_area:
                    break
                masks[i] = r.mask
                prev = r.mask
                bar.update(1)
                if progress is not None:
                    progress(len(masks))
                i += step
        bar.close()
        return masks


def grown_box(mask: np.ndarray, shape: tuple[int, int], grow: float = 0.1) -> Box:
    """The mask's tight box (continuous coordinates) grown by ``grow`` of its size on each side."""
    ys, xs = np.nonzero(mask)
    x1, x2, y1, y2 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    gx, gy = max(1.0, (x2 - x1) * grow), max(1.0, (y2 - y1) * grow)
    h, w = shape
    return (max(0.0, x1 - gx), max(0.0, y1 - gy), min(float(w), x2 + gx), min(float(h), y2 + gy))


def check_prompts(image: np.ndarray, box: Box) -> None:
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box {list(box)} has no area")
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        raise ValueError(f"box {list(box)} lies outside the {w}x{h} image")
