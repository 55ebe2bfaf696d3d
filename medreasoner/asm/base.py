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
        return {"name": self.name, "checkpoint": self.checkpoint, "tiny_test_model": self.is_tiny}


def check_prompts(image: np.ndarray, box: Box) -> None:
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box {list(box)} has no area")
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        raise ValueError(f"box {list(box)} lies outside the {w}x{h} image")
