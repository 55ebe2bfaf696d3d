"""The medsam ASM (SAM ViT-B through segment-anything, MedSAM's recipe) with random weights on CPU.

One real ViT-B encode at 1024 px costs tens of seconds on 2 cores, so only the ``slow`` tests run the
real image encoder (once, shared); the others swap in a stand-in encoder that returns random
embeddings and test everything around it: preprocessing, prompts, decoding, caching, loading.
"""

from __future__ import annotations

import numpy as np
import pytest

from medreasoner.errors import InputError, ModelLoadError
from medreasoner.models.asm import asm_names, load_asm
from medreasoner.models.asm.medsam import (
    INPUT_SIZE,
    box_from_model,
    box_to_model,
    medsam_input,
    points_to_model,
)

BOX = (40.0, 30.0, 100.0, 90.0)
POINTS = [(70.0, 60.0), (60.0, 50.0)]


@pytest.fixture(scope="module")
def medsam():
    return load_asm("medsam", random_init=True, device="cpu")


@pytest.fixture
def fake_encoder(medsam, monkeypatch):
    """Replace the ViT-B forward by random (B, 256, 64, 64) embeddings; returns the list of batch inputs."""
    import torch

    calls: list = []
    gen = torch.Generator().manual_seed(0)

    def forward(x):
        calls.append(x)
        return torch.randn(x.shape[0], 256, 64, 64, generator=gen)

    monkeypatch.setattr(medsam.sam.image_encoder, "forward", forward)
    return calls


def test_registry_lists_medsam():
    from medreasoner.models.registry import ASMS

    assert "medsam" in asm_names()
    assert "--asm-checkpoint" in ASMS.describe()["medsam"]


# -- geometry and preprocessing (no model) -----------------------------------------------------------

def test_box_maps_to_1024_grid_and_back_on_a_non_square_image():
    size = (100, 200)  # rows, cols: x is scaled by 1024/200, y by 1024/100 (no aspect kept, as MedSAM)
    b = box_to_model((50, 25, 150, 75), size)
    np.testing.assert_allclose(b, [256, 256, 768, 768])
    np.testing.assert_allclose(box_from_model(b, size), [50, 25, 150, 75])
    np.testing.assert_allclose(box_to_model((0, 0, 200, 100), size), [0, 0, INPUT_SIZE, INPUT_SIZE])
    # a box running over the edge is clipped to the image first
    np.testing.assert_allclose(box_to_model((-20, -5, 250, 120), size), [0, 0, INPUT_SIZE, INPUT_SIZE])
    np.testing.assert_allclose(points_to_model([(100, 50), (0, 100)], size), [[512, 512], [0, 1024]])


