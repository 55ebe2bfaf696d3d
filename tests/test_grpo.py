"""GRPO through the real entry point on the tiny Qwen2.5-VL: steps, rewards, resume after kill -9, 2 processes;
the TRL argument parsing (YAML + command line) and the mask reward's one encode per image."""

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

slow = pytest.mark.slow  # trains or evaluates real tiny models end to end

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
            "--model_name_or_path", tiny_models["format"], "--data", str(data), "--output_dir", str(out),
            "--max_completion_length", "80", *extra]


def _parse(*argv):
    sys.path.insert(0, str(ROOT))
    from training.grpo import parse

    return parse(list(argv))


def test_trl_parser_sets_any_grpo_field_from_yaml_and_the_command_line_overrides(tmp_path):
    """One YAML of flat TRL names: GRPOConfig, ModelConfig and MedReasoner fields all arrive; the
    command line wins over the file; fields nobody set keep TRL's defaults."""
    import yaml

    cfg = yaml.safe_load((ROOT / "training/configs/grpo_tiny_cpu.yaml").read_text())
    cfg.update(epsilon_high=0.28, top_p=0.9, loss_type="dr_grpo", num_iterations=2, lora_r=8, reward="hard",
               mask_reward=True, image_size=224, learning_rate="1e-6")  # "1e-6": YAML reads it as a string
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    med, args, model_args = _parse("--config", str(path))
    assert (args.epsilon_high, args.loss_type, args.num_iterations) == (0.28, "dr_grpo", 2)  # from the file
    assert (args.top_p, args.learning_rate, args.max_steps, model_args.use_peft) == (0.9, 1e-6, 2, False)
    med, args, model_args = _parse("--config", str(path), "--top_p", "0.8", "--learning_rate", "1e-4",
                                   "--max_steps", "7", "--use_peft", "true")
    assert (args.epsilon_high, args.loss_type, args.num_iterations) == (0.28, "dr_grpo", 2)
    assert (args.top_p, args.learning_rate, args.max_steps) == (0.8, 1e-4, 7)  # the command line wins
    assert (args.num_generations, args.beta, args.max_completion_length) == (4, 0.01, 96)
    assert model_args.model_name_or_path == "tiny/crm" and model_args.lora_r == 8 and model_args.use_peft
    assert (med.reward, med.mask_reward, med.image_size, med.data) == ("hard", True, 224, "data/tiny.parquet")
    assert args.bf16 is False and args.gradient_checkpointing is False and args.report_to == []
    from trl import GRPOConfig

    assert args.temperature == GRPOConfig.temperature and args.epsilon == GRPOConfig.epsilon  # TRL's defaults

    with pytest.raises(SystemExit, match="bogus"):  # unknown keys are refused, in the file or on the command line
        path.write_text(yaml.safe_dump({**cfg, "bogus": 1}))
        _parse("--config", str(path))
    with pytest.raises(SystemExit, match="--key value"):
        _parse("--config", str(ROOT / "training/configs/grpo_tiny_cpu.yaml"), "--set", "max_steps=3")


@pytest.mark.parametrize("name", ["grpo_soft", "grpo_hard", "grpo_tiny_cpu", "sft"])
def test_shipped_configs_parse_with_trl_names(name):
    sys.path.insert(0, str(ROOT))
    from training import grpo, sft

    med, args, model_args = (sft if name == "sft" else grpo).parse(["--config", str(ROOT / f"training/configs/{name}.yaml")])
    assert model_args.model_name_or_path and med.data and args.output_dir.startswith("runs/")
    if name in ("grpo_soft", "grpo_hard"):  # the reference run's settings
        assert (args.num_generations, args.learning_rate, args.beta, args.max_completion_length) == (16, 1e-6, 0.01,
                                                                                                      2048)
        assert model_args.use_peft and model_args.lora_r == 64 and med.reward == name.split("_")[1]
    if name == "sft":
        assert (args.learning_rate, args.lr_scheduler_type.value, args.max_length) == (5e-6, "cosine", None)
        assert args.get_warmup_steps(1000) == 30  # warmup_ratio: 0.03 of all steps


