"""Test doubles for the CRM and the ASM: deterministic stand-ins where a test needs a known answer.

``BrightestRegionCRM`` stands in for the Clinical Reasoning Module (a Qwen2.5-VL model). It answers
every question with a box around the largest connected region among the brightest pixels of the
image it is given, and two key points inside that region (the mask's ground-truth key points),
written in the CRM's real output format so the answer parser, the pixel mapping, the ASM and
the volume strategies all run for real. Images with no bright region get an empty answer
(the engine then reports ``no_target``). It is registered as the CRM backend ``test-brightest``
so the CLI and the bundle can select it in-process (``--crm-backend test-brightest``).

``BoxASM`` stands in for the Anatomical Segmentation Module (LiteMedSAM, MedSAM2): the mask is the
prompt box, edges included, so a run needs no segmenter weights (``--asm test-box``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medreasoner.imaging.resize import ResizeMap
from medreasoner.models.asm.base import ASM, SegmentResult
from medreasoner.models.crm.base import CRM, CRMAnswer, answer_in_original_pixels
from medreasoner.models.registry import ASMS, CRMS

BACKEND = "test-brightest"


def brightest_region(grey: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected region of pixels in the top quarter of the image's range."""
    from scipy import ndimage

    lo, hi = float(grey.min()), float(grey.max())
    if hi - lo < 1:
        return None
    labels, n = ndimage.label(grey >= hi - 0.25 * (hi - lo), structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    region = labels == int(np.argmax(sizes))
    return region if region.sum() >= 4 else None


class BrightestRegionCRM(CRM):
    name = BACKEND
    is_tiny = False

    def __init__(self, model: str = "brightest-region", batch_size: int = 4, **_: Any):
        self.model_id, self.batch_size = str(model), batch_size
        self.calls: list[str] = []  # the questions asked, in order

    def answer_batch(self, images: Sequence[np.ndarray], questions: Sequence[str],
                     prompt: str = "reasoning") -> list[CRMAnswer]:
        from medreasoner.science.keypoints import ground_truth_from_mask

        out = []
        for image, q in zip(images, questions):
            self.calls.append(q)
            grey = np.asarray(image, np.float32).mean(axis=2)
            h, w = grey.shape
            region = brightest_region(grey)
            if region is None:
                text = "<think>Nothing stands out in this image.</think><answer>{}</answer>"
            else:
                gt = ground_truth_from_mask(region)
                (p1, p2), box = gt["point_2d"], gt["bbox_2d"]
                text = (f"<think>The brightest structure answers: {q}</think><answer>{{'bbox': {list(box)}, "
                        f"'points_1': {list(p1)}, 'points_2': {list(p2)}}}</answer>")
            rmap = ResizeMap(w, h, w, h)
            out.append(CRMAnswer(text, answer_in_original_pixels(text, rmap), rmap, 0.0, 1.0))
        return out


@CRMS.register(BACKEND, help="TEST DOUBLE: box around the brightest region (tests only)")
def _make(**kwargs: Any) -> BrightestRegionCRM:
    return BrightestRegionCRM(**kwargs)


class BoxASM(ASM):
    """The prompt box as the mask (edges included), on the encoded image's grid."""

    name = checkpoint = "test-box"

    def encode(self, images):
        return [np.asarray(im).shape[:2] for im in images]

    def decode(self, embedding, box, points=None):
        mask = np.zeros(embedding, bool)
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        mask[max(0, y1):y2 + 1, max(0, x1):x2 + 1] = True
        return SegmentResult(mask, 1.0, "box")


@ASMS.register(BoxASM.name, help="TEST DOUBLE: the box as the mask (tests only)")
def _make_box_asm(**_: Any) -> BoxASM:
    return BoxASM()