def test_preprocessing_is_medsam_inference_exactly():
    """medsam_input against the lines of MedSAM_Inference.py (skimage resize of the 3-channel image)."""
    from skimage import transform

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    img[..., 1] //= 2  # channels with different ranges
    ref = transform.resize(img, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    ref = (ref - ref.min()) / np.clip(ref.max() - ref.min(), a_min=1e-8, a_max=None)
    ours = medsam_input(img)
    assert ours.shape == (1024, 1024, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    grey = medsam_input(img[..., 0])  # a grey slice becomes three equal channels
    assert grey.shape == (1024, 1024, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    assert grey.min() == 0.0 and grey.max() == 1.0
    with pytest.raises(InputError, match="grey or RGB"):
        medsam_input(np.zeros((8, 8, 4), np.uint8))


# -- loading -----------------------------------------------------------------------------------------

def test_no_checkpoint_says_to_pass_asm_checkpoint():
    from medreasoner.models.loading import ModelOptions, load_asm_from

    with pytest.raises(InputError, match="--asm-checkpoint"):
        load_asm("medsam")
    with pytest.raises(InputError, match="--asm-checkpoint"):  # the CLI's path: one clear line, exit 2
        load_asm_from(ModelOptions(asm="medsam", device="cpu"))


def test_missing_checkpoint_path_or_hub_id_is_an_input_error_and_nothing_downloads(tmp_path):
    with pytest.raises(InputError, match="not found.*--asm-checkpoint"):
        load_asm("medsam", checkpoint=str(tmp_path / "medsam_vit_b.pth"), device="cpu")
    with pytest.raises(InputError, match="hub ids are not downloaded"):  # the network guard would fail a fetch
        load_asm("medsam", checkpoint="wanglab/MedSAM:medsam_vit_b.pth", device="cpu")
    with pytest.raises(InputError, match="folder"):
        load_asm("medsam", checkpoint=str(tmp_path), device="cpu")


class _NotAWeight:
    pass


def test_checkpoints_are_unpickled_weights_only(tmp_path):
    """A pickle holding an arbitrary object loads with torch.load's defaults of old, but not here."""
    import torch

    p = tmp_path / "code.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _NotAWeight()}, p)
    assert isinstance(torch.load(p, weights_only=False)["payload"], _NotAWeight)
    with pytest.raises(ModelLoadError, match="cannot read MedSAM weights"):
        load_asm("medsam", checkpoint=str(p), device="cpu")


def test_wrong_state_dict_is_refused(tmp_path):
    import torch

    p = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(1)}, p)
    with pytest.raises(ModelLoadError, match="not a SAM ViT-B"):
        load_asm("medsam", checkpoint=str(p), device="cpu")


# -- encode / decode (stand-in encoder) -------------------------------------------------------------

def test_random_init_is_a_tiny_test_model(medsam):
    d = medsam.describe()
    assert medsam.is_tiny and d["tiny_test_model"] and d["checkpoint"] == "(random init)"
    assert d["image_size"] == 1024 and d["precision"] == "fp32" and d["prompts"].startswith("box only")


def test_decode_gives_a_mask_of_the_image_size(medsam, fake_encoder, ct_image):
    img = ct_image.rgb[:, :96]  # 128 x 96, not square
    emb = medsam.encode([img])[0]
    x = fake_encoder[0]
    assert tuple(x.shape) == (1, 3, 1024, 1024) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    r = medsam.decode(emb, (10, 10, 60, 60), POINTS)
    assert r.mask.shape == (128, 96) and r.mask.dtype == bool and np.isfinite(r.score)
    assert r.prompt == "box"  # MedSAM's recipe: the key points are not used
    assert medsam.embedding_nbytes(emb) == 256 * 64 * 64 * 4


def test_several_prompts_on_one_image_encode_once(medsam, fake_encoder, ct_image):
    from medreasoner.engine.cache import LRUCache, array_digest

    cache = LRUCache(max_bytes=64 << 20, sizeof=medsam.embedding_nbytes)
    masks = []
    for box in (BOX, (20, 20, 60, 70), (50, 40, 110, 100)):
        key = ("rgb", array_digest(ct_image.rgb))  # as Session keys its embedding cache
        emb = cache.get(key)
        if emb is None:
            emb = medsam.encode([ct_image.rgb])[0]
            cache.put(key, emb)
        masks.append(medsam.decode(emb, box).mask)
    assert len(fake_encoder) == 1  # three prompts, one encode
    assert all(m.shape == (128, 128) for m in masks)


def test_batches_split_and_keep_each_image_size(medsam, fake_encoder, ct_image, monkeypatch):
    monkeypatch.setattr(medsam, "batch_size", 2)
    imgs = [ct_image.rgb, ct_image.rgb[:100], ct_image.rgb[:, :64]]
    rs = medsam.segment_batch(imgs, [BOX, BOX, (10, 10, 60, 60)], [POINTS, None, None])
    assert [tuple(x.shape[:1]) for x in fake_encoder] == [(2,), (1,)]
    assert [r.mask.shape for r in rs] == [(128, 128), (100, 128), (128, 64)]
    assert set(rs[0].timings) == {"encode", "decode"}


def test_points_as_positive_clicks_when_asked(medsam, fake_encoder, ct_image, monkeypatch):
    emb = medsam.encode([ct_image.rgb])[0]
    monkeypatch.setattr(medsam, "use_points", True)
    with_points = medsam.decode(emb, BOX, POINTS)
    assert with_points.prompt == "box+points" and medsam.describe()["prompts"].startswith("box + key points")
    assert medsam.decode(emb, BOX, None).prompt == "box"


def test_bf16_autocast_decode_path(medsam, ct_image, monkeypatch):
    """What runs on a GPU by default: a bf16 embedding decoded under bf16 autocast (here CPU autocast)."""
    import torch

    from medreasoner.models.asm.medsam import _MedSAMEmbedding

    monkeypatch.setattr(medsam, "autocast_dtype", torch.bfloat16)
    emb = _MedSAMEmbedding(torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1)).bfloat16(),
                           (128, 128))
    r = medsam.decode(emb, BOX)
    assert r.mask.shape == (128, 128) and np.isfinite(r.score)
    assert medsam.describe()["precision"] == "bf16 autocast"


def test_box_outside_image_is_refused(medsam, fake_encoder, ct_image):
    emb = medsam.encode([ct_image.rgb])[0]
    with pytest.raises(ValueError, match="outside"):
        medsam.decode(emb, (200, 200, 300, 300))


# -- the real ViT-B (slow) --------------------------------------------------------------------------

@pytest.mark.slow
def test_real_vit_b_encode_once_then_decode_two_prompts(medsam, ct_image):
    calls = []
    hook = medsam.sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        emb = medsam.encode([ct_image.rgb])[0]
        a = medsam.decode(emb, BOX, POINTS)
        b = medsam.decode(emb, (20, 20, 60, 70))
    finally:
        hook.remove()
    assert len(calls) == 1
    assert tuple(emb.features.shape) == (1, 256, 64, 64) and bool(emb.features.isfinite().all())
    assert a.mask.shape == b.mask.shape == (128, 128) and np.isfinite(a.score) and np.isfinite(b.score)


@pytest.mark.slow
def test_saved_random_weights_load_through_the_asm_weights_only(medsam, tmp_path, monkeypatch):
    """torch.save'd weights (a make-tiny style file) come back through torch.load(weights_only=True)."""
    import torch

    p = tmp_path / "medsam_tiny.pth"
    state = {k: v.half() if v.is_floating_point() else v for k, v in medsam.sam.state_dict().items()}
    torch.save({"model": state, "medreasoner_tiny_test_model": True}, p)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    asm = load_asm("medsam", checkpoint=str(p), device="cpu")
    assert seen == [True]
    assert asm.is_tiny and asm.describe()["fingerprint"].startswith("sha256:")
    w = "mask_decoder.iou_prediction_head.layers.0.weight"
    torch.testing.assert_close(asm.sam.state_dict()[w], state[w].float())
