"""SAM2 / MedSAM2 through the PyPI ``sam2`` package: box + both key points, best of 3 masks."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.errors import InputError, ModelLoadError
from medreasoner.imaging.geometry import Box, Point
from medreasoner.models.asm.base import ASM, SegmentResult, check_prompts
from medreasoner.models.registry import ASMS

log = logging.getLogger(__name__)

MEDSAM2_REPO, MEDSAM2_FILE = "wanglab/MedSAM2", "MedSAM2_latest.pt"
SAM2_VARIANTS = {  # variant -> (packaged config, hub repo, file)
    "tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt"),
    "small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "facebook/sam2.1-hiera-small", "sam2.1_hiera_small.pt"),
    "base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "facebook/sam2.1-hiera-base-plus",
                  "sam2.1_hiera_base_plus.pt"),
    "large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt"),
}
# What sam2.build_sam2(apply_postprocessing=True) switches on for image prediction.
POSTPROCESSING = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}


def medsam2_config_path() -> Path:
    return Path(str(resources.files("medreasoner") / "configs" / "medsam2_hiera_t512.yaml"))


def packaged_sam2_config(name: str) -> Path:
    import sam2

    return Path(sam2.__file__).parent / name


def resolve_checkpoint(checkpoint: str | None, default_repo: str, default_file: str) -> str:
    """A local file, ``repo_id:filename``, a bare repo id (default file), or None -> the default."""
    if checkpoint and Path(checkpoint).expanduser().is_file():
        return str(Path(checkpoint).expanduser())
    if checkpoint and (checkpoint.startswith((".", "/", "~")) or checkpoint.endswith((".pt", ".pth"))
                       and ":" not in checkpoint):
        raise ModelLoadError(f"ASM checkpoint not found: {checkpoint}")
    repo, _, fname = (checkpoint or f"{default_repo}:{default_file}").partition(":")
    fname = fname or default_file
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, fname)
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth: all mean "not available"
        raise ModelLoadError(
            f"ASM weights {repo}:{fname} are not available locally and could not be downloaded ({exc}). "
            f"Download {fname} once and pass its path with --asm-checkpoint, or use --asm litemedsam."
        ) from exc


def build_sam2_model(config: Path, checkpoint: str | None, device: str = "cpu", video: bool = False):
    """Instantiate a SAM2 model from a YAML file and load a checkpoint safely (weights only).

    Sets ``model.medreasoner_tiny`` when the checkpoint was written by ``make-tiny``.
    """
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(config))
    extra = cfg.model.get("sam_mask_decoder_extra_args") or {}
    cfg.model.sam_mask_decoder_extra_args = OmegaConf.merge(OmegaConf.create(dict(extra)), POSTPROCESSING)
    if video:  # what sam2.build_sam2_video_predictor sets; hole filling needs a CUDA-only kernel
        cfg.model._target_ = "sam2.sam2_video_predictor.SAM2VideoPredictor"
        cfg.model.binarize_mask_from_pts_for_mem_enc = True
        cfg.model.fill_hole_area = 8 if str(device).startswith("cuda") else 0
    model = instantiate(cfg.model, _recursive_=True)
    model.medreasoner_tiny = checkpoint is None
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read SAM2 checkpoint {checkpoint}: {exc}") from exc
        if isinstance(state, dict) and "model" in state:
            model.medreasoner_tiny = bool(state.get("medreasoner_tiny_test_model", False))
            state = state["model"]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"checkpoint {checkpoint} does not fit config {Path(config).name}: "
                                 f"{str(exc)[:400]}") from exc
    return model.to(device).eval()


_FRAME_LOADER_LOCK = threading.Lock()


@contextlib.contextmanager
def _frames_from_memory(frames, image_size: int):
    """Let SAM2VideoPredictor.init_state read slices from memory, one at a time, on demand.

    sam2 only loads videos from mp4/JPEG folders; its predictor indexes ``state["images"][i]`` and
    takes ``len()``, so a lazy sequence of normalised frames keeps memory at one slice per step.
    """
    import sam2.sam2_video_predictor as svp

    h, w = frames[0].shape[:2] if len(frames) else (0, 0)

    def loader(**_kwargs):
        return _LazyFrames(frames, image_size), h, w

    with _FRAME_LOADER_LOCK:
        original = svp.load_video_frames
        svp.load_video_frames = loader
        try:
            yield
        finally:
            svp.load_video_frames = original


class _LazyFrames:
    MEAN = (0.485, 0.456, 0.406)  # the ImageNet statistics SAM2 was trained with
    STD = (0.229, 0.224, 0.225)

    def __init__(self, frames, image_size: int):
        self.frames, self.size = frames, image_size

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(self.frames[i])).permute(2, 0, 1)[None].float() / 255.0
        t = torch.nn.functional.interpolate(t, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        mean = torch.tensor(self.MEAN)[:, None, None]
        std = torch.tensor(self.STD)[:, None, None]
        return (t - mean) / std


class SAM2ASM(ASM):
    video_propagation = True

    def __init__(self, name: str, config: Path, checkpoint: str | None, device: str | None = "auto",
                 batch_size: int | None = None, multimask: bool = True, precision: str = "auto",
                 raw_prompts: bool = False):
        """``precision``: "auto" (bf16 autocast on CUDA) or "fp32"; ``raw_prompts``: segment any box as
        given (inverted, empty, outside), as the reference evaluation does, instead of refusing it."""
        import torch
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        from medreasoner.models.devices import default_asm_batch, resolve_device

        self.name = name
        self.config = Path(config)
        self.checkpoint = checkpoint or "(random init)"
        self.device = resolve_device(device)
        self.batch_size = default_asm_batch(self.device, batch_size)
        self.multimask = multimask
        if precision not in ("auto", "fp32"):
            raise InputError(f"SAM2 precision must be auto or fp32, got {precision!r}")
        self.precision, self.raw_prompts = precision, bool(raw_prompts)
        model = build_sam2_model(self.config, checkpoint, str(self.device))
        self.is_tiny = model.medreasoner_tiny
        self.predictor = SAM2ImagePredictor(model)
        # sam2's predictor assumes 1024-pixel inputs; derive the backbone grid from image_size.
        hr = model.image_size // 4
        self.predictor._bb_feat_sizes = [(hr >> k, hr >> k) for k in range(3)]
        self._torch = torch

    def _video_predictor(self):
        if getattr(self, "_video", None) is None:
            video = build_sam2_model(self.config, None, str(self.device), video=True)
            video.load_state_dict(self.predictor.model.state_dict(), strict=True)
            self._video = video.eval()
        return self._video

    def propagate(self, frames, key_index: int, key_mask: np.ndarray, min_area: int = 10, cancel=None,
                  progress=None) -> dict[int, np.ndarray]:
        """MedSAM2's 3D recipe: the key slice's mask as the prompt, then SAM2's video memory forward
        and backward; each direction stops at the first slice where the object has ended."""
        torch = self._torch
        vp = self._video_predictor()
        masks = {key_index: np.asarray(key_mask, bool)}
        with _frames_from_memory(frames, vp.image_size):
            state = vp.init_state(video_path="<in-memory slices>", offload_video_to_cpu=True,
                                  offload_state_to_cpu=self.device.type != "cuda")
        with torch.inference_mode(), self._autocast():
            vp.add_new_mask(state, frame_idx=key_index, obj_id=1, mask=masks[key_index])
            for reverse in (False, True):
                for idx, _, logits in vp.propagate_in_video(state, start_frame_idx=key_index, reverse=reverse):
                    if cancel is not None and cancel.is_set():
                        from medreasoner.errors import CancelledError

                        raise CancelledError("cancelled during propagation")
                    if idx == key_index:
                        continue
                    m = (logits[0, 0] > 0).cpu().numpy()
                    if m.sum() < min_area:
                        break
                    masks[idx] = m
                    if progress is not None:
                        progress(len(masks))
        return masks

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "config": self.config.name, "device": str(self.device),
                "image_size": int(self.predictor.model.image_size), "precision": self.precision,
                "raw_prompts": self.raw_prompts}

    def _autocast(self):
        torch = self._torch
        if self.device.type == "cuda" and self.precision == "auto":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def encode(self, images: Sequence[np.ndarray]) -> list[_SAM2Embedding]:
        torch = self._torch
        out: list[_SAM2Embedding] = []
        for s in range(0, len(images), self.batch_size):
            chunk = [np.ascontiguousarray(im, dtype=np.uint8) for im in images[s:s + self.batch_size]]
            with torch.inference_mode(), self._autocast():
                self.predictor.set_image_batch(chunk)
                feats = self.predictor._features
                for i, im in enumerate(chunk):
                    out.append(_SAM2Embedding(feats["image_embed"][i].clone(),
                                              [f[i].clone() for f in feats["high_res_feats"]], im.shape[:2]))
            self.predictor.reset_predictor()
        return out

    def embedding_nbytes(self, embedding: _SAM2Embedding) -> int:
        return int(sum(t.numel() * t.element_size() for t in [embedding.image_embed, *embedding.high_res]))

    def decode(self, embedding: _SAM2Embedding, box: Box, points: Sequence[Point] | None = None) -> SegmentResult:
        torch = self._torch
        h, w = embedding.size
        if not self.raw_prompts:
            check_prompts(np.empty((h, w, 0)), box)
        t0 = time.perf_counter()
        pred = self.predictor
        with torch.inference_mode(), self._autocast():
            # Put one cached embedding into the predictor, as set_image would have left it.
            pred._features = {"image_embed": embedding.image_embed[None],
                              "high_res_feats": [f[None] for f in embedding.high_res]}
            pred._orig_hw = [tuple(embedding.size)]
            pred._is_image_set, pred._is_batch = True, False
            try:
                masks, scores, _ = pred.predict(
                    point_coords=np.asarray(points, np.float32) if points else None,
                    point_labels=np.ones(len(points), np.int32) if points else None,
                    box=np.asarray(box, np.float32), multimask_output=self.multimask)
            finally:
                pred.reset_predictor()
        scores = np.atleast_1d(np.asarray(scores, dtype=np.float32))
        masks = np.asarray(masks).reshape(-1, h, w)
        best = int(np.argmax(scores))
        return SegmentResult(masks[best] > 0, float(scores[best]), "box+points" if points else "box",
                             {"decode": time.perf_counter() - t0})


@dataclass
class _SAM2Embedding:
    image_embed: Any  # torch.Tensor (256, g, g)
    high_res: list  # the two high-resolution feature maps SAM2's decoder also reads
    size: tuple[int, int]  # (rows, cols) of the original image


@ASMS.register("medsam2", help="MedSAM2 (SAM2.1 Hiera-T, 512 px); checkpoint path or wanglab/MedSAM2")
def make_medsam2(checkpoint: str | None = None, device: str | None = "auto", batch_size: int | None = None,
                 random_init: bool = False, **_: Any) -> SAM2ASM:
    ckpt = None if random_init else resolve_checkpoint(checkpoint, MEDSAM2_REPO, MEDSAM2_FILE)
    return SAM2ASM("medsam2", medsam2_config_path(), ckpt, device, batch_size)


@ASMS.register("sam2", help="SAM 2.1 (variant tiny/small/base_plus/large); checkpoint path or facebook/sam2.1-*")
def make_sam2(checkpoint: str | None = None, variant: str = "tiny", device: str | None = "auto",
              batch_size: int | None = None, random_init: bool = False, **_: Any) -> SAM2ASM:
    if variant not in SAM2_VARIANTS:
        raise ValueError(f"unknown SAM2 variant {variant!r}; choose from {', '.join(SAM2_VARIANTS)}")
    cfg, repo, fname = SAM2_VARIANTS[variant]
    ckpt = None if random_init else resolve_checkpoint(checkpoint, repo, fname)
    return SAM2ASM("sam2", packaged_sam2_config(cfg), ckpt, device, batch_size)
