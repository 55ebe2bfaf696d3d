"""GRPO through the real entry point on the tiny Qwen2.5-VL: steps, rewards, resume after kill -9, 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medreasoner.science.rewards import component_rewards, score

pytestmark = pytest.mark.slow  # trains or evaluates real tiny models end to end

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}
GOOD = "<think>t</think><answer>{'bbox': [0, 0, 10, 10], 'points_1': [2, 5], 'points_2': [8, 5]}</answer>"
GT = json.dumps({"bbox_2d": [5, 0, 15, 10], "point_2d": [[8, 5], [12, 5]]})


@pytest.fixture(scope="module")
def tiny_parquet(tmp_path_factory, ct_image):
    from medreasoner.data import Sample, write_parquet
    from medreasoner.science.keypoints import ground_truth_from_mask

    samples = []
    for i in range(6):
        img = np.rot90(ct_image.rgb, k=i % 4).copy()
        m = np.zeros(img.shape[:2], bool)
        m[20 + 5 * i:60 + 5 * i, 30:80] = True
        samples.append(Sample(id=f"t{i}", image=img, mask=m, query="Where is the lesion?",
                              ground_truth=ground_truth_from_mask(m), supercategory="Abdomen", category="lesion"))
    return write_parquet(samples, tmp_path_factory.mktemp("grpo") / "train.parquet")


def grpo_cmd(tiny_models, data, out, *extra, launcher=()):
    return [*launcher, str(ROOT / "training" / "grpo.py"), "--config", str(ROOT / "training/configs/grpo_tiny_cpu.yaml"),
            "--set", f"model={tiny_models['format']}", "--set", f"data={data}", "--set", f"output_dir={out}",
            "--set", "max_completion_length=80", *extra]


def test_component_rewards_match_score_and_accept_chat_completions():
    funcs = component_rewards("hard")
    assert [f.__name__ for f in funcs][:4] == ["format_think", "format_answer", "bbox_iou", "points_dice"]
    chat = [[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]]
    per = [f(chat, [GT, GT]) for f in funcs]
    total = sum(p[0] for p in per)
    assert total == pytest.approx(score(GOOD, GT, "hard")["total"])
    assert sum(p[1] for p in per) == 0.0


def test_two_grpo_steps_through_the_entry_point(tiny_models, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, *grpo_cmd(tiny_models, tiny_parquet, out)], capture_output=True, text=True,
                       env=ENV, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [h for h in logs if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for key in ("rewards/format_think/mean", "rewards/format_answer/mean", "rewards/bbox_iou/mean",
                "rewards/points_dice/mean", "kl"):
        assert key in steps[0]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "reward_curves.png").stat().st_size > 1000
    from medreasoner.models.crm import load_crm

    crm = load_crm(str(out / "final"), device="cpu")
    assert crm.is_tiny  # the tiny-model marker travels with the trained weights
    assert crm.answer(np.zeros((64, 64, 3), np.uint8), "Where?").text is not None


def _state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def test_resume_after_kill_continues_the_same_run(tiny_models, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *grpo_cmd(tiny_models, tiny_parquet, out, "--set", "max_steps=8")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=tmp_path,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (out / "checkpoint-2" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "training ended before checkpoint-2"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # trainer_state.json is written last: checkpoint-2 is complete
    proc.wait()
    assert not (out / "final").exists()
    latest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert 2 <= latest < 8

    p = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    state = _state(out / "checkpoint-8")
    assert state["global_step"] == 8
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == list(range(1, 9))  # the history continued; nothing restarted at step 1
    assert "GRPO done: 8 steps" in p.stdout


@pytest.mark.multiprocess
def test_two_cpu_processes_through_accelerate(tiny_models, tiny_parquet, tmp_path):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = grpo_cmd(tiny_models, tiny_parquet, tmp_path / "run", launcher=(
        accelerate, "launch", "--config_file", str(ROOT / "training/accelerate/cpu_2proc.yaml"),
        "--main_process_port", "29561"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 process(es)" in p.stdout
    assert (tmp_path / "run" / "final").is_dir()


def test_mask_dice_reward_from_a_real_asm(tiny_models, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *grpo_cmd(tiny_models, tiny_parquet, out, "--set", "max_steps=1", "--set", "mask_reward=true",
                                     "--set", "mask_reward_asm=litemedsam")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert "rewards/mask_dice_asm/mean" in first  # the reward ran inside the trainer


def test_mask_dice_reward_scores_a_good_box_above_a_bad_one(ct_image):
    """The reward function itself, through the session and the real LiteMedSAM: a box on the GT
    structure earns a high Dice, a box elsewhere a low one, no answer zero; one image, one encode."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from medreasoner.science.keypoints import ground_truth_from_mask
    from training.common import TrainConfig
    from training.grpo import mask_dice_reward

    img = np.full((96, 96, 3), 20, np.uint8)
    img[30:60, 40:75] = 230
    gt = np.zeros((96, 96), bool)
    gt[30:60, 40:75] = True
    box, (p1, p2) = ground_truth_from_mask(gt)["bbox_2d"], ground_truth_from_mask(gt)["point_2d"]
    answer = "<think>t</think><answer>{{'bbox': {}, 'points_1': {}, 'points_2': {}}}</answer>"
    good = answer.format(list(box), list(p1), list(p2))
    elsewhere = answer.format([2, 70, 20, 92], [10, 80], [12, 85])
    reward = mask_dice_reward(TrainConfig(mask_reward_asm="litemedsam"))
    scores = reward([good, elsewhere, "no answer at all"], [Image.fromarray(img)] * 3, [gt] * 3)
    assert scores[0] > 0.7 and scores[1] < 0.2 and scores[2] == 0.0, scores
