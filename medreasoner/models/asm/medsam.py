"""MedSAM (SAM ViT-B fine-tuned on medical images) through Meta's ``segment-anything`` package.

Preprocessing and prompting follow MedSAM's published recipe (``MedSAM_Inference.py`` and the training
preprocessing ``pre_CT_MR.py`` in github.com/bowang-lab/MedSAM):

* the image as 3 channels (a grey slice is repeated), ``skimage.transform.resize(order=3,
  preserve_range=True, anti_aliasing=True)`` to 1024x1024 (cubic spline, aspect ratio not kept, no
  padding), cast back to uint8, min-max normalised to [0, 1] over the resized image
  (:func:`medsam_input`; identical to ``MedSAM_Inference.py`` for uint8 images). SAM's own ImageNet
  mean/std step is *not* applied: MedSAM feeds ``image_encoder`` directly;
* the box scaled to that grid, ``box / [W, H, W, H] * 1024`` (after clipping it to the image);
* one mask (``multimask_output=False``), ``sigmoid`` on the 256x256 low-resolution logits, bilinear
  upsampling straight to the image size, threshold 0.5. The score is the decoder's IoU estimate.

MedSAM was trained with box prompts only, so by default the key points are not used (the result's
``prompt`` says "box"). ``use_points=True`` also passes them to SAM's prompt encoder as positive
clicks (label 1) in the same 1024 grid: an ablation, not MedSAM's recipe.

Weights: a local ``medsam_vit_b.pth`` (``--asm-checkpoint``); nothing is downloaded. Checkpoints are
read with ``torch.load(weights_only=True)`` and loaded strictly (segment-anything's own builder
unpickles without ``weights_only``, so it is only used to build the architecture). ``random_init=True``
builds seeded random weights for tests; such a model (or a checkpoint saved with
``medreasoner_tiny_test_model: True``) reports ``is_tiny`` so results carry the tiny-model warning.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.errors import InputError, ModelLoadError
from medreasoner.imaging.geometry import Box, Point
from medreasoner.models.asm.base import ASM, SegmentResult, check_prompts
from medreasoner.models.registry import ASMS

INPUT_SIZE = 1024  # SAM ViT-B's input square
MASK_THRESHOLD = 0.5  # on sigmoid probabilities, as MedSAM
VARIANT = "vit_b"
CHECKPOINT_HINT = ("download MedSAM's medsam_vit_b.pth (github.com/bowang-lab/MedSAM) and pass its path "
                   "with --asm-checkpoint, or use --asm litemedsam")


# -- geometry: pure functions, no model ------------------------------------------------------------

def box_to_model(box: Box, size: tuple[int, int], input_size: int = INPUT_SIZE) -> np.ndarray:
    """``(x1, y1, x2, y2)`` in pixels of an image of ``size`` = (rows, cols) -> the 1024x1024 grid,
    MedSAM's ``box / [W, H, W, H] * 1024`` after clipping the box to the image."""
    h, w = size
    b = np.asarray(box, dtype=np.float64).reshape(4)
    b = np.clip(b, 0.0, [w, h, w, h])
    return b / np.array([w, h, w, h], dtype=np.float64) * input_size


def box_from_model(box_1024: Sequence[float], size: tuple[int, int], input_size: int = INPUT_SIZE) -> np.ndarray:
    """The inverse of :func:`box_to_model` (for a box inside the image)."""
    h, w = size
    return np.asarray(box_1024, dtype=np.float64).reshape(4) / input_size * np.array([w, h, w, h], dtype=np.float64)


def points_to_model(points: Sequence[Point], size: tuple[int, int], input_size: int = INPUT_SIZE) -> np.ndarray:
    """``[(x, y), ...]`` in pixels -> (N, 2) in the 1024x1024 grid (the same anisotropic scaling)."""
    h, w = size
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return p / np.array([w, h], dtype=np.float64) * input_size


