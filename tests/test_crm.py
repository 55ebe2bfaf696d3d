"""The tiny Qwen2.5-VL CRM through the public API: same loading code as real weights."""

import json

import numpy as np
import pytest

from medreasoner.errors import ModelLoadError
from medreasoner.models.answer import AnswerStatus
from medreasoner.models.crm import load_crm


@pytest.fixture(scope="module")
def crm(tiny_models):
    return load_crm(tiny_models["format"], device="cpu", batch_size=4)


def test_tiny_checkpoint_is_a_real_qwen25vl_folder(tiny_models):
    cfg = json.loads((__import__("pathlib").Path(tiny_models["format"]) / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"


def test_generate_answers_in_format_and_maps_to_original_pixels(crm, ct_image):
    crm.generation.max_new_tokens = 120
    a = crm.answer(ct_image.rgb, "Where is the liver?")
    assert crm.is_tiny and crm.describe()["tiny_test_model"] is True
    assert a.answer.status is AnswerStatus.OK, a.text
    assert (a.resize.model_w, a.resize.model_h) == (112, 112)  # the tiny model's input size
    assert (a.resize.orig_w, a.resize.orig_h) == (128, 128)
    x1, y1, x2, y2 = a.answer.box
    assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128


def test_batched_generation_keeps_order_and_sizes(crm, rng):
    crm.generation.max_new_tokens = 120
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(64, 200), (150, 90), (112, 112)]]
    answers = crm.answer_batch(images, ["a?", "a much longer question about the image?", "c?"])
    assert [(a.resize.orig_w, a.resize.orig_h) for a in answers] == [(200, 64), (90, 150), (112, 112)]
    for a, im in zip(answers, images):
        if a.answer.box is not None:
            assert a.answer.box[2] <= im.shape[1] and a.answer.box[3] <= im.shape[0]


def test_batched_equals_one_by_one(crm, ct_image):
    crm.generation.max_new_tokens = 120
    one = crm.answer(ct_image.rgb, "Where is the liver?").text
    batch = crm.answer_batch([ct_image.rgb[:, ::-1].copy(), ct_image.rgb], ["Which organ?", "Where is the liver?"])
    assert batch[1].text == one  # left padding must not change greedy decoding


def test_untrained_tiny_crm_gives_no_answer(tiny_models, ct_image):
    crm = load_crm(tiny_models["random"], device="cpu")
    crm.generation.max_new_tokens = 16
    a = crm.answer(ct_image.rgb, "Where is the liver?")
    assert a.answer.status is AnswerStatus.NO_ANSWER and a.answer.box is None


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_crm(str(tmp_path / "nope"))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="could not load CRM"):
        load_crm("zzzyzh/MedReasoner-Soft-7B")


def test_unknown_backend():
    from medreasoner.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError, match="available"):
        load_crm("x", backend="nope")