def test_warmup_ratio_reaches_the_trainer_as_a_ratio():
    """transformers 5 has no warmup_ratio; a warmup_steps value in [0, 1) is the ratio. --warmup_ratio
    sets it (checked to be a ratio), --warmup_steps works as TRL documents it."""
    tiny = str(ROOT / "training/configs/grpo_tiny_cpu.yaml")
    _, args, _ = _parse("--config", tiny, "--warmup_ratio", "0.1")
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(200) == 20 and args.get_warmup_steps(5) == 1
    _, args, _ = _parse("--config", tiny, "--warmup_steps", "0.25")
    assert args.get_warmup_steps(200) == 50
    _, args, _ = _parse("--config", tiny, "--warmup_steps", "30")
    assert args.get_warmup_steps(200) == 30
    for bad in (["--warmup_ratio", "1.0"], ["--warmup_ratio", "-0.1"], ["--warmup_ratio", "0.1", "--warmup_steps", "5"]):
        with pytest.raises(SystemExit, match="warmup"):
            _parse("--config", tiny, *bad)


def test_component_rewards_match_score_and_accept_chat_completions():
    funcs = component_rewards("hard")
    assert [f.__name__ for f in funcs][:4] == ["format_think", "format_answer", "bbox_iou", "points_dice"]
    chat = [[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]]
    per = [f(chat, [GT, GT]) for f in funcs]
    total = sum(p[0] for p in per)
    assert total == pytest.approx(score(GOOD, GT, "hard")["total"])
    assert sum(p[1] for p in per) == 0.0


