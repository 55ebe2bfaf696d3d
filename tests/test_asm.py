"""ASMs on a real CT slice: LiteMedSAM with real weights, MedSAM2/SAM2 through the real sam2 package."""

import numpy as np
import pytest

from medreasoner.errors import ModelLoadError
from medreasoner.models.asm import asm_names, load_asm

BOX = (40.0, 30.0, 100.0, 90.0)
POINTS = [(70.0, 60.0), (60.0, 50.0)]


def test_registry_lists_all_asms():
    assert {"litemedsam", "medsam2", "sam2"} <= set(asm_names())


def test_litemedsam_real_weights_mask_lies_inside_box(litemedsam, ct_image):
    r = litemedsam.segment(ct_image.rgb, BOX, POINTS)
    assert r.mask.shape == (128, 128) and r.mask.dtype == bool
    assert r.area > 50  # a real structure, not an empty mask
    x1, y1, x2, y2 = (int(v) for v in BOX)
    inside = r.mask[y1:y2, x1:x2].sum()
    assert inside / r.area > 0.95
    assert r.prompt == "box" and not litemedsam.is_tiny


def test_litemedsam_batch_matches_single(litemedsam, ct_image):
    flipped = ct_image.rgb[:, ::-1].copy()
    batch = litemedsam.segment_batch([ct_image.rgb, flipped], [BOX, (28, 30, 88, 90)], [None, None])
    single = litemedsam.segment(ct_image.rgb, BOX)
    assert (batch[0].mask == single.mask).mean() > 0.999


def test_litemedsam_keeps_non_square_geometry(litemedsam, ct_image):
    img = ct_image.rgb[:, :96]
    r = litemedsam.segment(img, (10, 10, 60, 60))
    assert r.mask.shape == (128, 96)


def test_medsam2_tiny_checkpoint_through_sam2(tiny_models, ct_image):
    asm = load_asm("medsam2", checkpoint=tiny_models["sam2"], device="cpu")
    assert asm.is_tiny and asm.describe()["image_size"] == 512
    rs = asm.segment_batch([ct_image.rgb, ct_image.rgb[:100]], [BOX, BOX], [POINTS, None])
    assert rs[0].mask.shape == (128, 128) and rs[1].mask.shape == (100, 128)
    assert rs[0].prompt == "box+points" and rs[1].prompt == "box"
    assert all(np.isfinite(r.score) for r in rs)
    assert set(rs[0].timings) == {"encode", "decode"}


@pytest.mark.slow
def test_sam2_1024_random_init_builds_from_packaged_config(ct_image):
    asm = load_asm("sam2", random_init=True, device="cpu")
    assert asm.describe()["image_size"] == 1024
    assert asm.segment(ct_image.rgb, BOX, POINTS).mask.shape == (128, 128)


def test_medsam2_without_weights_offline_explains_what_to_do():
    with pytest.raises(ModelLoadError, match="--asm-checkpoint"):
        load_asm("medsam2")


def test_wrong_checkpoint_for_config(tmp_path):
    import torch

    p = tmp_path / "wrong.pt"
    torch.save({"model": {"foo": torch.zeros(1)}}, p)
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_asm("medsam2", checkpoint=str(p), device="cpu")


def test_unknown_asm_name():
    from medreasoner.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError, match="litemedsam"):
        load_asm("nnunet")


def test_box_outside_image_is_refused(litemedsam, ct_image):
    with pytest.raises(ValueError, match="outside"):
        litemedsam.segment(ct_image.rgb, (200, 200, 300, 300))