def as_three_channels(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) -> (H, W, 3); a grey image is repeated, as MedSAM does."""
    im = np.asarray(image)
    if im.ndim == 2:
        im = im[:, :, None]
    if im.ndim != 3 or im.shape[2] not in (1, 3):
        raise InputError(f"MedSAM takes a grey or RGB image (H, W[, 1|3]), got shape {im.shape}")
    return np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im


def medsam_input(image: np.ndarray, input_size: int = INPUT_SIZE) -> np.ndarray:
    """(input_size, input_size, 3) float32 in [0, 1], exactly as ``MedSAM_Inference.py`` prepares an image:
    3 channels, ``skimage.transform.resize(order=3, preserve_range=True, anti_aliasing=True)`` to the
    square (aspect ratio not kept), cast to uint8, min-max normalised."""
    from skimage.transform import resize

    im = as_three_channels(image)
    lo, hi = float(im.min()), float(im.max())
    kw = {"order": 3, "preserve_range": True, "anti_aliasing": True, "clip": False}
    # Channel by channel is what skimage does for the (H, W, 3) call (the channel axis keeps its
    # size, so its spline samples the knots), ~6x faster; a grey image is resized once.
    if np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2]):
        one = resize(im[..., 0], (input_size, input_size), **kw)
        out = np.repeat(one[:, :, None], 3, axis=2)
    else:
        out = np.stack([resize(im[..., c], (input_size, input_size), **kw) for c in range(3)], axis=2)
    out = np.clip(out, lo, hi)  # skimage's clip to the input range
    if im.dtype == np.uint8:  # MedSAM's cast back to uint8 (a float image keeps its values)
        out = out.astype(np.uint8)
    out = out.astype(np.float32)
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-8)


# -- the model -------------------------------------------------------------------------------------

def resolve_medsam_checkpoint(checkpoint: str | None) -> str:
    """A local weights file, or an ``InputError`` that says what to pass (nothing is downloaded)."""
    if not checkpoint or not str(checkpoint).strip():
        raise InputError(f"the medsam ASM needs its weights: {CHECKPOINT_HINT}")
    p = Path(str(checkpoint)).expanduser()
    if p.is_file():
        return str(p)
    what = "is a folder, not a weights file" if p.is_dir() else "not found"
    raise InputError(f"MedSAM checkpoint {checkpoint} {what} (medsam takes a local file; hub ids are not "
                     f"downloaded): {CHECKPOINT_HINT}")


def read_medsam_state(path: str) -> tuple[dict, bool]:
    """The state dict in ``path`` (a plain SAM state dict or ``{"model": ...}``) and whether the file
    is marked as a tiny test checkpoint. Only tensors and plain containers are unpickled."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable, truncated, or code in the pickle
        raise ModelLoadError(f"cannot read MedSAM weights {path}: {str(exc).splitlines()[0][:300]}") from exc
    tiny = False
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        tiny = bool(state.get("medreasoner_tiny_test_model", False))
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} is not a MedSAM checkpoint (no state dict inside)")
    return state, tiny


def build_medsam(state: dict | None = None, source: str = "", seed: int = 0):
    """SAM ViT-B from segment-anything; ``state`` loaded strictly, or seeded random weights if None."""
    import torch

    try:
        from segment_anything import sam_model_registry
    except ImportError as exc:
        raise ModelLoadError("the medsam ASM needs Meta's segment-anything package: "
                             "pip install 'medreasoner[medsam]'") from exc

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = sam_model_registry[VARIANT](checkpoint=None)  # our own safe load below, never the builder's
    if state is not None:
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{source or 'the checkpoint'} is not a SAM ViT-B (MedSAM) checkpoint: "
                                 f"{str(exc)[:300]}") from exc
    return sam.eval()


