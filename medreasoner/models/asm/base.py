"""The ASM contract: (image, box, points) -> mask + score, batched where the model allows."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medreasoner.imaging.geometry import Box, Point


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
    """A frozen promptable segmenter. Images are RGB uint8 (H, W, 3).

    Work is split in two so callers can cache the expensive half: ``encode`` turns images into
    image embeddings (batched), ``decode`` turns one embedding + prompts into a mask. An embedding
    is opaque to callers; ``embedding_nbytes`` tells a cache how much memory it holds.
    """

    name: str = "asm"
    checkpoint: str = ""
    is_tiny: bool = False
    batch_size: int = 1
    video_propagation: bool = False  # True when ``propagate`` carries a mask through slices itself

    @abstractmethod
    def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Image embeddings, one per image, computed in batches of ``batch_size``."""

    @abstractmethod
    def decode(self, embedding: Any, box: Box, points: Sequence[Point] | None = None) -> SegmentResult:
        """The mask for one prompt set on an encoded image (original image size)."""

    def embedding_nbytes(self, embedding: Any) -> int:
        return 0

    def segment(self, image: np.ndarray, box: Box, points: Sequence[Point] | None = None) -> SegmentResult:
        return self.segment_batch([image], [box], [points])[0]

    def segment_batch(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[Box],
        points: Sequence[Sequence[Point] | None],
    ) -> list[SegmentResult]:
        """One prompt set per image; images are encoded in batches."""
        for im, b in zip(images, boxes):
            check_prompts(np.asarray(im), b)
        t0 = time.perf_counter()
        embeddings = self.encode(images)
        t_enc = (time.perf_counter() - t0) / max(1, len(images))
        out = []
        for emb, b, p in zip(embeddings, boxes, points):
            r = self.decode(emb, b, p)
            r.timings = {"encode": t_enc, **r.timings}
            out.append(r)
        return out

    def describe(self) -> dict[str, Any]:
        from medreasoner.models.fingerprint import model_fingerprint

        return {"name": self.name, "checkpoint": self.checkpoint, "fingerprint": model_fingerprint(self.checkpoint),
                "tiny_test_model": self.is_tiny}

    def propagate(self, frames: Sequence[np.ndarray], key_index: int, key_mask: np.ndarray,
                  min_area: int = 10, cancel=None, progress=None) -> dict[int, np.ndarray]:
        """Video-capable ASMs carry the key mask through ``frames`` themselves (``video_propagation``);
        the engine tracks boxes with ``encode``/``decode`` for the others."""
        raise NotImplementedError(f"{self.name} has no video propagation; the engine tracks boxes instead")


def check_prompts(image: np.ndarray, box: Box) -> None:
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box {list(box)} has no area")
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        raise ValueError(f"box {list(box)} lies outside the {w}x{h} image")