@slow
def test_two_grpo_steps_through_the_entry_point(tiny_models, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    # warmup over 90% of the 2 steps = ceil(1.8) = 2 warmup steps from 0 to the peak 1e-4 (logged: each step's lr)
    cmd = grpo_cmd(tiny_models, tiny_parquet, out, "--warmup_ratio", "0.9", "--lr_scheduler_type", "constant_with_warmup")
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [h for h in logs if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert [h["learning_rate"] for h in steps] == pytest.approx([0.0, 0.5e-4])  # warmup_ratio arrived as a ratio
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


@slow
def test_resume_after_kill_continues_the_same_run(tiny_models, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *grpo_cmd(tiny_models, tiny_parquet, out, "--max_steps", "8")]
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


@slow
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


@slow
def test_mask_dice_reward_from_a_real_asm(tiny_models, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *grpo_cmd(tiny_models, tiny_parquet, out, "--max_steps", "1", "--mask_reward", "true",
                                     "--mask_reward_asm", "litemedsam")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert "rewards/mask_dice_asm/mean" in first  # the reward ran inside the trainer
    counts = json.loads((out / "run.json").read_text())["mask_reward_counts"]
    # one step = 1 prompt x 4 generations: at most one encode (none if no completion answered a box)
    assert counts["completions"] == 4 and counts["asm_encodes"] <= 1, counts


def _bright_box_image():
    img = np.full((96, 96, 3), 20, np.uint8)
    img[30:60, 40:75] = 230
    gt = np.zeros((96, 96), bool)
    gt[30:60, 40:75] = True
    return img, gt


ANSWER = "<think>t</think><answer>{{'bbox': {}, 'points_1': {}, 'points_2': {}}}</answer>"


@slow
def test_mask_dice_reward_scores_a_good_box_above_a_bad_one():
    """The reward function itself, loading the real LiteMedSAM as training does: a box on the GT
    structure earns a high Dice, a box elsewhere a low one, no answer zero; one image, one encode."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from medreasoner.science.keypoints import ground_truth_from_mask
    from training.common import MedReasonerArguments
    from training.grpo import mask_dice_reward

    img, gt = _bright_box_image()
    box, (p1, p2) = ground_truth_from_mask(gt)["bbox_2d"], ground_truth_from_mask(gt)["point_2d"]
    good = ANSWER.format(list(box), list(p1), list(p2))
    elsewhere = ANSWER.format([2, 70, 20, 92], [10, 80], [12, 85])
    reward = mask_dice_reward(MedReasonerArguments(mask_reward_asm="litemedsam"))
    scores = reward([good, elsewhere, "no answer at all"], [Image.fromarray(img)] * 3, [gt] * 3)
    assert scores[0] > 0.7 and scores[1] < 0.2 and scores[2] == 0.0, scores
    assert reward.counts["asm_encodes"] == 1 and reward.counts["asm_decodes"] == 2, reward.counts


class CountingASM:
    """The real ASM, counting the images it encodes and the prompts it decodes."""

    def __init__(self, asm):
        self.asm, self.encoded, self.decoded = asm, 0, 0
        self.batch_size = asm.batch_size

    def encode(self, images):
        self.encoded += len(images)
        return self.asm.encode(images)

    def decode(self, embedding, box, points=None):
        self.decoded += 1
        return self.asm.decode(embedding, box, points)

    def describe(self):
        return self.asm.describe()


def test_mask_reward_encodes_each_image_once_per_group_of_generations(litemedsam):
    """TRL scores a prompt's G completions in one call, each with its own copy of the prompt's image:
    the reward encodes that image once, decodes each completion's prompts, and scores exactly what
    one ASM call per completion would."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from training.common import MedReasonerArguments
    from training.grpo import mask_dice_reward

    img_a, gt_a = _bright_box_image()
    img_b, gt_b = np.ascontiguousarray(np.rot90(img_a)), np.ascontiguousarray(np.rot90(gt_a))
    g = 4
    boxes = [[40, 30, 75, 60], [38, 28, 70, 62], [45, 35, 80, 58], None,  # prompt A; None: no answer
             [30, 21, 60, 56], [25, 20, 62, 50], [2, 70, 20, 92], [30, 25, 66, 60]]  # prompt B
    completions = [ANSWER.format(b, [(b[0] + b[2]) // 2, b[1] + 5], [(b[0] + b[2]) // 2, b[3] - 5])
                   if b else "no answer" for b in boxes]
    images = [Image.fromarray(img_a.copy()) for _ in range(g)] + [Image.fromarray(img_b.copy()) for _ in range(g)]
    masks = [gt_a] * g + [gt_b] * g
    counting = CountingASM(litemedsam)
    reward = mask_dice_reward(MedReasonerArguments(), asm=counting)

    scores = reward(completions, images, masks)
    assert counting.encoded == 2 and reward.counts["asm_encodes"] == 2  # one per prompt, not one per completion
    assert counting.decoded == 7 == reward.counts["asm_decodes"]  # every completion with a box
    assert scores[3] == 0.0

    from medreasoner.models.answer import parse_completion
    from medreasoner.science.metrics import mask_dice

    for c, im, m, s in zip(completions, [img_a] * g + [img_b] * g, masks, scores):
        a = parse_completion(c, image_size=(96, 96))
        if a.box is not None:  # the same score as segmenting this completion on its own
            assert s == pytest.approx(float(mask_dice(litemedsam.segment(im, a.box, a.points).mask, m)))

    # the next step's group: its own image, encoded once more (nothing is cached across calls)
    reward(completions[:g], images[:g], masks[:g])
    assert counting.encoded == 3 and reward.counts["calls"] == 2


def test_resume_skips_a_checkpoint_a_kill_left_half_written(tmp_path):
    """The trainer writes trainer_state.json last: a checkpoint folder without it is not resumable."""
    from training.common import newest_checkpoint

    assert newest_checkpoint(str(tmp_path)) is None
    for step, complete in ((2, True), (10, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # numeric order, complete only