class MedSAMASM(ASM):
    name = "medsam"

    def __init__(self, checkpoint: str | None = None, device: str | None = "auto", batch_size: int | None = None,
                 use_points: bool = False, dtype: str | None = "auto", random_init: bool = False):
        import torch

        from medreasoner.models.devices import default_asm_batch, resolve_device

        try:
            import skimage.transform  # noqa: F401 - MedSAM's resize
        except ImportError as exc:
            raise ModelLoadError("the medsam ASM needs scikit-image: pip install 'medreasoner[medsam]'") from exc
        self.device = resolve_device(device)
        self.batch_size = default_asm_batch(self.device, batch_size)
        self.use_points = bool(use_points)
        self.autocast_dtype = self._autocast_dtype(torch, self.device, dtype)
        if random_init:
            self.checkpoint, state, tiny = "(random init)", None, True
        else:
            self.checkpoint = resolve_medsam_checkpoint(checkpoint)
            state, tiny = read_medsam_state(self.checkpoint)
        self.is_tiny = tiny
        self.sam = build_medsam(state, self.checkpoint).to(self.device)
        self._torch = torch

    @staticmethod
    def _autocast_dtype(torch, device, dtype):
        """``auto``: bf16 autocast on CUDA GPUs that support it (as the SAM2 ASMs), else fp32 (MedSAM's
        reference runs fp32: ``dtype="fp32"`` matches it on a GPU too)."""
        if dtype in ("fp32", "float32", torch.float32):
            return None
        if dtype in ("bf16", "bfloat16", torch.bfloat16):  # CPU autocast takes bf16 too (slower there)
            return torch.bfloat16
        if dtype not in (None, "", "auto"):
            raise InputError(f"medsam dtype must be auto, fp32 or bf16, got {dtype!r}")
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return self._torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device), "image_size": INPUT_SIZE, "variant": VARIANT,
                "precision": "bf16 autocast" if self.autocast_dtype is not None else "fp32",
                "prompts": ("box + key points as positive clicks" if self.use_points
                            else "box only (MedSAM's recipe; trained without points)")}

    def preprocess(self, image: np.ndarray):
        """(3, 1024, 1024) float tensor in [0, 1] on the model's device (see :func:`medsam_input`)."""
        return self._torch.from_numpy(medsam_input(image)).permute(2, 0, 1).to(self.device)

    def encode(self, images: Sequence[np.ndarray]) -> list[_MedSAMEmbedding]:
        torch = self._torch
        out: list[_MedSAMEmbedding] = []
        for s in range(0, len(images), self.batch_size):
            chunk = [np.asarray(im) for im in images[s:s + self.batch_size]]
            with torch.inference_mode():
                batch = torch.stack([self.preprocess(im) for im in chunk])
                with self._autocast():
                    emb = self.sam.image_encoder(batch)  # (B, 256, 64, 64)
            for i, im in enumerate(chunk):
                out.append(_MedSAMEmbedding(emb[i:i + 1].clone(), tuple(im.shape[:2])))
        return out

    def embedding_nbytes(self, embedding: _MedSAMEmbedding) -> int:
        return int(embedding.features.numel() * embedding.features.element_size())

    def decode(self, embedding: _MedSAMEmbedding, box: Box, points: Sequence[Point] | None = None) -> SegmentResult:
        torch = self._torch
        F = torch.nn.functional
        h, w = embedding.size
        check_prompts(np.empty((h, w, 0)), box)
        use_points = self.use_points and points is not None and len(points) > 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            b = torch.as_tensor(box_to_model(box, (h, w)), dtype=torch.float32, device=self.device)[None, None]
            clicks = None
            if use_points:
                xy = torch.as_tensor(points_to_model(points, (h, w)), dtype=torch.float32, device=self.device)[None]
                clicks = (xy, torch.ones(xy.shape[:2], dtype=torch.int64, device=self.device))
            with self._autocast():
                sparse, dense = self.sam.prompt_encoder(points=clicks, boxes=b, masks=None)
                low, iou = self.sam.mask_decoder(
                    image_embeddings=embedding.features, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
            prob = torch.sigmoid(low.float())  # (1, 1, 256, 256)
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
            mask = (prob[0, 0] > MASK_THRESHOLD).cpu().numpy()
        return SegmentResult(mask, float(iou.float().reshape(-1)[0]), "box+points" if use_points else "box",
                             {"decode": time.perf_counter() - t0})


@dataclass
class _MedSAMEmbedding:
    features: Any  # torch.Tensor (1, 256, 64, 64) on the model's device
    size: tuple[int, int]  # (rows, cols) of the original image


@ASMS.register("medsam", help="MedSAM (SAM ViT-B, 1024 px, box prompts); local medsam_vit_b.pth via "
                              "--asm-checkpoint (never downloaded)")
def make_medsam(checkpoint: str | None = None, device: str | None = "auto", batch_size: int | None = None,
                use_points: bool = False, dtype: str | None = "auto", random_init: bool = False,
                **_: Any) -> MedSAMASM:
    return MedSAMASM(checkpoint, device, batch_size, use_points=use_points, dtype=dtype, random_init=random_init)
